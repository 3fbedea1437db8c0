"""The WebSocket API's routes (API Gateway, Lambda proxy integration): `$connect` opens a
stream's state, `$default` takes one frame message and posts the reply to the connection
through the API Gateway Management API, `$disconnect` drops the state (functions.stream.service;
the protocol: faceflow.stream). Events: events/stream_connect.json, stream_frame.json,
stream_disconnect.json.
"""
from __future__ import annotations

import base64
import os
from functools import cache

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config

from faceflow import stream
from faceflow.engine import Engine
from functions.common.aws import Adapters, make_tracer
from functions.stream.connections import SAVED, ConnectionStore
from functions.stream.service import StreamService, StreamSettings, waited_ms

logger = Logger(service="faceflow-stream")
tracer = make_tracer("faceflow-stream")
metrics = Metrics(namespace="faceflow", service="faceflow-stream")

adapters = Adapters()
settings = StreamSettings.from_env()
engine = Engine()  # models load once per execution environment, at init (provisioned concurrency)
# What became of a frame, by reply type.
_FRAME_METRICS = {stream.RESULT: "FramesProcessed", stream.DROP: "FramesDropped", stream.ERROR: "FramesRefused"}

service = StreamService(stream.StreamProcessor(engine), ConnectionStore(adapters.redis, settings.ttl_s), settings)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # replies hold frames: not into traces
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict, context: LambdaContext) -> dict:
    request = event["requestContext"]
    route, connection_id = request["routeKey"], request["connectionId"]
    logger.append_keys(connection_id=connection_id, route=route)  # ids only: no faces or pixels
    if route == "$connect":
        service.connect(connection_id)
        metrics.add_metric(name="StreamsOpened", unit=MetricUnit.Count, value=1)
    elif route == "$disconnect":
        service.disconnect(connection_id)
        metrics.add_metric(name="StreamsClosed", unit=MetricUnit.Count, value=1)
    else:
        body = event.get("body") or ""
        if event.get("isBase64Encoded"):
            body = base64.b64decode(body)
        handled = service.message(connection_id, body, lambda text: _post(request, connection_id, text),
                                  waited_ms(request.get("requestTimeEpoch")))
        reply = handled.reply
        metrics.add_metric(name=_FRAME_METRICS[reply["type"]], unit=MetricUnit.Count, value=1)
        if handled.reset:
            metrics.add_metric(name="StreamResets", unit=MetricUnit.Count, value=1)
            logger.warning("stream state was lost", extra={"reset": handled.reset})
        if handled.stored != SAVED:
            metrics.add_metric(name="StreamStateConflicts", unit=MetricUnit.Count, value=1)
        if reply["type"] != stream.RESULT:
            logger.info("frame not processed", extra={"reason": reply.get("reason") or reply.get("code")})
    return {"statusCode": 200}


def _post(request: dict, connection_id: str, text: str) -> None:
    client = _management(f"https://{request['domainName']}/{request['stage']}")
    try:
        client.post_to_connection(ConnectionId=connection_id, Data=text.encode())
    except client.exceptions.GoneException:
        logger.info("connection gone before its reply")
        service.disconnect(connection_id)


@cache
def _management(endpoint: str):
    """The Management API client for the API's own endpoint; AWS_ENDPOINT_URL_APIGATEWAYMANAGEMENTAPI
    (boto3's own variable; devstack sets it) points it elsewhere."""
    config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2, read_timeout=5)
    if os.environ.get("AWS_ENDPOINT_URL_APIGATEWAYMANAGEMENTAPI"):
        return boto3.client("apigatewaymanagementapi", config=config)
    return boto3.client("apigatewaymanagementapi", endpoint_url=endpoint, config=config)
