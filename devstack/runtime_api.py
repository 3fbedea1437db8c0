"""A stand-in for the Lambda Runtime API (what `awslambdaric` talks to inside a Lambda
environment), one server per function, with a Python `invoke()` that plays the Lambda service.

Endpoints (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html):

    GET  /2018-06-01/runtime/invocation/next            blocks until an invocation is queued
    POST /2018-06-01/runtime/invocation/{id}/response   202; the invocation succeeded
    POST /2018-06-01/runtime/invocation/{id}/error      202; the handler raised
    POST /2018-06-01/runtime/init/error                 202; the handler module failed to load

The next-invocation response carries the event as the body (Content-Type: application/json,
which awslambdaric requires to unmarshal it) and the headers Lambda-Runtime-Aws-Request-Id,
-Deadline-Ms (epoch milliseconds), -Invoked-Function-Arn, -Trace-Id and, when given,
-Client-Context and -Cognito-Identity. awslambdaric's C client (aws-lambda-cpp over libcurl)
keeps the connection alive between calls and gives the server 100 ms to answer a POST, so the
server speaks HTTP/1.1 with exact Content-Length and answers POSTs at once.

Lambda behaviours reproduced for `invoke()`:
- events over 6 MB are refused (RequestTooLargeException), responses over 6 MB fail the
  invocation (Function.ResponseSizeTooLarge) and the runtime is answered 413;
- an invocation still running at its deadline fails (Sandbox.Timedout) and `on_timeout` is
  called so the owner can kill the environment, as Lambda does;
- an init error fails every queued invocation with the error the runtime posted;
- an environment that exits mid-invocation fails it with Runtime.ExitError.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .httpd import LoopbackServer, RequestHandler
from .procs import LOOPBACK, DevstackError

log = logging.getLogger("devstack.runtime")

PREFIX = "/2018-06-01/runtime"
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # Lambda's synchronous invocation limit, request and response


@dataclass
class InvokeResult:
    """What Invoke returns. `payload` is the handler's return value parsed from JSON (None if
    the handler returned bytes: see `raw`); `error` is the error document
    ({"errorMessage", "errorType", "requestId", "stackTrace"}) when `ok` is False."""
    ok: bool
    payload: Any = None
    error: dict | None = None
    request_id: str = ""
    duration_ms: float = 0.0
    raw: bytes = b""
    content_type: str = ""

    @property
    def error_type(self) -> str | None:
        return (self.error or {}).get("errorType") if not self.ok else None


@dataclass
class _Invocation:
    request_id: str
    body: bytes
    timeout: float
    client_context: str | None
    cognito_identity: str | None
    trace_id: str
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    result: InvokeResult | None = None
    timed_out: bool = False


def _trace_id() -> str:
    return f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};Parent={uuid.uuid4().hex[:16]};Sampled=0"


class _Handler(RequestHandler):
    """awslambdaric's side of the Runtime API (the owner is the RuntimeAPI)."""
    server_version = "devstack-runtime-api"

    def _send(self, status: int, body: bytes | dict = b"", headers: dict[str, str] | None = None) -> None:
        self.reply(status, body, list((headers or {}).items()))

    def _peer_closed(self) -> bool:
        """True when the client has gone (its process died): the socket reads EOF."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        if self.path == f"{PREFIX}/invocation/next":
            self.owner._serve_next(self)
        else:
            self._send(404, {"errorMessage": f"unknown path {self.path}", "errorType": "InvalidPath"})

    def do_POST(self) -> None:  # noqa: N802
        body = self.read_body()
        api = self.owner
        path = self.path
        if path == f"{PREFIX}/init/error":
            api._init_error(body, self.headers.get("Lambda-Runtime-Function-Error-Type"))
            self._send(202, {"status": "OK"})
            return
        if path.startswith(f"{PREFIX}/invocation/"):
            rest = path[len(f"{PREFIX}/invocation/"):]
            request_id, _, action = rest.partition("/")
            if action == "response":
                status, reply = api._response(request_id, body, self.headers.get("Content-Type") or "")
                self._send(status, reply)
                return
            if action == "error":
                status, reply = api._error(request_id, body, self.headers.get("Lambda-Runtime-Function-Error-Type"))
                self._send(status, reply)
                return
        self._send(404, {"errorMessage": f"unknown path {path}", "errorType": "InvalidPath"})


class RuntimeAPI:
    """The Lambda service for one function: a Runtime API server plus `invoke()`.

    `timeout` is the function's configured timeout (Lambda-Runtime-Deadline-Ms is set from it
    when the runtime picks the invocation up); `pickup_timeout` bounds how long `invoke()` waits
    for an environment to take a queued invocation (cold starts included).
    """

    def __init__(self, function_name: str, *, timeout: float = 30.0, pickup_timeout: float = 120.0,
                 region: str = "us-east-1", account_id: str = "123456789012", memory_size: int = 1024,
                 log_path: Path | None = None, max_event_bytes: int = MAX_PAYLOAD_BYTES,
                 max_response_bytes: int = MAX_PAYLOAD_BYTES):
        self.function_name = function_name
        self.timeout = timeout
        self.pickup_timeout = pickup_timeout
        self.function_arn = f"arn:aws:lambda:{region}:{account_id}:function:{function_name}"
        self.memory_size = memory_size
        self.log_path = Path(log_path) if log_path else None
        self.max_event_bytes = max_event_bytes
        self.max_response_bytes = max_response_bytes
        self.on_timeout: Callable[[], None] | None = None

        self._cv = threading.Condition()
        self._queue: collections.deque[_Invocation] = collections.deque()
        self._inflight: dict[str, _Invocation] = {}
        self._generation = 0
        self._stopping = False
        self.ready = False                 # the current environment finished init (asked for /next)
        self.init_error: dict | None = None  # the last init error; cleared when an environment is ready
        self.init_failures = 0
        self._init_error_generation = -1
        self.invocations = 0
        self._server = LoopbackServer(_Handler, self, f"runtime-api-{function_name}")

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._server.start()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def address(self) -> str:
        """host:port, the value of AWS_LAMBDA_RUNTIME_API."""
        return f"{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            for inv in list(self._queue) + list(self._inflight.values()):
                self._finish(inv, InvokeResult(False, error=_error_doc("Devstack.Stopped", "the stack is stopping",
                                                                       inv.request_id), request_id=inv.request_id))
            self._queue.clear()
            self._inflight.clear()
            self._cv.notify_all()
        self._server.stop()

    # -- the owner's hooks -------------------------------------------------------------------------
    def environment_ended(self, returncode: int | None) -> None:
        """The function process exited: fail what it was running (and, when it died during
        init without posting an init error, what was queued), forget its waiting /next."""
        with self._cv:
            if returncode is None:
                reason = "Runtime exited without providing a reason"
            elif returncode < 0:
                reason = f"Runtime exited with error: signal {-returncode}"
            else:
                reason = f"Runtime exited with error: exit status {returncode}"
            for request_id, inv in list(self._inflight.items()):
                del self._inflight[request_id]
                self._finish(inv, InvokeResult(False, error=_error_doc(
                    "Runtime.ExitError", f"RequestId: {request_id} Error: {reason}", request_id), request_id=request_id))
            if not self.ready and self._init_error_generation != self._generation and not self._stopping:
                self._fail_init(_error_doc("Runtime.ExitError", f"Error: {reason}", ""))
            self._generation += 1
            self.ready = False
            self._cv.notify_all()

    def wait_ready(self, timeout: float) -> None:
        """Until the environment has asked for its first invocation; FunctionInitError if an
        init fails meanwhile (or had failed last time), DevstackError on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            failures = self.init_failures
            while not self.ready:
                if self.init_failures > failures or self.init_error is not None:
                    raise FunctionInitError(self.function_name, self.init_error or {})
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DevstackError(f"{self.function_name}: runtime not ready after {timeout:.0f}s")
                self._cv.wait(min(left, 0.5))

    # -- invoke ------------------------------------------------------------------------------------
    def invoke(self, event: Any, timeout: float | None = None, *, client_context: dict | None = None,
               cognito_identity: dict | None = None) -> InvokeResult:
        """Queue `event` for the function and wait for the outcome (RequestResponse invoke).

        `timeout`: the function timeout for this invocation (default: the configured one),
        counted from the moment the runtime picks the event up."""
        request_id = str(uuid.uuid4())
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        if len(body) > self.max_event_bytes:
            return InvokeResult(False, request_id=request_id, error=_error_doc(
                "RequestTooLargeException",
                f"Request must be smaller than {self.max_event_bytes} bytes for the InvokeFunction operation",
                request_id))
        inv = _Invocation(request_id, body, self.timeout if timeout is None else timeout,
                          json.dumps(client_context) if client_context is not None else None,
                          json.dumps(cognito_identity) if cognito_identity is not None else None, _trace_id())
        with self._cv:
            if self._stopping:
                return InvokeResult(False, request_id=request_id,
                                    error=_error_doc("Devstack.Stopped", "the stack is stopping", request_id))
            self._queue.append(inv)
            self._cv.notify_all()
            while inv.result is None:
                now = time.monotonic()
                if inv.started_at is None:
                    if now - inv.queued_at > self.pickup_timeout:
                        try:
                            self._queue.remove(inv)
                        except ValueError:
                            pass
                        self._finish(inv, InvokeResult(False, request_id=request_id, error=_error_doc(
                            "Devstack.NoRuntime",
                            f"no environment of {self.function_name} took the invocation within "
                            f"{self.pickup_timeout:.0f}s (see its log)", request_id)))
                        break
                    self._cv.wait(0.2)
                else:
                    left = inv.started_at + inv.timeout - now
                    if left <= 0:
                        self._inflight.pop(request_id, None)
                        self._time_out(inv)
                        break
                    self._cv.wait(min(left, 0.2))
        if inv.timed_out and self.on_timeout is not None:
            self.on_timeout()
        return inv.result

    def _time_out(self, inv: _Invocation) -> None:  # holds self._cv
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        message = f"{stamp} {inv.request_id} Task timed out after {inv.timeout:.2f} seconds"
        self._log_line(message)
        inv.timed_out = True
        self._finish(inv, InvokeResult(False, request_id=inv.request_id, duration_ms=inv.timeout * 1000,
                                       error=_error_doc("Sandbox.Timedout", message, inv.request_id)))

    def _late(self, inv: _Invocation) -> bool:
        """The answer came after the deadline (the waiting thread had not woken yet): Lambda
        would have stopped the function at the deadline, so it is a timeout."""
        if inv.started_at is None or time.monotonic() <= inv.started_at + inv.timeout:
            return False
        with self._cv:
            self._time_out(inv)
        return True

    # -- server side -----------------------------------------------------------------------------
    def _serve_next(self, handler: _Handler) -> None:
        with self._cv:
            generation = self._generation
            self.ready = True
            self.init_error = None
            self._cv.notify_all()
            inv = None
            while inv is None:
                if self._stopping or generation != self._generation:
                    handler.close_connection = True
                    return
                if self._queue:
                    if handler._peer_closed():
                        handler.close_connection = True
                        return
                    inv = self._queue.popleft()
                    break
                self._cv.wait(0.5)
            inv.started_at = time.monotonic()
            self._inflight[inv.request_id] = inv
            self.invocations += 1
            self._cv.notify_all()  # the invoking thread now waits for the deadline, not a poll
        deadline_ms = int((time.time() + inv.timeout) * 1000)
        headers = {
            "Lambda-Runtime-Aws-Request-Id": inv.request_id,
            "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": self.function_arn,
            "Lambda-Runtime-Trace-Id": inv.trace_id,
        }
        if inv.client_context:
            headers["Lambda-Runtime-Client-Context"] = inv.client_context
        if inv.cognito_identity:
            headers["Lambda-Runtime-Cognito-Identity"] = inv.cognito_identity
        self._log_line(f"START RequestId: {inv.request_id} Version: $LATEST")
        try:
            handler._send(200, inv.body, headers)
        except OSError:  # the environment went away between asking and receiving: requeue
            with self._cv:
                if self._inflight.pop(inv.request_id, None) is not None:
                    inv.started_at = None
                    self._queue.appendleft(inv)
                    self._cv.notify_all()
            handler.close_connection = True

    def _take(self, request_id: str) -> _Invocation | None:
        with self._cv:
            return self._inflight.pop(request_id, None)

    def _response(self, request_id: str, body: bytes, content_type: str) -> tuple[int, dict]:
        inv = self._take(request_id)
        if inv is None:
            return 400, {"errorMessage": f"unknown or finished request id {request_id}",
                         "errorType": "InvalidRequestID"}
        if self._late(inv):
            return 202, {"status": "OK"}
        duration = (time.monotonic() - inv.started_at) * 1000
        if len(body) > self.max_response_bytes:
            error = _error_doc("Function.ResponseSizeTooLarge",
                               f"Response payload size ({len(body)} bytes) exceeded maximum allowed payload size "
                               f"({self.max_response_bytes} bytes).", request_id)
            self._complete(inv, InvokeResult(False, error=error, request_id=request_id, duration_ms=duration))
            return 413, {"errorMessage": error["errorMessage"], "errorType": "RequestEntityTooLarge"}
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        self._complete(inv, InvokeResult(True, payload=payload, request_id=request_id, duration_ms=duration,
                                         raw=body, content_type=content_type))
        return 202, {"status": "OK"}

    def _error(self, request_id: str, body: bytes, error_type: str | None) -> tuple[int, dict]:
        inv = self._take(request_id)
        if inv is None:
            return 400, {"errorMessage": f"unknown or finished request id {request_id}",
                         "errorType": "InvalidRequestID"}
        if self._late(inv):
            return 202, {"status": "OK"}
        duration = (time.monotonic() - inv.started_at) * 1000
        self._complete(inv, InvokeResult(False, error=_parse_error(body, error_type, request_id),
                                         request_id=request_id, duration_ms=duration, raw=body))
        return 202, {"status": "OK"}

    def _init_error(self, body: bytes, error_type: str | None) -> None:
        error = _parse_error(body, error_type, "")
        with self._cv:
            self._init_error_generation = self._generation
            self._fail_init(error)
        self._log_line(f"INIT_REPORT Phase: init Status: error Error Type: {error.get('errorType')}")

    def _fail_init(self, error: dict) -> None:  # holds self._cv
        """Init failed: record it and fail every queued invocation with it, as Lambda fails the
        invocation whose cold start failed."""
        self.init_error = error
        self.init_failures += 1
        self.ready = False
        failed = list(self._queue)
        self._queue.clear()
        for inv in failed:
            self._finish(inv, InvokeResult(False, error=dict(error, requestId=inv.request_id),
                                           request_id=inv.request_id))
        self._cv.notify_all()

    def _complete(self, inv: _Invocation, result: InvokeResult) -> None:
        # log first: whoever waits on the invocation may read the log as soon as it returns
        self._log_line(f"END RequestId: {inv.request_id}")
        self._log_line(f"REPORT RequestId: {inv.request_id}\tDuration: {result.duration_ms:.2f} ms\t"
                       f"Billed Duration: {int(result.duration_ms) + 1} ms\tMemory Size: {self.memory_size} MB")
        with self._cv:
            self._finish(inv, result)

    def _finish(self, inv: _Invocation, result: InvokeResult) -> None:  # holds self._cv
        if inv.result is None:
            inv.result = result
        self._cv.notify_all()

    def _log_line(self, line: str) -> None:
        if self.log_path is None:
            return
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass


class FunctionInitError(DevstackError):
    def __init__(self, function_name: str, error: dict):
        self.function_name = function_name
        self.error = error
        super().__init__(f"{function_name}: init failed: {error.get('errorType')}: {error.get('errorMessage')}")


def _error_doc(error_type: str, message: str, request_id: str) -> dict:
    return {"errorMessage": message, "errorType": error_type, "requestId": request_id, "stackTrace": []}


def _parse_error(body: bytes, error_type: str | None, request_id: str) -> dict:
    try:
        error = json.loads(body) if body else {}
        if not isinstance(error, dict):
            raise ValueError
    except ValueError:
        error = {"errorMessage": body.decode(errors="replace")}
    error.setdefault("errorType", error_type or "Unhandled")
    error.setdefault("errorMessage", "")
    error.setdefault("requestId", request_id)
    return error
