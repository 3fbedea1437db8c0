"""HTTP requests as API Gateway HTTP API payload format 2.0 events, and a resolver's answer
back as HTTP: what the API Gateway stand-in (devstack) and `faceflow serve` both do in front of
the same resolver. Standard library only.

https://docs.aws.amazon.com/apigateway/latest/developerguide/http-api-develop-integrations-lambda.html
"""
from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable
from urllib.parse import parse_qsl

_TEXT_TYPES = re.compile(r"^(text/|application/(json|.*\+json|xml|.*\+xml|javascript|x-www-form-urlencoded|"
                         r"x-yaml|yaml|graphql)\b)", re.I)
# Headers the HTTP server in front sets itself.
HOP_BY_HOP = frozenset({"connection", "content-length", "transfer-encoding", "keep-alive", "date", "server"})


def is_text_content_type(content_type: str | None) -> bool:
    return bool(content_type) and bool(_TEXT_TYPES.match(content_type.strip()))


def new_request_id() -> str:
    return base64.b32encode(uuid.uuid4().bytes[:10]).decode().rstrip("=")


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
    request_id = request_id or new_request_id()
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


def response_parts(payload: dict) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) of a format 2.0 response dict (one with statusCode); ValueError
    for one API Gateway could not turn into HTTP."""
    try:
        status = int(payload["statusCode"])
    except (TypeError, ValueError):
        raise ValueError("statusCode is not a number") from None
    headers = [(str(k).lower(), str(v)) for k, v in (payload.get("headers") or {}).items()
               if str(k).lower() not in HOP_BY_HOP]
    for name, values in (payload.get("multiValueHeaders") or {}).items():
        headers.extend((str(name).lower(), str(v)) for v in values if str(name).lower() not in HOP_BY_HOP)
    headers.extend(("set-cookie", str(c)) for c in payload.get("cookies") or [])
    body = payload.get("body")
    if body is None:
        data = b""
    elif payload.get("isBase64Encoded"):
        try:
            data = base64.b64decode(body)
        except (ValueError, TypeError):
            raise ValueError("body is not base64") from None
    else:
        data = body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode()
    return status, headers, data
