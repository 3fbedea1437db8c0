"""Video at scale: stream sessions chunk by chunk, and whole videos split, fanned out, merged.

Handlers (one container image, one handler per function):

* `session_chunk_handler`: an S3 event (direct, or wrapped in SQS messages by an S3 → SQS
  notification) for `sessions/{session_id}/{seq}.mp4|.ts` in the input bucket. Chunks of a
  session run strictly in order, each from the tracker state the previous one left
  (functions.common.sessions): a chunk whose predecessor is not done, or that another worker
  is running, fails retryably (Lambda retries / SQS redelivers it later); a repeat returns the
  stored result without writing. Through SQS (recommended: Lambda's own async retries are
  two, a minute or more apart), a chunk that came too early is made visible again after a
  few seconds (FACEFLOW_NOT_READY_DELAY_S, doubling per receive) and its batch item fails;
  records of one batch run in (session, seq) order. Writes to the output bucket:
  `sessions/{sid}/{seq}.{ext}` (anonymised chunk), `sessions/{sid}/{seq}.json` (frame report),
  `sessions/{sid}/{seq}.state.json` (the state checkpoint a lost Redis is rebuilt from).
* `split_handler`: an S3 event for a whole video under `uploads/` in the input bucket (the job
  id comes from the key, as for photos). Cuts it on keyframes into chunks of about
  FACEFLOW_CHUNK_SECONDS (no re-encode), stores them with the audio and the plan under
  `work/{job_id}/` in the output bucket, records the chunk count, and sends one SQS message
  `{"job_id", "index"}` per chunk to FACEFLOW_CHUNK_QUEUE_URL.
* `chunk_worker_handler`: SQS batches of those messages (partial batch failures). Each chunk
  is processed with the chunk(s) before it as tracker warm-up and the next one as look-ahead
  (faceflow.chunks), written to `work/{job_id}/out/` (chunk, then its report), and counted
  once (a SET of done indexes; a chunk already counted is not processed again). The worker that completes
  the last chunk runs the merge in-process: it is a remux of already-encoded chunks plus the
  original audio, seconds of work, and running it here needs no second queue or cold start;
  if it fails, the message fails, and its redelivery merges again (the merge lease is freed).
* `merge_handler`: the merge on its own, for replays: `{"job_id": ..., "force": false}`.
  Output: `results/{job_id}/{name}` and `results/{job_id}/{name}.json`; the job record says
  `done` only after both are written (each S3 PUT is atomic: a reader never sees a partial
  object), so the record is the completion signal.
* Routing (faceflow.routing, layers/routing.json or FACEFLOW_ROUTING_FILE): before a whole video
  is split, split_handler routes it from its facts (duration and height from a probe, the
  object's size, `faceflow-sensitivity` / `faceflow-priority` from the object's tags or the
  job record's `sensitivity` / `priority`). A "gpu" decision (only when FACEFLOW_GPU_ENDPOINT is
  set) submits the job to the SageMaker async endpoint (functions.common.gpu) with its output
  at `results/{job_id}/{name}`, records stage `gpu` and the rule (`route`), and splits nothing.
* `gpu_result_handler`: the endpoint's success/error SNS notifications → the job record
  (`done` with its outputs, or `failed` with the error).

Every output key is a function of the input (job id, chunk index, session and seq), so a rerun
rewrites the same objects with the same bytes.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache, cached_property
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.s3_event import S3Event
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config

from faceflow import chunks
from faceflow.engine import Engine
from faceflow.images import BadInput
from botocore.exceptions import ClientError

from faceflow import media, routing
from functions.common import gpu
from functions.common.aws import Adapters, job_for_key, make_tracer, object_identity, result_keys
from functions.common.jobs import DONE, FAILED, RUNNING
from functions.common.sessions import (
    BUSY, COMMITTED, DUPLICATE, NOT_YET, S3Checkpoints, SessionStore, VideoJobs,
)
from functions.common.settings import UPLOAD_PREFIX

from .config import VideoSettings

logger = Logger(service="faceflow-video")
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow", service="faceflow-video")

SESSION_PREFIX = "sessions/"   # input bucket: stream chunks in; output bucket: results out
WORK_PREFIX = "work/"          # output bucket: a whole video's chunks, audio, plan, processed chunks
SESSION_KEY = re.compile(r"^sessions/(?P<sid>[A-Za-z0-9][A-Za-z0-9._-]{0,127})/"
                         r"(?P<seq>0|[1-9][0-9]{0,8})(?P<ext>\.mp4|\.ts)$")
VIDEO_TYPES = media.VIDEO_MEDIA_TYPES


class ChunkNotReady(RuntimeError):
    """Retryable: the chunk's predecessor is not done yet, or another worker holds it."""


class Runtime:
    """What every invocation reuses, built at init: adapters, stores, engine."""

    def __init__(self):
        self.adapters = Adapters()
        self.settings = self.adapters.settings
        self.video = VideoSettings.from_env()
        self.checkpoints = S3Checkpoints(self.adapters.s3, self.settings.output_bucket, SESSION_PREFIX)
        self.sessions = SessionStore(self.adapters.redis, self.video.session_ttl_s, self.checkpoints)
        self.video_jobs = VideoJobs(self.adapters.redis, self.settings.job_ttl_s,
                                    job_prefix=self.adapters.jobs.prefix)

    @property
    def s3(self):
        return self.adapters.s3

    @property
    def jobs(self):
        return self.adapters.jobs

    @cached_property
    def sagemaker(self):
        return boto3.client("sagemaker-runtime", config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    @cached_property
    def sqs(self):
        return boto3.client("sqs", config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    @cache
    def queue_url(self, arn: str) -> str:
        """arn:aws:sqs:REGION:ACCOUNT:NAME → the queue's URL (asked once per queue)."""
        _, _, _, _, account, name = arn.split(":", 5)
        return self.sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]


runtime = Runtime()
engine = Engine()  # models load once per execution environment, at init


def _lock_ms(context: LambdaContext | None) -> int:
    """A lock or lease outlives the invocation that holds it by the margin, never more: a
    worker killed mid-chunk (timeout, OOM) frees it by itself."""
    remaining = context.get_remaining_time_in_millis() if context is not None else 900_000
    return max(1000, int(remaining) + runtime.video.lock_margin_ms)


def _upload(path: Path, key: str, content_type: str) -> None:
    runtime.s3.upload_file(str(path), runtime.settings.output_bucket, key,
                           ExtraArgs={"ContentType": content_type})


def _s3_uri(key: str) -> str:
    return f"s3://{runtime.settings.output_bucket}/{key}"


def _name_report(path: Path, source: str, output: str) -> None:
    """The report names the S3 objects, not the worker's temporary files."""
    report = json.loads(path.read_text())
    report["source"] = source
    if isinstance(report.get("summary"), dict):
        report["summary"].update(source=source, output=output)
    path.write_text(json.dumps(report))


# --- stream sessions ------------------------------------------------------------------------

def session_keys(session_id: str, seq: int, ext: str) -> tuple[str, str]:
    """(anonymised chunk, report) in the output bucket; the checkpoint is S3Checkpoints.key."""
    base = f"{SESSION_PREFIX}{session_id}/{seq}"
    return base + ext, base + ".json"


@tracer.capture_method
def process_session_chunk(bucket: str, raw_key: str, context: LambdaContext | None) -> dict[str, Any]:
    key = unquote_plus(raw_key)
    match = SESSION_KEY.match(key)
    if bucket != runtime.settings.input_bucket or match is None:
        # Only session chunks in the input bucket may trigger work (never a result).
        logger.error("not a session chunk of the input bucket; ignored")
        metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
        return {"status": "ignored"}
    sid, seq, ext = match["sid"], int(match["seq"]), match["ext"]
    logger.append_keys(session_id=sid, seq=seq)  # ids only: no faces or pixels in logs
    claim = runtime.sessions.claim(sid, seq, _lock_ms(context))
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
            result, new_state = _run_session_chunk(bucket, key, sid, seq, ext, claim.state)
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


def _run_session_chunk(bucket, key, sid, seq, ext, state):
    out_key, report_key = session_keys(sid, seq, ext)
    with tempfile.TemporaryDirectory(prefix="faceflow-") as tmp:
        src, dst, report = Path(tmp) / f"in{ext}", Path(tmp) / f"out{ext}", Path(tmp) / "report.json"
        _download(bucket, key, src)
        summary, new_state = chunks.process_chunk(engine, src, dst, state, report=report)
        _name_report(report, f"s3://{bucket}/{key}", _s3_uri(out_key))
        _upload(dst, out_key, VIDEO_TYPES[ext])
        _upload(report, report_key, "application/json")
    result = {"session_id": sid, "seq": seq, "status": "done", "output": _s3_uri(out_key),
              "report": _s3_uri(report_key), "frames": summary.get("frames"), "faces": summary.get("faces")}
    return result, new_state


def _session_records(event: dict) -> list[tuple[str, str]]:
    # the raw, URL-encoded key (Powertools' `.key` is decoded already: never decode twice)
    return [(r.s3.bucket.name, r.s3.get_object["key"]) for r in S3Event(event).records]


def _session_sqs_record(record: SQSRecord, lambda_context: LambdaContext | None = None) -> None:
    body = json.loads(record.body)
    if body.get("Event") == "s3:TestEvent":  # sent once when the notification is configured
        metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
        return
    try:
        for bucket, key in _session_records(body):
            process_session_chunk(bucket, key, lambda_context)
    except ChunkNotReady:
        _retry_soon(record)
        raise


def _retry_soon(record: SQSRecord) -> None:
    """A chunk that came before its predecessor is due again in seconds, not after the
    queue's visibility timeout (which must exceed the function timeout): its visibility is
    cut to FACEFLOW_NOT_READY_DELAY_S, doubling with each receive up to 30 s. Best effort:
    if this fails the message still comes back, later."""
    receives = int(record.attributes.approximate_receive_count or 1)
    delay = min(30, int(runtime.video.not_ready_delay_s * 2 ** min(receives - 1, 5)))
    try:
        runtime.sqs.change_message_visibility(QueueUrl=runtime.queue_url(record.event_source_arn),
                                              ReceiptHandle=record.receipt_handle, VisibilityTimeout=delay)
    except Exception:  # noqa: BLE001 - the redelivery happens anyway
        logger.warning("could not shorten the chunk message's visibility", exc_info=True)


_session_batch = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


def _seq_order(record: dict) -> tuple:
    """Batch records sorted by (session, seq), so a batch holding k and k+1 runs k first."""
    try:
        key = unquote_plus(json.loads(record["body"])["Records"][0]["s3"]["object"]["key"])
        match = SESSION_KEY.match(key)
        return (match["sid"], int(match["seq"])) if match else ("", -1)
    except (KeyError, IndexError, TypeError, ValueError):
        return ("", -1)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics(capture_cold_start_metric=True)
def session_chunk_handler(event: dict, context: LambdaContext) -> dict:
    """S3 event: results, or raises ChunkNotReady (the async invocation is retried).
    SQS event (S3 notifications through a queue): {"batchItemFailures": [...]}."""
    records = event.get("Records") or []
    if records and records[0].get("eventSource") == "aws:sqs":
        event = {**event, "Records": sorted(records, key=_seq_order)}
        return process_partial_response(event=event, record_handler=_session_sqs_record,
                                        processor=_session_batch, context=context)
    results, not_ready = [], []
    for bucket, key in _session_records(event):
        try:
            results.append(process_session_chunk(bucket, key, context))
        except ChunkNotReady as exc:  # the others still run; the event is retried as a whole
            not_ready.append(str(exc))
    if not_ready:
        raise ChunkNotReady("; ".join(not_ready))
    return {"results": results}


# --- whole videos: split ------------------------------------------------------------------------

def work_keys(job_id: str) -> dict[str, str]:
    base = f"{WORK_PREFIX}{job_id}/"
    return {"base": base, "plan": base + "plan.json", "chunks": base + "chunks/", "out": base + "out/"}


def chunk_key(job_id: str, index: int, ext: str) -> str:
    return f"{work_keys(job_id)['chunks']}{index:05d}{ext}"


def out_keys(job_id: str, index: int, ext: str) -> tuple[str, str]:
    base = f"{work_keys(job_id)['out']}{index:05d}"
    return base + ext, base + ".json"


@tracer.capture_method
def split_upload(upload: dict) -> dict[str, Any]:
    job_id, name = job_for_key(upload["bucket"], upload["key"], upload["version"])
    logger.append_keys(job_id=job_id)
    jobs = runtime.jobs
    existing = jobs.get(job_id)
    if (existing and existing["status"] == DONE) or runtime.video_jobs.merged(job_id):
        logger.info("video already done; repeat event ignored")
        metrics.add_metric(name="JobsDuplicate", unit=MetricUnit.Count, value=1)
        return {"job_id": job_id, "status": DONE}
    if existing and existing["status"] == RUNNING and existing.get("stage") == GPU_STAGE:
        logger.info("video already submitted to the GPU endpoint; repeat event ignored")
        metrics.add_metric(name="JobsDuplicate", unit=MetricUnit.Count, value=1)
        return {"job_id": job_id, "status": RUNNING, "target": "gpu"}
    if not runtime.video.chunk_queue_url:
        raise RuntimeError("missing configuration: FACEFLOW_CHUNK_QUEUE_URL")
    input_uri = f"s3://{upload['bucket']}/{upload['key']}"
    jobs.put(job_id, RUNNING, input=input_uri, stage="split")
    start = time.perf_counter()
    keys = work_keys(job_id)
    suffix = Path(name).suffix.lower() or ".mp4"
    with tempfile.TemporaryDirectory(prefix="faceflow-") as tmp:
        src = Path(tmp) / f"source{suffix}"
        try:
            size = _download(upload["bucket"], upload["key"], src)
            decision = route_video(upload, src, size, existing)
            if decision.target == "gpu":
                return submit_to_gpu(job_id, name, input_uri, decision)
            jobs.put(job_id, RUNNING, route=decision.rule_name, route_target=decision.target)
            split = chunks.split_video(src, Path(tmp) / "chunks", target_seconds=runtime.video.chunk_seconds)
        except BadInput as exc:
            jobs.put(job_id, FAILED, error=str(exc))
            metrics.add_metric(name="JobsFailed", unit=MetricUnit.Count, value=1)
            logger.warning("video refused", extra={"reason": str(exc)})
            return {"job_id": job_id, "status": FAILED, "error": str(exc)}
        plan_chunks = []
        for chunk in split.chunks:
            path = Path(chunk.path)
            key = chunk_key(job_id, chunk.index, path.suffix)
            _upload(path, key, VIDEO_TYPES.get(path.suffix, "application/octet-stream"))
            plan_chunks.append({**chunk.to_dict(), "path": None, "key": key})
        audio_key = None
        if split.audio:
            audio = Path(split.audio)
            audio_key = f"{keys['base']}audio{audio.suffix}"
            _upload(audio, audio_key, "application/octet-stream")
    plan = {"job_id": job_id, "name": name, "source": f"s3://{upload['bucket']}/{upload['key']}",
            "chunks": plan_chunks, "audio": audio_key, "info": split.info}
    runtime.s3.put_object(Bucket=runtime.settings.output_bucket, Key=keys["plan"],
                          Body=json.dumps(plan).encode(), ContentType="application/json")
    total = len(plan_chunks)
    runtime.video_jobs.plan(job_id, total, _s3_uri(keys["plan"]))
    jobs.put(job_id, RUNNING, stage="chunks")
    _dispatch(job_id, total)
    ms = round((time.perf_counter() - start) * 1000, 1)
    metrics.add_metric(name="VideoChunks", unit=MetricUnit.Count, value=total)
    logger.info("video split", extra={"chunks": total, "ms": ms})
    return {"job_id": job_id, "status": RUNNING, "chunks": total}


def _download(bucket: str, key: str, dst: Path) -> int:
    """An input video (a whole upload or a stream chunk), size-checked before it is read.
    Returns its size in bytes."""
    limit = runtime.video.max_video_bytes
    length = runtime.s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    if length > limit:
        raise BadInput(f"video too large: {length} bytes (limit {limit})")
    runtime.s3.download_file(bucket, key, str(dst))
    return int(length)


# --- whole videos: routing ----------------------------------------------------------------------

GPU_STAGE = "gpu"
PRIORITY_TAG = "faceflow-priority"
# The API's sensitivity words (functions/api/app.py) → faceflow.routing's
_API_SENSITIVITY = {"normal": "standard"}


def object_tags(bucket: str, key: str) -> dict[str, str]:
    """The object's tags; none when the function may not read them (AccessDenied) or the
    object has none."""
    try:
        tagset = runtime.s3.get_object_tagging(Bucket=bucket, Key=key).get("TagSet") or []
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in ("AccessDenied", "AccessDeniedException", "NoSuchTagSet", "NotImplemented"):
            raise
        logger.warning("object tags not readable; routed without them", extra={"code": code})
        return {}
    return {str(t.get("Key", "")).strip().lower(): str(t.get("Value", "")) for t in tagset}


def job_facts(upload: dict, src: Path, size: int, job: dict | None) -> dict[str, Any]:
    """The facts faceflow.routing decides on. Sensitivity: `private` from either the object's
    tag or the job record wins; an unknown tag value fails closed to private (routing's rule)."""
    facts: dict[str, Any] = {"operation": "anonymize", "media": "video", "size_bytes": size}
    try:
        from faceflow.video import probe
        info = probe(src)
        facts.update(duration_s=max(0.0, float(info.duration or 0.0)) or None,
                     width=int(info.width) or None, height=int(info.height) or None)
    except Exception:  # noqa: BLE001 - an unreadable video is refused by the split, as before
        logger.warning("video probe failed; routed without duration or size", exc_info=True)
    tags = object_tags(upload["bucket"], upload["key"])
    job = job or {}
    candidates = [tags.get(routing.SENSITIVITY_TAG), job.get("sensitivity")]
    candidates = [_API_SENSITIVITY.get(str(c).strip().lower(), c) for c in candidates if c not in (None, "")]
    if candidates:
        normalised = [routing.normalise_sensitivity(c)[0] for c in candidates]
        facts["sensitivity"] = "private" if "private" in normalised else candidates[0]
    for priority in (tags.get(PRIORITY_TAG), job.get("priority")):
        if priority and str(priority).strip().lower() in routing.PRIORITIES:
            facts["priority"] = str(priority).strip().lower()
            break
    return facts


def route_video(upload: dict, src: Path, size: int, job: dict | None) -> routing.Decision:
    facts = job_facts(upload, src, size, job)
    try:
        decision = routing.route(facts, gpu_available=gpu.enabled())
    except routing.RoutingError as exc:  # a broken rule table must not send media anywhere new
        logger.error("routing failed; the video stays on Lambda", extra={"reason": str(exc)})
        metrics.add_metric(name="RoutingErrors", unit=MetricUnit.Count, value=1)
        return routing.Decision("lambda", "routing-error", str(exc))
    logger.info("video routed", extra={"rule": decision.rule_name, "target": decision.target})
    metrics.add_metric(name="RoutedToGpu" if decision.target == "gpu" else "RoutedToLambda",
                       unit=MetricUnit.Count, value=1)
    return decision


@tracer.capture_method
def submit_to_gpu(job_id: str, name: str, input_uri: str, decision: routing.Decision) -> dict[str, Any]:
    """Queue the whole video on the GPU endpoint; its answer comes back through
    gpu_result_handler. Nothing is split."""
    video_key, report_key = result_keys(job_id, output_name(name))
    sub = gpu.submit(job_id, input_uri, _s3_uri(video_key), report_uri=_s3_uri(report_key),
                     request_bucket=runtime.settings.output_bucket, s3=runtime.s3, runtime=runtime.sagemaker)
    runtime.jobs.put(job_id, RUNNING, stage=GPU_STAGE, route=decision.rule_name, route_target=decision.target,
                     **sub.job_fields())
    metrics.add_metric(name="JobsSubmittedToGpu", unit=MetricUnit.Count, value=1)
    logger.info("video submitted to the GPU endpoint", extra={"rule": decision.rule_name})
    return {"job_id": job_id, "status": RUNNING, "target": "gpu", "route": decision.rule_name}


def _dispatch(job_id: str, total: int) -> None:
    url = runtime.video.chunk_queue_url
    for first in range(0, total, 10):
        entries = [{"Id": str(i), "MessageBody": json.dumps({"job_id": job_id, "index": i})}
                   for i in range(first, min(first + 10, total))]
        reply = runtime.sqs.send_message_batch(QueueUrl=url, Entries=entries)
        if reply.get("Failed"):
            raise RuntimeError(f"{len(reply['Failed'])} chunk messages were not queued")


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics(capture_cold_start_metric=True)
def split_handler(event: dict, context: LambdaContext) -> dict:
    results = []
    for record in S3Event(event).records:
        logger.set_correlation_id((record.get("responseElements") or {}).get("x-amz-request-id"))
        key = unquote_plus(record.s3.get_object["key"])
        if record.s3.bucket.name != runtime.settings.input_bucket or not key.startswith(UPLOAD_PREFIX):
            logger.error("event from outside the input bucket's uploads; ignored")
            metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
            results.append({"status": "ignored"})
            continue
        obj = record.s3.get_object
        upload = object_identity(record.s3.bucket.name, obj["key"], obj.version_id, obj.etag)
        results.append(split_upload(upload))
    return {"results": results}


# --- whole videos: chunks ---------------------------------------------------------------------

JOB_ID = media.JOB_ID


def load_plan(job_id: str) -> dict[str, Any]:
    obj = runtime.s3.get_object(Bucket=runtime.settings.output_bucket, Key=work_keys(job_id)["plan"])
    return json.loads(obj["Body"].read())


def recover_job(job_id: str, plan: dict) -> tuple[int, str, list[int]]:
    """The done set rebuilt from S3 after Redis lost it: a chunk is done once its report is
    written (the report goes up after the chunk)."""
    prefix = work_keys(job_id)["out"]
    done = []
    for page in runtime.s3.get_paginator("list_objects_v2").paginate(
            Bucket=runtime.settings.output_bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            stem = item["Key"][len(prefix):]
            if stem.endswith(".json") and stem[:-5].isdigit():
                done.append(int(stem[:-5]))
    return len(plan["chunks"]), _s3_uri(work_keys(job_id)["plan"]), sorted(done)


@tracer.capture_method
def process_job_chunk(job_id: str, index: int, context: LambdaContext | None) -> dict[str, Any]:
    logger.append_keys(job_id=job_id, chunk=index)
    plan = load_plan(job_id)
    if not 0 <= index < len(plan["chunks"]):
        raise ValueError(f"chunk {index} is not in the plan of {len(plan['chunks'])}")
    job = runtime.jobs.get(job_id)
    if job is not None and job["status"] == FAILED:
        logger.info("job failed already; chunk skipped")
        metrics.add_metric(name="ChunksSkipped", unit=MetricUnit.Count, value=1)
        return {"job_id": job_id, "index": index, "status": FAILED}
    status = "duplicate"
    if not runtime.video_jobs.is_done(job_id, index):
        try:
            _run_job_chunk(job_id, index, plan)
        except BadInput as exc:
            runtime.jobs.put(job_id, FAILED, error=f"chunk {index}: {exc}")
            metrics.add_metric(name="JobsFailed", unit=MetricUnit.Count, value=1)
            logger.warning("chunk refused", extra={"reason": str(exc)})
            return {"job_id": job_id, "index": index, "status": FAILED}
        status = "done"
    else:
        metrics.add_metric(name="ChunksDuplicate", unit=MetricUnit.Count, value=1)
    done = runtime.video_jobs.chunk_done(job_id, index, _lock_ms(context),
                                         recover=lambda: recover_job(job_id, plan))
    logger.info("chunk counted", extra={"done": done.done, "total": done.total, "added": done.added})
    if done.merge:
        merge_job(job_id, plan, done.token)
        status = "merged"
    return {"job_id": job_id, "index": index, "status": status, "chunks_done": done.done,
            "chunks_total": done.total}


def neighbours(plan: dict, index: int) -> tuple[list[int], int | None]:
    """The chunks a chunk's worker also reads: those before it that hold the warm-up frames
    (the tracker state at the boundary, rebuilt), and the next one (look-ahead, so its last
    frames get the boxes one pass over the whole video would give)."""
    need = chunks.warmup_frames(float(plan["info"]["fps"]))
    before, have = [], 0
    for k in range(index - 1, -1, -1):
        before.insert(0, k)
        have += int(plan["chunks"][k]["frames"])
        if have >= need:
            break
    return before, index + 1 if index + 1 < len(plan["chunks"]) else None


def _run_job_chunk(job_id: str, index: int, plan: dict) -> None:
    start = time.perf_counter()
    entry = plan["chunks"][index]
    ext = Path(entry["key"]).suffix
    out_key, report_key = out_keys(job_id, index, ext)
    bucket = runtime.settings.output_bucket
    before, after = neighbours(plan, index)
    with tempfile.TemporaryDirectory(prefix="faceflow-") as tmp:
        tmp = Path(tmp)

        def fetch(k: int) -> Path:
            key = plan["chunks"][k]["key"]
            path = tmp / f"chunk-{k}{Path(key).suffix}"
            runtime.s3.download_file(bucket, key, str(path))
            return path

        src = fetch(index)
        warmup = [fetch(k) for k in before] or None
        lookahead = fetch(after) if after is not None else None
        dst, report = tmp / f"out{ext}", tmp / "report.json"
        chunk = chunks.Chunk.from_dict({**entry, "path": str(src)})
        summary, _ = chunks.process_chunk(engine, chunk, dst, None, warmup=warmup, lookahead=lookahead,
                                          info=plan["info"], report=report)
        _name_report(report, _s3_uri(entry["key"]), _s3_uri(out_key))
        _upload(dst, out_key, VIDEO_TYPES.get(ext, "application/octet-stream"))
        _upload(report, report_key, "application/json")  # last: its presence means done
    ms = round((time.perf_counter() - start) * 1000, 1)
    metrics.add_metric(name="ChunkMs", unit=MetricUnit.Milliseconds, value=ms)
    metrics.add_metric(name="ChunksDone", unit=MetricUnit.Count, value=1)
    logger.info("chunk done", extra={"ms": ms, "frames": summary.get("frames")})


# --- whole videos: merge ------------------------------------------------------------------------

def output_name(name: str) -> str:
    """The result keeps the upload's name where its container holds H.264 as it is."""
    path = Path(name)
    return name if path.suffix.lower() in media.VIDEO_OUTPUT_EXTENSIONS else path.stem + ".mp4"


@tracer.capture_method
def merge_job(job_id: str, plan: dict, token: str | None) -> dict[str, Any]:
    """Merge the processed chunks with the original audio into results/{job_id}/{name}. The
    caller holds the merge lease (`token`); it is released on failure so a retry can merge."""
    start = time.perf_counter()
    bucket = runtime.settings.output_bucket
    try:
        with tempfile.TemporaryDirectory(prefix="faceflow-") as tmp:
            tmp = Path(tmp)
            paths, report_paths, downloads = [], [], []
            for entry in plan["chunks"]:
                for key, names in zip(out_keys(job_id, entry["index"], Path(entry["key"]).suffix),
                                      (paths, report_paths)):
                    names.append(tmp / Path(key).name)
                    downloads.append((key, names[-1]))
            audio = tmp / Path(plan["audio"]).name if plan.get("audio") else None
            if audio is not None:
                downloads.append((plan["audio"], audio))
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda kv: runtime.s3.download_file(bucket, kv[0], str(kv[1])), downloads))
            reports = [json.loads(path.read_text()) for path in report_paths]
            name = output_name(plan["name"])
            dst = tmp / "final" / name
            dst.parent.mkdir()
            summary = chunks.merge_chunks(paths, dst, audio=audio, info=plan.get("info"))
            report = {"job_id": job_id, **chunks.merge_reports(reports), "source": name}
            video_key, report_key = result_keys(job_id, name)
            _upload(dst, video_key, VIDEO_TYPES.get(Path(name).suffix.lower(), "application/octet-stream"))
            runtime.s3.put_object(Bucket=bucket, Key=report_key, Body=json.dumps(report).encode(),
                                  ContentType="application/json")
    except BadInput as exc:
        runtime.jobs.put(job_id, FAILED, error=f"merge: {exc}")
        runtime.video_jobs.merge_finished(job_id, token)  # the same data would fail again
        metrics.add_metric(name="JobsFailed", unit=MetricUnit.Count, value=1)
        logger.warning("merge refused", extra={"reason": str(exc)})
        return {"job_id": job_id, "status": FAILED, "error": str(exc)}
    except BaseException:
        runtime.video_jobs.merge_failed(job_id, token)
        raise
    ms = round((time.perf_counter() - start) * 1000, 1)
    outputs = {"video": _s3_uri(video_key), "report": _s3_uri(report_key)}
    rsum = report.get("summary", {})
    runtime.jobs.put(job_id, DONE, outputs=outputs, stage="merged", frames=summary.get("frames"),
                     faces=rsum.get("faces"), merge_ms=ms)
    runtime.video_jobs.merge_finished(job_id, token)
    metrics.add_metric(name="JobsDone", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="MergeMs", unit=MetricUnit.Milliseconds, value=ms)
    logger.info("video merged", extra={"ms": ms, "frames": summary.get("frames")})
    return {"job_id": job_id, "status": DONE, "outputs": outputs}


_chunk_batch = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


def _chunk_record(record: SQSRecord, lambda_context: LambdaContext | None = None) -> dict[str, Any]:
    message = json.loads(record.body)
    job_id, index = message.get("job_id"), message.get("index")
    if not isinstance(job_id, str) or not JOB_ID.match(job_id) or not isinstance(index, int) or index < 0:
        # A malformed message never succeeds: logged and dropped rather than redelivered.
        logger.error("malformed chunk message; dropped")
        metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
        return {"status": "ignored"}
    return process_job_chunk(job_id, index, lambda_context)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics(capture_cold_start_metric=True)
def chunk_worker_handler(event: dict, context: LambdaContext) -> dict:
    return process_partial_response(event=event, record_handler=_chunk_record,
                                    processor=_chunk_batch, context=context)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics
def merge_handler(event: dict, context: LambdaContext) -> dict:
    """Run (or, with "force", re-run) a job's merge: `{"job_id": "...", "force": false}`."""
    job_id = event.get("job_id")
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise ValueError("event must be {\"job_id\": <32 hex>}")
    logger.append_keys(job_id=job_id)
    status, token = runtime.video_jobs.start_merge(job_id, _lock_ms(context), bool(event.get("force")))
    if token is None:
        metrics.add_metric(name="MergesSkipped", unit=MetricUnit.Count, value=1)
        return {"job_id": job_id, "status": status}
    return merge_job(job_id, load_plan(job_id), token)


# --- GPU results -------------------------------------------------------------------------------

@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics
def gpu_result_handler(event: dict, context: LambdaContext) -> dict:
    """SNS event from the GPU endpoint's success or error topic: each SageMaker async
    notification becomes its job's update (done with outputs, or failed with the error). A
    record that is not such a notification is logged and dropped (a retry would not help); an
    S3 or Redis error raises, and Lambda retries the event (updates are idempotent)."""
    results = []
    for record in event.get("Records") or []:
        try:
            update = gpu.update_from_notification(record, s3=runtime.s3)
        except gpu.GpuError as exc:
            logger.error("not a GPU endpoint notification; dropped", extra={"reason": str(exc)})
            metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
            results.append({"status": "ignored"})
            continue
        job_id, status = update.pop("job_id", None), update.pop("status")
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            logger.error("GPU notification without a job id of ours; dropped")
            metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
            results.append({"status": "ignored"})
            continue
        logger.append_keys(job_id=job_id)
        runtime.jobs.put(job_id, status, **update)
        metrics.add_metric(name="JobsDone" if status == DONE else "JobsFailed", unit=MetricUnit.Count, value=1)
        logger.info("GPU result recorded", extra={"status": status})
        results.append({"job_id": job_id, "status": status})
    return {"results": results}
