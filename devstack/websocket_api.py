"""An API Gateway WebSocket API stand-in: a loopback WebSocket server whose connections and
messages become the stream function's `$connect`, `$default` and `$disconnect` events (Lambda
proxy integration), and the `@connections` Management API the function posts its replies to.

https://docs.aws.amazon.com/apigateway/latest/developerguide/apigateway-websocket-api.html

- Connect: auth as the HTTP API stand-in's (`auth="jwt"`: "Authorization: Bearer <JWT>",
  decoded not verified, its claims become requestContext.authorizer as a Lambda authorizer's
  context, strings, with principalId = sub; missing or expired: HTTP 401 before any
  invocation. `auth="iam"`: a SigV4 Authorization header, not verified, the access key id
  becomes requestContext.identity; missing: HTTP 403). Then `$connect` is invoked; a status
  other than 2xx (or a function error) refuses the handshake with that status.
- Messages: text frames only, as API Gateway (a binary frame closes the connection with 1003);
  a message over 128 KiB closes it with 1009. Each message is one `$default` invocation, sent
  round-robin to the function's processes (`invokers`: consecutive messages land on different
  execution environments), at most one message per process at a time (more wait their turn,
  none dropped: backpressure is the client's and the function's). A function error sends the
  client API Gateway's {"message": "Internal server error", ...}.
- Close: `$disconnect` is invoked (its result is ignored).
- Management API (`management_url`, what AWS_ENDPOINT_URL_APIGATEWAYMANAGEMENTAPI points
  boto3 at): POST /@connections/{id} sends the body to the client as a text message (410
  GoneException for a closed connection, 413 PayloadTooLargeException over 128 KiB), GET
  describes the connection, DELETE closes it. Signatures are not checked.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from .http_api import _claim_string, _iam_caller, _jwt_claims
from .httpd import LoopbackServer, RequestHandler
from .procs import LOOPBACK, DevstackError
from .runtime_api import InvokeResult

log = logging.getLogger("devstack.websocket_api")

# API Gateway's WebSocket quotas (faceflow.stream keeps the protocol inside them).
MESSAGE_LIMIT_BYTES = 128 * 1024
CLOSE_UNSUPPORTED_DATA, CLOSE_TOO_BIG = 1003, 1009


@dataclass
class Connection:
    id: str
    socket: Any
    connected_at: float
    source_ip: str
    user_agent: str
    authorizer: dict | None = None
    identity: dict = field(default_factory=dict)
    last_active: float = 0.0


@dataclass
class Dispatch:
    """One invocation the stand-in made: which process (index into `invokers`) got which route;
    recorded when it starts (`ok` is None until it ends)."""
    route: str
    connection_id: str
    process: int
    ok: bool | None = None


class WebSocketApi:
    def __init__(self, invokers: list[Callable[[dict], InvokeResult]], *, auth: str = "none",
                 account_id: str = "123456789012", region: str = "us-east-1", stage: str = "local",
                 max_message_bytes: int = MESSAGE_LIMIT_BYTES):
        if auth not in ("none", "jwt", "iam"):
            raise ValueError(f"auth must be none, jwt or iam, not {auth!r}")
        self.invokers = invokers          # filled in by the stack once the processes exist
        self.auth, self.account_id, self.region, self.stage = auth, account_id, region, stage
        self.api_id = "devstackws"
        self.max_message_bytes = max_message_bytes
        self.connections: dict[str, Connection] = {}
        self.dispatches: list[Dispatch] = []
        self._turn = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._busy: list[asyncio.Semaphore] = []
        self.port = 0
        self.management = LoopbackServer(_ManagementHandler, self, "websocket-management")

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        import importlib.util
        if importlib.util.find_spec("websockets") is None:
            raise DevstackError("the WebSocket API stand-in needs websockets: pip install -e '.[stream]'")
        self.management.start()
        self._thread = threading.Thread(target=self._run, name="websocket-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the WebSocket API stand-in did not start")

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            async def close():
                self._server.close()
                await self._server.wait_closed()
            try:
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            except Exception:  # noqa: BLE001 - stopping anyway
                log.debug("websocket api: close failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self.management.stop()

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    @property
    def management_url(self) -> str:
        return self.management.url

    def _run(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def begin():
            self._server = await serve(self._session, LOOPBACK, 0, process_request=self._connect,
                                       max_size=self.max_message_bytes, compression=None,
                                       ping_interval=None)
            self.port = self._server.sockets[0].getsockname()[1]

        self._loop.run_until_complete(begin())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    # -- routes --------------------------------------------------------------------------------------
    def _context(self, route: str, event_type: str, connection: Connection, **extra: Any) -> dict:
        now = time.time()
        context = {
            "routeKey": route, "eventType": event_type, "messageDirection": "IN", "stage": self.stage,
            "connectedAt": int(connection.connected_at * 1000), "requestTimeEpoch": int(now * 1000),
            "requestTime": datetime.fromtimestamp(now, timezone.utc).strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "requestId": uuid.uuid4().hex[:16], "extendedRequestId": uuid.uuid4().hex[:16],
            "domainName": f"{LOOPBACK}:{self.port}", "connectionId": connection.id, "apiId": self.api_id,
            "identity": {"sourceIp": connection.source_ip, "userAgent": connection.user_agent,
                         **connection.identity},
            **extra}
        if connection.authorizer is not None:
            context["authorizer"] = connection.authorizer
        return context

    def _next_process(self) -> int:
        """Round-robin, so consecutive events land on different processes."""
        with self._lock:
            process = self._turn % len(self.invokers)
            self._turn += 1
        return process

    def _invoke(self, route: str, connection_id: str, event: dict) -> tuple[int, InvokeResult]:
        dispatch = Dispatch(route, connection_id, self._next_process())
        self.dispatches.append(dispatch)
        result = self.invokers[dispatch.process](event)
        dispatch.ok = result.ok
        return dispatch.process, result

    async def _connect(self, socket, request):
        """The handshake: auth, then `$connect`; a Response refuses the connection."""
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        connection = Connection(id=base64.b64encode(os.urandom(11)).decode(), socket=socket,
                                connected_at=time.time(), source_ip=socket.remote_address[0],
                                user_agent=headers.get("user-agent", ""))
        authorization = headers.get("authorization", "")
        if self.auth == "jwt":
            scheme, _, token = authorization.partition(" ")
            claims = _jwt_claims(token.strip()) if scheme.lower() == "bearer" else None
            if claims is None:
                return socket.respond(401, '{"message":"Unauthorized"}\n')
            connection.authorizer = {"principalId": str(claims.get("sub", "")),
                                     **{k: _claim_string(v) for k, v in claims.items()}}
        elif self.auth == "iam":
            caller = _iam_caller(authorization, self.account_id)
            if caller is None:
                return socket.respond(403, '{"message":"Forbidden"}\n')
            connection.identity = {"accessKey": caller["accessKey"], "accountId": caller["accountId"],
                                   "caller": caller["callerId"], "user": caller["userId"],
                                   "userArn": caller["userArn"]}
        query = urlsplit(request.path).query
        event = {"headers": dict(request.headers.raw_items()),
                 "multiValueHeaders": {k: [v] for k, v in request.headers.raw_items()},
                 "requestContext": self._context("$connect", "CONNECT", connection),
                 "isBase64Encoded": False}
        if query:
            event["queryStringParameters"] = dict(parse_qsl(query))
        _, result = await asyncio.get_running_loop().run_in_executor(None, self._invoke, "$connect",
                                                                     connection.id, event)
        status = result.payload.get("statusCode", 200) if result.ok and isinstance(result.payload, dict) else 500
        if not 200 <= int(status) < 300:
            return socket.respond(int(status), '{"message":"Forbidden"}\n' if status == 403 else
                                  '{"message":"Internal server error"}\n')
        socket.devstack_connection = connection
        with self._lock:
            self.connections[connection.id] = connection
        return None

    async def _session(self, socket) -> None:
        from websockets.exceptions import ConnectionClosed

        connection: Connection = socket.devstack_connection
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()
        if not self._busy:
            self._busy = [asyncio.Semaphore(1) for _ in self.invokers]
        try:
            async for message in socket:
                connection.last_active = time.time()
                if not isinstance(message, str):
                    await socket.close(CLOSE_UNSUPPORTED_DATA, "Binary frames are not supported")
                    break
                event = {"requestContext": self._context("$default", "MESSAGE", connection,
                                                         messageId=uuid.uuid4().hex[:16]),
                         "body": message, "isBase64Encoded": False}
                task = asyncio.create_task(self._message(loop, socket, connection, event))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except ConnectionClosed:
            pass
        finally:
            for task in list(pending):
                await asyncio.gather(task, return_exceptions=True)
            with self._lock:
                self.connections.pop(connection.id, None)
            code = socket.close_code or 1006
            event = {"headers": {}, "requestContext": self._context(
                "$disconnect", "DISCONNECT", connection, disconnectStatusCode=code,
                disconnectReason=socket.close_reason or ""), "isBase64Encoded": False}
            await loop.run_in_executor(None, self._invoke, "$disconnect", connection.id, event)

    async def _message(self, loop, socket, connection: Connection, event: dict) -> None:
        dispatch = Dispatch("$default", connection.id, self._next_process())
        async with self._busy[dispatch.process]:
            self.dispatches.append(dispatch)
            result = await loop.run_in_executor(None, self.invokers[dispatch.process], event)
        dispatch.ok = result.ok
        if not result.ok:
            try:
                await socket.send(json.dumps({"message": "Internal server error", "connectionId": connection.id,
                                              "requestId": event["requestContext"]["requestId"]}))
            except Exception:  # noqa: BLE001 - the client is gone
                pass

    # -- the management API --------------------------------------------------------------------------
    def post(self, connection_id: str, data: bytes) -> int:
        connection = self.connections.get(connection_id)
        if connection is None:
            return 410
        if len(data) > self.max_message_bytes:
            return 413
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        future = asyncio.run_coroutine_threadsafe(connection.socket.send(text if text is not None else data),
                                                  self._loop)
        try:
            future.result(10)
        except Exception:  # noqa: BLE001 - closed meanwhile
            return 410
        return 200

    def close(self, connection_id: str) -> int:
        connection = self.connections.get(connection_id)
        if connection is None:
            return 410
        asyncio.run_coroutine_threadsafe(connection.socket.close(1000, "Goodbye"), self._loop).result(10)
        return 204


class _ManagementHandler(RequestHandler):
    server_version = "devstack-apigatewaymanagementapi"

    def _connection_id(self) -> str | None:
        path = unquote(urlsplit(self.path).path)
        marker = "/@connections/"
        return path.split(marker, 1)[1] if marker in path else None

    def _error(self, status: int, kind: str, message: str) -> None:
        self.reply(status, {"message": message}, [("x-amzn-ErrorType", kind)])

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        connection_id = self._connection_id()
        body = self.read_body(limit=self.owner.max_message_bytes + 1) or b""
        status = self.owner.post(connection_id, body) if connection_id else 410
        if status == 200:
            self.reply(200, b"", content_type=None)
        elif status == 413:
            self._error(413, "PayloadTooLargeException", "Message too long")
        else:
            self._error(410, "GoneException", f"connection {connection_id} is gone")

    def do_GET(self) -> None:  # noqa: N802
        connection = self.owner.connections.get(self._connection_id() or "")
        if connection is None:
            self._error(410, "GoneException", "connection is gone")
            return
        def iso(t: float) -> str:
            return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.reply(200, {"connectedAt": iso(connection.connected_at),
                         "lastActiveAt": iso(connection.last_active or connection.connected_at),
                         "identity": {"sourceIp": connection.source_ip, "userAgent": connection.user_agent}})

    def do_DELETE(self) -> None:  # noqa: N802
        status = self.owner.close(self._connection_id() or "")
        if status == 204:
            self.reply(204, b"", content_type=None)
        else:
            self._error(410, "GoneException", "connection is gone")
