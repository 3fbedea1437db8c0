"""An API Gateway HTTP API stand-in: HTTP requests in, payload format 2.0 events to the api
function, its response back out as HTTP.

https://docs.aws.amazon.com/apigateway/latest/developerguide/http-api-develop-integrations-lambda.html

The event and the response conversion are faceflow.web.events (`faceflow serve` uses them too).

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
from typing import Any, Callable, Iterable

from faceflow.web.events import build_event, new_request_id, response_parts

from .httpd import LoopbackServer, RequestHandler
from .runtime_api import InvokeResult

log = logging.getLogger("devstack.http_api")

MAX_BODY_BYTES = 10 * 1024 * 1024


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
            return response_parts(payload)
        except ValueError:
            return error(500, "Internal Server Error")
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
        request_id = new_request_id()
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
