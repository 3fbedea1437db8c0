"""`faceflow serve` as a real process on a free loopback port, for the tests: started with the
CLI, asked over HTTP (http.client, bounded timeouts), stopped at the end."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    def __init__(self, folder: Path, *args: str, env: dict | None = None):
        self.folder, self.args, self.env = Path(folder), args, env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.folder / "serve.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServeProcess":
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "faceflow.cli", "serve", "--port", str(self.port),
                 "--workdir", str(self.folder / "work"), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        deadline = time.monotonic() + START_TIMEOUT_S
        while "faceflow serve: open" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"faceflow serve did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, bytes]:
        """(status, headers with lower-case names, body); `path` may be a whole URL of this server."""
        if path.startswith("http"):
            assert path.startswith(self.url + "/"), path
            path = path[len(self.url):]
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, payload=None, timeout: float = 120) -> tuple[int, dict]:
        body = None if payload is None else json.dumps(payload).encode()
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json"} if body else {},
                                       timeout)
        return status, json.loads(data) if data else {}

    def wait_for_job(self, job_id: str, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            status, job = self.json("GET", f"/v1/jobs/{job_id}")
            assert status == 200, job
            if job["status"] in ("done", "failed") or time.monotonic() > deadline:
                return job
            time.sleep(0.25)
