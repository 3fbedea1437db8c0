"""Process and port plumbing shared by the stack: free loopback ports, bounded waits, and
child processes that cannot outlive the stack.

Every child runs in its own session (so its whole process group can be signalled) and, on
Linux, with PR_SET_PDEATHSIG=SIGKILL so it dies with this process even when this process is
killed with SIGKILL. The death signal fires when the *thread* that forked the child exits, so
all children are forked from one long-lived spawner thread rather than from whichever thread
asked for them. An atexit hook stops whatever is still running at interpreter exit.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

LOOPBACK = "127.0.0.1"


class DevstackError(RuntimeError):
    """The local stack could not do what was asked (a tool is missing, a process did not start)."""


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05,
               what: str = "condition") -> None:
    """Poll `predicate` until it is true; DevstackError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise DevstackError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path | str, lines: int = 30) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Spawning

def _pdeathsig_preexec() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:  # runs in the child between fork and exec: keep it trivial
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return preexec


_PREEXEC = _pdeathsig_preexec()
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="devstack-spawner")
_LIVE: set["Child"] = set()
_LIVE_LOCK = threading.Lock()


class Child:
    """One child process in its own process group, output appended to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        def spawn() -> subprocess.Popen:
            with open(self.log_path, "ab", buffering=0) as log:
                return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env=dict(env) if env is not None else None, cwd=cwd,
                                        start_new_session=True, close_fds=True, preexec_fn=_PREEXEC)

        try:
            self.proc: subprocess.Popen = _SPAWNER.submit(spawn).result(timeout=60)
        except FileNotFoundError as exc:
            raise DevstackError(f"{name}: cannot run {self.argv[0]!r}: {exc}") from exc
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # start_new_session: the group id is the child's pid
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; reaps the child."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            if self.wait(grace) is None:
                self._signal_group(signal.SIGKILL)
                self.wait(5.0)
        # the leader may be gone while others in its group are not
        self._signal_group(signal.SIGKILL)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return self.proc.poll()

    def kill(self) -> int | None:
        self._signal_group(signal.SIGKILL)
        self.wait(5.0)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return self.proc.poll()

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.proc.pid} rc={self.proc.poll()}>"


@atexit.register
def _stop_all_children() -> None:
    with _LIVE_LOCK:
        children = list(_LIVE)
    for child in children:
        try:
            child.stop(grace=2.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
