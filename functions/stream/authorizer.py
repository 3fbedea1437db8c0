"""The WebSocket API's `$connect` authorizer when AuthMode is JWT (a Lambda REQUEST
authorizer: WebSocket APIs have no JWT authorizer of their own). It checks the bearer token as
the HTTP API's JWT authorizer does: signed by a key of the issuer's JWKS (found through its
OpenID discovery document), `iss` the issuer, not expired, and `aud` (or an access token's
`client_id`) one of the audiences. Allowed: the claims reach the stream function as
requestContext.authorizer (strings). Refused: "Unauthorized", which API Gateway answers with
401 before any stream state exists.

| variable | meaning |
|---|---|
| FACEFLOW_JWT_ISSUER | the issuer URL (template.yaml's JwtIssuer) |
| FACEFLOW_JWT_AUDIENCE | accepted audiences, comma separated (JwtAudience) |
"""
from __future__ import annotations

import json
import os
import urllib.request
from functools import cache

import jwt
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

logger = Logger(service="faceflow-stream-authorizer")

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
LEEWAY_S = 30                  # clock skew between the issuer and Lambda
DISCOVERY = "/.well-known/openid-configuration"


class Refused(Exception):
    """The token is missing or not acceptable (why, for the log only)."""


def handler(event: dict, context: LambdaContext) -> dict:
    try:
        claims = verify(_bearer(event.get("headers") or {}), os.environ["FACEFLOW_JWT_ISSUER"],
                        [a for a in os.environ.get("FACEFLOW_JWT_AUDIENCE", "").split(",") if a])
    except Refused as exc:
        logger.info("connection refused", extra={"reason": str(exc)})  # never the token itself
        raise Exception("Unauthorized") from None  # the exact message API Gateway turns into 401
    return {"principalId": str(claims["sub"]),
            "policyDocument": {"Version": "2012-10-17", "Statement": [
                {"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": event["methodArn"]}]},
            "context": {k: v if isinstance(v, str) else json.dumps(v) for k, v in claims.items()}}


def verify(token: str, issuer: str, audiences: list[str]) -> dict:
    """The token's claims, or Refused."""
    if not token:
        raise Refused("no bearer token")
    try:
        key = _keys(issuer).get_signing_key_from_jwt(token).key
        claims = jwt.decode(token, key, algorithms=ALGORITHMS, issuer=issuer, leeway=LEEWAY_S,
                            options={"verify_aud": False, "require": ["exp", "iss", "sub"]})
    except (jwt.PyJWTError, OSError, ValueError) as exc:
        raise Refused(f"{type(exc).__name__}: {exc}") from None
    audience = claims.get("aud") or claims.get("client_id")  # an access token has client_id instead
    given = audience if isinstance(audience, list) else [audience]
    if not any(a in audiences for a in given):
        raise Refused("audience not accepted")
    return claims


@cache
def _keys(issuer: str) -> jwt.PyJWKClient:
    """The issuer's key set, from its discovery document (once per environment; PyJWKClient
    refetches the set when a token names a key it does not know)."""
    # The operator's own issuer (from the template), over HTTPS: the subnets need a route to it.
    with urllib.request.urlopen(issuer.rstrip("/") + DISCOVERY, timeout=5) as response:  # noqa: S310
        jwks_uri = json.load(response)["jwks_uri"]
    return jwt.PyJWKClient(jwks_uri, cache_keys=True, lifespan=3600, timeout=5)


def _bearer(headers: dict) -> str:
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
