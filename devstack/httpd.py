"""The HTTP plumbing the stand-ins share (the Lambda Runtime API, the HTTP API, the SageMaker
async endpoint): a threaded loopback server run in a daemon thread, and a request handler that
speaks HTTP/1.1 with exact Content-Length, reads chunked or sized bodies (with a limit), and
answers in one call.

awslambdaric's C client keeps connections alive and gives a POST 100 ms to be answered, so
replies go out at once, with Nagle off (headers and body are separate writes: no delayed-ACK
stalls).
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .procs import LOOPBACK

log = logging.getLogger("devstack.httpd")


class LoopbackServer:
    """`handler_class` served on a free loopback port in a daemon thread; handlers reach the
    owner (the stand-in) as `self.server.owner`."""

    def __init__(self, handler_class: type[BaseHTTPRequestHandler], owner: Any, name: str):
        self.handler_class, self.owner, self.name = handler_class, owner, name
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        server = ThreadingHTTPServer((LOOPBACK, 0), self.handler_class, bind_and_activate=False)
        server.daemon_threads = True
        server.allow_reuse_address = True
        server.request_queue_size = 64
        server.server_bind()
        server.server_activate()
        server.owner = self.owner
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "devstack"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet; debug logging only
        log.debug("%s: " + fmt, self.server_version, *args)

    @property
    def owner(self) -> Any:
        return self.server.owner  # type: ignore[attr-defined]

    def read_body(self, limit: int | None = None) -> bytes | None:
        """The request body (chunked or sized); None when it is over `limit` (a sized body is
        drained, up to a point, so the client can read the answer instead of a reset)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if limit is not None and total > limit:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if limit is not None and length > limit:
            left = length if length <= 8 * limit else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            return None
        return self.rfile.read(length) if length else b""

    def reply(self, status: int, body: bytes | dict | list = b"", headers: list[tuple[str, str]] | None = None,
              *, content_type: str | None = "application/json", close: bool = False) -> None:
        """One whole answer: status, headers, Content-Length and the body (a dict or list is
        sent as JSON)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers or []:
            self.send_header(name, value)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
