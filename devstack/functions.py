"""A function = a Runtime API server + an awslambdaric process that Lambda would run in the
container image, restarted when it exits (a new execution environment, cold start and all)."""
from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from .procs import Child
from .runtime_api import InvokeResult, RuntimeAPI

log = logging.getLogger("devstack.functions")


class LambdaFunction:
    """`python -m awslambdaric HANDLER` in `cwd` with `env` (AWS_LAMBDA_RUNTIME_API is added),
    stdout and stderr appended to `log_path`.

    Lambda semantics: an unhandled exception in the handler only fails the invocation (the
    process lives on); an init error, a crash or a timeout ends the environment, and the next
    invocation gets a fresh one. Restarts after a failed init back off from 0.5 s to 5 s."""

    def __init__(self, name: str, handler: str, *, env: Mapping[str, str], cwd: Path, log_path: Path,
                 timeout: float = 30.0, pickup_timeout: float = 120.0, memory_size: int = 1024,
                 region: str = "us-east-1", account_id: str = "123456789012", python: str | None = None):
        self.name = name
        self.handler = handler
        self.cwd = Path(cwd)
        self.log_path = Path(log_path)
        self.python = python or sys.executable
        self.runtime = RuntimeAPI(name, timeout=timeout, pickup_timeout=pickup_timeout, region=region,
                                  account_id=account_id, memory_size=memory_size, log_path=self.log_path)
        self.runtime.on_timeout = self.kill_environment
        self._base_env = dict(env)
        self.env: dict[str, str] = {}
        self.child: Child | None = None
        self.starts = 0
        self.exit_codes: list[int | None] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.runtime.start()
        self.env = {**self.lambda_env(), **self._base_env,
                    "AWS_LAMBDA_RUNTIME_API": self.runtime.address, "_HANDLER": self.handler}
        self._thread = threading.Thread(target=self._supervise, name=f"function-{self.name}", daemon=True)
        self._thread.start()

    def lambda_env(self) -> dict[str, str]:
        """The variables Lambda sets in every environment (the given env may override them)."""
        region = self.runtime.function_arn.split(":")[3]
        return {
            "AWS_LAMBDA_FUNCTION_NAME": self.name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.runtime.memory_size),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": f"devstack/[$LATEST]{self.name}",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_REGION": region,
            "AWS_DEFAULT_REGION": region,
            "LAMBDA_TASK_ROOT": str(self.cwd),
            "TZ": ":UTC",
            "PYTHONUNBUFFERED": "1",
        }

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            child = self.child
        if child is not None:
            child.stop(grace=3.0)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.runtime.stop()

    def wait_ready(self, timeout: float) -> None:
        self.runtime.wait_ready(timeout)

    def kill_environment(self) -> None:
        """SIGKILL the current environment (Lambda does this on a timeout); a new one starts."""
        with self._lock:
            child = self.child
        if child is not None:
            child.kill()

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self.child.pid if self.child is not None and self.child.alive() else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def invoke(self, event: Any, timeout: float | None = None, **kwargs: Any) -> InvokeResult:
        return self.runtime.invoke(event, timeout, **kwargs)

    # -- the supervisor ------------------------------------------------------------------------------
    def _supervise(self) -> None:
        failed_inits = 0
        while not self._stop.is_set():
            self.starts += 1
            self.runtime._log_line(f"INIT_START devstack function={self.name} handler={self.handler} "
                                   f"start={self.starts}")
            try:
                child = Child(self.name, [self.python, "-m", "awslambdaric", self.handler], self.log_path,
                              env=self.env, cwd=self.cwd)
            except Exception as exc:  # noqa: BLE001 - keep supervising; report in the log
                self.runtime._log_line(f"devstack: cannot start {self.name}: {exc}")
                self.runtime.environment_ended(None)
                if self._stop.wait(5.0):
                    return
                continue
            with self._lock:
                self.child = child
            if self._stop.is_set():  # stop() ran while we were spawning
                child.stop(grace=3.0)
            while child.wait(0.2) is None:
                if self._stop.is_set():
                    child.stop(grace=3.0)
            rc = child.poll()
            was_ready = self.runtime.ready
            self.exit_codes.append(rc)
            self.runtime.environment_ended(rc)
            child.stop(grace=0.5)  # anything left in its process group
            with self._lock:
                self.child = None
            if self._stop.is_set():
                return
            self.runtime._log_line(f"devstack: {self.name} environment exited rc={rc}; starting a new one")
            log.info("%s: environment exited rc=%s", self.name, rc)
            if was_ready:
                failed_inits = 0
                delay = 0.0
            else:
                delay = min(5.0, 0.5 * 2 ** failed_inits)
                failed_inits += 1
            if self._stop.wait(delay):
                return


def wait_all_ready(functions: list[LambdaFunction], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for function in functions:
        function.wait_ready(max(0.1, deadline - time.monotonic()))
