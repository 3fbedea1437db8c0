"""faceflow's local stack for development and tests, made of real processes:

- moto_server (S3, SQS, SNS, ...) and a Redis server on free loopback ports,
- the input and output buckets, template.yaml's queues (with their redrive policies) and
  topics, and the input bucket's s3:ObjectCreated:* notifications (template.yaml's filters),
- every function of template.yaml as `python -m awslambdaric HANDLER` talking to its own
  Lambda Runtime API stand-in (`runtime_api.RuntimeAPI`), restarted when it exits,
- the deliveries: S3 → stills and split as asynchronous invocations (retries, then the
  on-failure destination), SQS event source mappings (chunk worker, session chunks, the
  failure function), SNS → the GPU result function,
- an API Gateway HTTP API (payload 2.0) stand-in in front of the api function (template.yaml's
  routes; optional JWT or IAM caller identity),
- an API Gateway WebSocket API stand-in in front of the stream function's processes, with the
  `@connections` Management API its replies are posted to.

    from devstack import Stack
    with Stack() as stack:
        ...

`python -m devstack` runs it until Ctrl-C and prints the endpoints and env exports.
"""
from .events import normalize_s3_event, s3_event
from .functions import LambdaFunction
from .http_api import HttpApi, build_event, make_jwt, sigv4_headers
from .poller import AsyncPoller, Delivery, SqsEventSource, SqsS3Poller
from .procs import DevstackError, free_port
from .runtime_api import FunctionInitError, InvokeResult, RuntimeAPI
from .services import MotoServer, RedisServer, missing_tools
from .stack import Stack
from .websocket_api import WebSocketApi


def skip_reason() -> str | None:
    """Why the stack cannot run here (a missing redis-server or moto_server), or None."""
    problems = missing_tools()
    return "; ".join(problems) if problems else None


__all__ = ["Stack", "InvokeResult", "RuntimeAPI", "LambdaFunction", "HttpApi", "WebSocketApi", "SqsS3Poller", "AsyncPoller", "SqsEventSource", "Delivery",
           "MotoServer", "RedisServer", "DevstackError", "FunctionInitError", "build_event", "make_jwt", "sigv4_headers",
           "normalize_s3_event", "s3_event", "free_port", "missing_tools", "skip_reason"]
