"""Stream session chunks (`sessions/{session_id}/{seq}.mp4|.ts` in the input bucket), strictly
in order per session: functions.common.streams. Events: events/session_chunk.json (S3), or
those S3 notifications in SQS messages (recommended: Lambda's own async retries are two, a
minute or more apart; partial batch failures bring an early chunk back in seconds).
"""
from __future__ import annotations

from functools import partial

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.typing import LambdaContext

from faceflow.engine import Engine
from functions.common.aws import make_tracer
from functions.common.streams import ChunkNotReady, in_seq_order, process_session_chunk, process_sqs_record, s3_records

logger = Logger(service="faceflow-video")
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

engine = Engine()  # models load once per execution environment, at init


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics(capture_cold_start_metric=True)
def session_chunk_handler(event: dict, context: LambdaContext) -> dict:
    """SQS event: {"batchItemFailures": [...]}. S3 event: the results, or ChunkNotReady (the
    async invocation is retried) once every chunk that was ready has run."""
    records = event.get("Records") or []
    if records and records[0].get("eventSource") == "aws:sqs":
        return process_partial_response(event=in_seq_order(event), processor=processor, context=context,
                                        record_handler=partial(process_sqs_record, engine))
    results, not_ready = [], []
    for bucket, key in s3_records(event):
        try:
            results.append(process_session_chunk(engine, bucket, key, context))
        except ChunkNotReady as exc:
            not_ready.append(str(exc))
    if not_ready:
        raise ChunkNotReady("; ".join(not_ready))
    return {"results": results}
