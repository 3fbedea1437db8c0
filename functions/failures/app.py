"""Failed work → its job marked `failed` with a reason a client can act on.

SQS records from Lambda's on-failure destination (the stills and split functions' S3 events
whose retries are spent) and from the chunk queues' dead-letter queues
(functions.common.failures reads them). A job that is done, or failed already with its own
reason (a refused upload), keeps its record. A stream session's chunk is skipped: committed
with a failed result and the state before it, as the session function does with a chunk it
cannot decode, so the chunks after it run. A record that is none of these is logged and
dropped (a retry would not help); a Redis error, or a session chunk another worker holds,
fails the record, and SQS brings it back.
"""
from __future__ import annotations

import json

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.common import failures
from functions.common.aws import Adapters, make_tracer
from functions.video.config import VideoSettings
from functions.common.sessions import BUSY, NOT_YET, S3Checkpoints, SessionStore, VideoJobs

logger = Logger(service="faceflow-failures")
tracer = make_tracer("faceflow-failures")
metrics = Metrics(namespace="faceflow", service="faceflow-failures")

adapters = Adapters()
_batch = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
SKIP_LOCK_MS = 30_000  # the function's timeout: a skip never outlives it


def _video_jobs() -> VideoJobs:
    return VideoJobs(adapters.redis, adapters.settings.job_ttl_s, job_prefix=adapters.jobs.prefix)


class SessionChunkBusy(RuntimeError):
    """A worker holds the session chunk right now, or the chunks before it are not settled
    yet: the record comes back later (skipping it now would lose its place in the session)."""


def _sessions() -> SessionStore:
    return SessionStore(adapters.redis, VideoSettings.from_env().session_ttl_s,
                        S3Checkpoints(adapters.s3, adapters.settings.output_bucket))


def _failures(body: object) -> list[failures.Failure]:
    kind = failures.classify(body)
    if kind == "async":
        return failures.from_destination_record(body)
    if kind == "chunk":
        return [failures.from_chunk_message(body, _video_jobs().progress(body["job_id"]))]
    if kind == "session-chunk":
        return failures.from_session_chunk(body)
    return []


def _record(record: SQSRecord) -> list[dict]:
    try:
        body = json.loads(record.body)
    except ValueError:
        body = None
    found = _failures(body)
    if not found:
        logger.error("not a failure record of ours; dropped")
        metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
        return []
    results = []
    for failure in found:
        extra = {"kind": failure.kind, **(failure.detail or {})}
        if failure.job_id is None:
            result = {**failure.detail, "status": "failed", "error": failure.reason}
            outcome = _sessions().skip(failure.detail["session_id"], failure.detail["seq"], result, SKIP_LOCK_MS)
            if outcome in (BUSY, NOT_YET):
                raise SessionChunkBusy(f"session chunk {failure.detail['seq']}: {outcome}")
            logger.error("session chunk failed", extra={**extra, "reason": failure.reason, "outcome": outcome})
            metrics.add_metric(name="SessionChunksFailed", unit=MetricUnit.Count, value=1)
            results.append({**extra, "status": outcome})
            continue
        kept = adapters.jobs.fail_unless_finished(failure.job_id, failure.reason, stage=failure.kind)
        if kept:
            logger.info("job already finished; failure not recorded", extra={**extra, "job_id": failure.job_id,
                                                                             "status": kept})
        else:
            logger.error("job failed", extra={**extra, "job_id": failure.job_id, "reason": failure.reason})
            metrics.add_metric(name="JobsFailed", unit=MetricUnit.Count, value=1)
        results.append({"job_id": failure.job_id, "status": kept or "failed"})
    return results


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def handler(event: dict, context: LambdaContext) -> dict:
    return process_partial_response(event=event, record_handler=_record, processor=_batch, context=context)
