"""Chunks of a whole video, from the chunk queue (events/video_chunk_sqs.json: SQS batches of
`{"job_id", "index"}`, partial batch failures): each processed once with its neighbours, and
the worker that completes the last one merges the job (functions.common.videojobs).
"""
from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from faceflow.engine import Engine
from functions.common.aws import make_tracer
from functions.common.videojobs import chunk_message, process_job_chunk

logger = Logger(service="faceflow-video")
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

engine = Engine()  # models load once per execution environment, at init


def record_handler(record: SQSRecord, lambda_context: LambdaContext | None = None) -> dict:
    message = chunk_message(record.body)
    if message is None:
        # A malformed message never succeeds: logged and dropped rather than redelivered.
        logger.error("malformed chunk message; dropped")
        metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
        return {"status": "ignored"}
    return process_job_chunk(engine, *message, lambda_context)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics(capture_cold_start_metric=True)
def chunk_worker_handler(event: dict, context: LambdaContext) -> dict:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor,
                                    context=context)
