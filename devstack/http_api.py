"""An API Gateway HTTP API stand-in: HTTP requests in, payload format 2.0 events to the api
function, its response back out as HTTP.

https://docs.aws.amazon.com/apigateway/latest/developerguide/http-api-develop-integrations-lambda.html

Request → event:
- version "2.0", routeKey ("$default" unless routes are given), rawPath, rawQueryString,
  headers with lower-case names (repeated headers joined with ","; the Cookie header moves to
  `cookies`), queryStringParameters (repeated keys joined with ","; absent without a query),
  pathParameters (only with routes), requestContext (accountId, apiId, domainName,
  domainPrefix, http {method, path, protocol, sourceIp, userAgent}, requestId, routeKey,
  stage "$default", time, timeEpoch), and the body: text for text content types
  (text/*, JSON, XML, JavaScript, form-urlencoded) with isBase64Encoded false, base64 with
  isBase64Encoded true for everything else (images, multipart, no content type). No body: no
  "body" key.
- Bodies over 10 MB get 413 without invoking. An event over Lambda's 6 MB invoke limit (a
  body over ~4.5 MB once base64-encoded) gets 413 too.
- With routes (e.g. "GET /v1/jobs/{id}", as template.yaml declares them) a request that matches
  none gets 404 {"message": "Not Found"}; a match sets routeKey and pathParameters. Without
  routes every request goes to the "$default" route.
- auth="jwt": a request needs "Authorization: Bearer <JWT>"; the token is decoded but NOT
  verified (a dev stack) and its claims appear as requestContext.authorizer.jwt.claims
  (values as strings, as API Gateway passes them) and .scopes; no token or an expired one
  gets 401 {"message": "Unauthorized"}.
- auth="iam": a request needs a SigV4 Authorization header (see `sigv4_headers`); the signature
  is NOT checked, the access key id becomes the caller: requestContext.authorizer.iam with
  accessKey, accountId, callerId, userId and userArn "arn:aws:iam::ACCOUNT:user/ACCESS_KEY".
  No or another kind of Authorization gets 403 {"message": "Forbidden"}.

Response (format 2.0): a dict with statusCode gives status, headers, cookies (Set-Cookie each)
and body (base64-decoded when isBase64Encoded); any other valid JSON is a 200 application/json
with that JSON as the body. A function error is 500 {"message": "Internal Server Error"}, a
function timeout 503 {"message": "Service Unavailable"}. Every response has apigw-requestid.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl

from .httpd import LoopbackServer, RequestHandler
from .runtime_api import InvokeResult

log = logging.getLogger("devstack.http_api")

MAX_BODY_BYTES = 10 * 1024 * 1024
_TEXT_TYPES = re.compile(r"^(text/|application/(json|.*\+json|xml|.*\+xml|javascript|x-www-form-urlencoded|"
                         r"x-yaml|yaml|graphql)\b)", re.I)
_HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive", "date", "server"}


def is_text_content_type(content_type: str | None) -> bool:
    return bool(content_type) and bool(_TEXT_TYPES.match(content_type.strip()))


def make_jwt(sub: str, **claims: Any) -> str:
    """An unsigned JWT for the stand-in's auth="jwt" mode (it decodes, never verifies)."""
    def b64(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    payload = {"sub": sub, "iat": int(time.time()), "exp": int(time.time()) + 3600, **claims}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


def sigv4_headers(method: str, url: str, body: bytes = b"", headers: dict | None = None, *,
                  access_key: str = "testing", secret_key: str = "testing", region: str = "us-east-1") -> dict:
    """`headers` plus a SigV4 signature for execute-api, as an IAM-authorised caller sends them."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    SigV4Auth(Credentials(access_key, secret_key), "execute-api", region).add_auth(request)
    return dict(request.headers.items())


def _iam_caller(authorization: str, account_id: str) -> dict | None:
    scheme, _, rest = authorization.partition(" ")
    if scheme != "AWS4-HMAC-SHA256":
        return None
    credential = next((part.strip()[len("Credential="):] for part in rest.split(",")
                       if part.strip().startswith("Credential=")), "")
    access_key = credential.split("/")[0]
    if not access_key:
        return None
    return {"accessKey": access_key, "accountId": account_id, "callerId": access_key, "cognitoIdentity": None,
            "principalOrgId": None, "userArn": f"arn:aws:iam::{account_id}:user/{access_key}", "userId": access_key}


def _jwt_claims(token: str) -> dict | None:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    if not isinstance(claims, dict):
        return None
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and exp < time.time():
        return None
    return claims


def _claim_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(_claim_string(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


class Route:
    """"METHOD /path/{param}/{rest+}" (METHOD may be ANY)."""

    def __init__(self, key: str):
        self.key = key
        method, _, path = key.partition(" ")
        self.method = method.upper()
        pattern = ""
        for part in re.split(r"(\{[^}]+\})", path):
            if part.startswith("{") and part.endswith("+}"):
                pattern += f"(?P<{part[1:-2]}>.+)"
            elif part.startswith("{"):
                pattern += f"(?P<{part[1:-1]}>[^/]+)"
            else:
                pattern += re.escape(part)
        self.regex = re.compile(f"^{pattern}$")

    def match(self, method: str, path: str) -> dict | None:
        if self.method not in ("ANY", method.upper()):
            return None
        found = self.regex.match(path)
        return found.groupdict() if found else None


def build_event(method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                source_ip: str = "127.0.0.1", route_key: str = "$default", path_parameters: dict | None = None,
                authorizer: dict | None = None, api_id: str = "devstack", account_id: str = "123456789012",
                request_id: str | None = None) -> dict:
    """The payload 2.0 event for one HTTP request (`target` is the request line's path?query)."""
    raw_path, _, raw_query = target.partition("?")
    joined: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        name = name.lower()
        if name == "cookie":
            cookies.extend(c.strip() for c in value.split(";") if c.strip())
            continue
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    host = joined.get("host", f"{api_id}.execute-api.us-east-1.amazonaws.com")
    request_id = request_id or base64.b32encode(uuid.uuid4().bytes[:10]).decode().rstrip("=")
    now = datetime.now(timezone.utc)
    joined.setdefault("x-forwarded-for", source_ip)
    joined.setdefault("x-forwarded-port", host.rpartition(":")[2] if ":" in host else "80")
    joined.setdefault("x-forwarded-proto", "http")
    joined.setdefault("x-amzn-trace-id", f"Root=1-{int(now.timestamp()):08x}-{uuid.uuid4().hex[:24]}")
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": raw_path or "/",
        "rawQueryString": raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = joined
    if raw_query:
        params: dict[str, str] = {}
        for key, value in parse_qsl(raw_query, keep_blank_values=True):
            params[key] = f"{params[key]},{value}" if key in params else value
        event["queryStringParameters"] = params
    context: dict[str, Any] = {
        "accountId": account_id,
        "apiId": api_id,
        "domainName": host,
        "domainPrefix": host.split(".")[0].split(":")[0],
        "http": {"method": method.upper(), "path": raw_path or "/", "protocol": "HTTP/1.1",
                 "sourceIp": source_ip, "userAgent": joined.get("user-agent", "")},
        "requestId": request_id,
        "routeKey": route_key,
        "stage": "$default",
        "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
        "timeEpoch": int(now.timestamp() * 1000),
    }
    if authorizer is not None:
        context["authorizer"] = authorizer
    event["requestContext"] = context
    if path_parameters:
        event["pathParameters"] = path_parameters
    if body:
        content_type = joined.get("content-type")
        text = None
        if is_text_content_type(content_type):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        if text is not None:
            event["body"], event["isBase64Encoded"] = text, False
        else:
            event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode("ascii"), True
    else:
        event["isBase64Encoded"] = False
    return event


def convert_response(result: InvokeResult) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) that API Gateway returns for an invocation result."""
    def error(status: int, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
        return status, [("content-type", "application/json")], json.dumps({"message": message}).encode()

    if not result.ok:
        if result.error_type == "Sandbox.Timedout":
            return error(503, "Service Unavailable")
        if result.error_type == "RequestTooLargeException":
            return error(413, "Request Entity Too Large")
        return error(500, "Internal Server Error")
    payload = result.payload
    if isinstance(payload, dict) and "statusCode" in payload:
        try:
            status = int(payload["statusCode"])
        except (TypeError, ValueError):
            return error(500, "Internal Server Error")
        headers = [(str(k).lower(), str(v)) for k, v in (payload.get("headers") or {}).items()
                   if str(k).lower() not in _HOP_BY_HOP]
        for name, values in (payload.get("multiValueHeaders") or {}).items():
            headers.extend((str(name).lower(), str(v)) for v in values if str(name).lower() not in _HOP_BY_HOP)
        headers.extend(("set-cookie", str(c)) for c in payload.get("cookies") or [])
        body = payload.get("body")
        if body is None:
            data = b""
        elif payload.get("isBase64Encoded"):
            try:
                data = base64.b64decode(body)
            except (ValueError, TypeError):
                return error(500, "Internal Server Error")
        else:
            data = body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode()
        return status, headers, data
    if not result.raw and payload is None:
        return error(500, "Internal Server Error")
    return 200, [("content-type", "application/json")], result.raw


class _Handler(RequestHandler):
    """Clients' side of the HTTP API (the owner is the HttpApi)."""
    server_version = "devstack-http-api"

    def _too_large(self) -> bool:
        try:
            return int(self.headers.get("Content-Length") or 0) > self.owner.max_body_bytes
        except ValueError:
            return False

    def handle_expect_100(self) -> bool:
        if self._too_large():
            self._reply(413, [("content-type", "application/json")], b'{"message":"Request Entity Too Large"}',
                        request_id="-", close=True)
            return False
        return super().handle_expect_100()

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, *, request_id: str,
               close: bool = False) -> None:
        self.reply(status, body, [*headers, ("apigw-requestid", request_id)], content_type=None, close=close)

    def _handle(self) -> None:
        api = self.owner
        body = self.read_body(api.max_body_bytes)
        if body is None:
            self._reply(413, [("content-type", "application/json")], b'{"message":"Request Entity Too Large"}',
                        request_id="-", close=True)
            return
        status, headers, data, request_id = api.handle(self.command, self.path, list(self.headers.items()), body,
                                                       self.client_address[0])
        self._reply(status, headers, data, request_id=request_id)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle  # noqa: N815

    def __getattr__(self, name: str) -> Any:
        # any other method (TRACE, QUERY, ...) goes to the routes too: API Gateway answers a
        # method no route has with its 404, never with http.server's 501
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)


class HttpApi:
    """The HTTP API in front of `invoke(event) -> InvokeResult`."""

    def __init__(self, invoke: Callable[[dict], InvokeResult], *, routes: Iterable[str] | None = None,
                 auth: str = "none", max_body_bytes: int = MAX_BODY_BYTES, account_id: str = "123456789012",
                 public_routes: Iterable[str] = ()):
        if auth not in ("none", "jwt", "iam"):
            raise ValueError("auth must be 'none', 'jwt' or 'iam'")
        self.invoke = invoke
        self.routes = [Route(r) for r in routes] if routes else None
        self.auth = auth
        self.public_routes = set(public_routes)  # route keys without an authorizer (the page)
        self.max_body_bytes = max_body_bytes
        self.account_id = account_id
        self.requests = 0
        self._server = LoopbackServer(_Handler, self, "http-api")

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    def handle(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
               source_ip: str) -> tuple[int, list[tuple[str, str]], bytes, str]:
        self.requests += 1
        request_id = base64.b32encode(uuid.uuid4().bytes[:10]).decode().rstrip("=")
        json_type = [("content-type", "application/json")]
        route_key, path_parameters = "$default", None
        if self.routes is not None:
            path = target.partition("?")[0]
            for route in self.routes:
                found = route.match(method, path)
                if found is not None:
                    route_key, path_parameters = route.key, found
                    break
            else:
                return 404, json_type, b'{"message":"Not Found"}', request_id
        authorizer = None
        authorization = next((v for k, v in headers if k.lower() == "authorization"), "")
        public = route_key in self.public_routes
        if self.auth == "iam" and not public:
            caller = _iam_caller(authorization, self.account_id)
            if caller is None:
                return 403, json_type, b'{"message":"Forbidden"}', request_id
            authorizer = {"iam": caller}
        elif self.auth == "jwt" and not public:
            scheme, _, token = authorization.partition(" ")
            claims = _jwt_claims(token.strip()) if scheme.lower() == "bearer" else None
            if claims is None:
                return 401, json_type + [("www-authenticate", "Bearer")], b'{"message":"Unauthorized"}', request_id
            scopes = claims.get("scope") or claims.get("scp")
            authorizer = {"jwt": {"claims": {k: _claim_string(v) for k, v in claims.items()},
                                  "scopes": scopes.split() if isinstance(scopes, str) else scopes}}
        event = build_event(method, target, headers, body, source_ip=source_ip, route_key=route_key,
                            path_parameters=path_parameters, authorizer=authorizer,
                            account_id=self.account_id, request_id=request_id)
        result = self.invoke(event)
        if not result.ok:
            log.info("http api: %s %s -> function error %s", method, target, result.error_type)
        status, out_headers, data = convert_response(result)
        return status, out_headers, data, request_id
