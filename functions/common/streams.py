"""Stream sessions, chunk by chunk: `sessions/{session_id}/{seq}.mp4|.ts` in the input bucket.

Chunks of a session run strictly in order, each from the tracker state the previous one left
(functions.common.sessions): a chunk whose predecessor is not done, or that another worker is
running, raises ChunkNotReady (retryable: Lambda retries, SQS redelivers); a repeat returns the
stored result without writing. Through SQS a chunk that came too early is made visible again
after a few seconds (FACEFLOW_NOT_READY_DELAY_S, doubling per receive) rather than after the
queue's visibility timeout. Outputs (functions.common.layout): the anonymised chunk, its
report, and the state checkpoint a lost Redis is rebuilt from.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes.s3_event import S3Event
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from faceflow import chunks
from faceflow.images import BadInput

from .aws import make_tracer
from .layout import SESSION_KEY, s3_uri, session_keys
from .sessions import BUSY, COMMITTED, DUPLICATE, NOT_YET
from .videoruntime import runtime

logger = Logger(service="faceflow-video", child=True)
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")

MAX_RETRY_DELAY_S = 30


class ChunkNotReady(RuntimeError):
    """Retryable: the chunk's predecessor is not done yet, or another worker holds it."""


@tracer.capture_method
def process_session_chunk(engine, bucket: str, raw_key: str, context) -> dict[str, Any]:
    """One chunk from its S3 object (`raw_key` as S3 events carry it, URL-encoded)."""
    key = unquote_plus(raw_key)
    match = SESSION_KEY.match(key)
    if bucket != runtime.settings.input_bucket or match is None:
        # Only session chunks in the input bucket may trigger work (never a result).
        logger.error("not a session chunk of the input bucket; ignored")
        metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
        return {"status": "ignored"}
    sid, seq, ext = match["sid"], int(match["seq"]), match["ext"]
    logger.append_keys(session_id=sid, seq=seq)  # ids only: no faces or pixels in logs
    claim = runtime.sessions.claim(sid, seq, runtime.lock_ms(context))
    if claim.restored:
        logger.warning("session rebuilt from its S3 checkpoints", extra={"next_seq": claim.next_seq})
        metrics.add_metric(name="SessionsRestored", unit=MetricUnit.Count, value=1)
    if claim.status == DUPLICATE:  # already done: the stored result, nothing written
        metrics.add_metric(name="ChunksDuplicate", unit=MetricUnit.Count, value=1)
        logger.info("chunk already done")
        return {"status": "duplicate", "session_id": sid, "seq": seq, "result": claim.result}
    if claim.status in (NOT_YET, BUSY):
        metrics.add_metric(name="ChunksNotReady", unit=MetricUnit.Count, value=1)
        logger.info("chunk not ready", extra={"claim": claim.status, "next_seq": claim.next_seq})
        raise ChunkNotReady(f"session {sid} chunk {seq}: {claim.status} (next is {claim.next_seq})")
    start = time.perf_counter()
    try:
        try:
            result, new_state = _run(engine, bucket, key, sid, seq, ext, claim.state)
        except BadInput as exc:
            # An undecodable chunk would block the session for good: it is skipped (no output
            # for it, the state passes through unchanged) and its result says why.
            logger.warning("chunk refused", extra={"reason": str(exc)})
            metrics.add_metric(name="ChunksFailed", unit=MetricUnit.Count, value=1)
            result, new_state = {"session_id": sid, "seq": seq, "status": "failed", "error": str(exc)}, claim.state
    except BaseException:
        runtime.sessions.release(claim)
        raise
    done = runtime.sessions.commit(claim, new_state, result)
    ms = round((time.perf_counter() - start) * 1000, 1)
    metrics.add_metric(name="ChunkMs", unit=MetricUnit.Milliseconds, value=ms)
    metrics.add_metric(name="ChunksDone", unit=MetricUnit.Count, value=1)
    logger.info("chunk done", extra={"commit": done.status, "ms": ms, "frames": result.get("frames")})
    return {"status": result["status"] if done.status == COMMITTED else "duplicate", "session_id": sid,
            "seq": seq, "result": result}


def _run(engine, bucket, key, sid, seq, ext, state):
    out_key, report_key = session_keys(sid, seq, ext)
    with tempfile.TemporaryDirectory(prefix="faceflow-") as tmp:
        src, dst, report = Path(tmp) / f"in{ext}", Path(tmp) / f"out{ext}", Path(tmp) / "report.json"
        runtime.download(bucket, key, src)
        summary, new_state = chunks.process_chunk(engine, src, dst, state, report=report,
                                                  names=(s3_uri(bucket, key), runtime.output_uri(out_key)))
        runtime.upload(dst, out_key)
        runtime.upload(report, report_key, "application/json")
    result = {"session_id": sid, "seq": seq, "status": "done", "output": runtime.output_uri(out_key),
              "report": runtime.output_uri(report_key), "frames": summary.get("frames"),
              "faces": summary.get("faces")}
    return result, new_state


def s3_records(event: dict) -> list[tuple[str, str]]:
    """(bucket, raw key) of each record of an S3 event. The raw, URL-encoded key: Powertools'
    `.key` is decoded already, and process_session_chunk decodes once."""
    return [(r.s3.bucket.name, r.s3.get_object["key"]) for r in S3Event(event).records]


def process_sqs_record(engine, record: SQSRecord, lambda_context=None) -> None:
    """An S3 notification delivered through SQS: its chunks, or ChunkNotReady after the
    message was set to come back soon. (BatchProcessor passes the context by this name.)"""
    body = json.loads(record.body)
    if body.get("Event") == "s3:TestEvent":  # sent once when the notification is configured
        metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
        return
    try:
        for bucket, key in s3_records(body):
            process_session_chunk(engine, bucket, key, lambda_context)
    except ChunkNotReady:
        retry_soon(record)
        raise


def retry_soon(record: SQSRecord) -> None:
    """A chunk that came before its predecessor is due again in seconds, not after the
    queue's visibility timeout (which must exceed the function timeout): its visibility is
    cut to FACEFLOW_NOT_READY_DELAY_S, doubling with each receive up to 30 s. Best effort:
    if this fails the message still comes back, later."""
    receives = int(record.attributes.approximate_receive_count or 1)
    delay = min(MAX_RETRY_DELAY_S, int(runtime.video.not_ready_delay_s * 2 ** min(receives - 1, 5)))
    try:
        runtime.sqs.change_message_visibility(QueueUrl=runtime.queue_url(record.event_source_arn),
                                              ReceiptHandle=record.receipt_handle, VisibilityTimeout=delay)
    except Exception:  # noqa: BLE001 - the redelivery happens anyway
        logger.warning("could not shorten the chunk message's visibility", exc_info=True)


def in_seq_order(event: dict) -> dict:
    """The SQS event with its records sorted by (session, seq), so a batch holding chunks k
    and k+1 runs k first."""
    return {**event, "Records": sorted(event.get("Records") or [], key=_seq_order)}


def _seq_order(record: dict) -> tuple:
    try:
        key = unquote_plus(json.loads(record["body"])["Records"][0]["s3"]["object"]["key"])
        match = SESSION_KEY.match(key)
        return (match["sid"], int(match["seq"])) if match else ("", -1)
    except (KeyError, IndexError, TypeError, ValueError):
        return ("", -1)
