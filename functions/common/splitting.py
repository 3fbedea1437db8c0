"""A whole video uploaded under `uploads/`: routed, then cut into chunks or sent to the GPU.

Routing (faceflow.routing, layers/routing.json or FACEFLOW_ROUTING_FILE) decides from the
video's facts: duration and frame size from a probe, the object's size, and sensitivity /
priority from the object's tags or the job record. A "gpu" decision (only when
FACEFLOW_GPU_ENDPOINT is set) submits the job to the SageMaker async endpoint
(functions.common.gpu) with its output at `results/{job_id}/{name}`, records stage `gpu` and
the rule (`route`), and splits nothing; its answer comes back through the GPU result function.

Otherwise the video is cut on keyframes into chunks of about FACEFLOW_CHUNK_SECONDS (no
re-encode), stored with the audio and the plan under `work/{job_id}/` in the output bucket,
the chunk count recorded, and one SQS message `{"job_id", "index"}` per chunk sent to
FACEFLOW_CHUNK_QUEUE_URL for the chunk workers (functions.common.videojobs).

A video under the analysis prefix (`analyze/`, an API job with "operation": "analyze") is
analysed here, whole, and only its JSON report is written (`results/{job_id}/{name}.json`:
faces per frame, attributes on a sample of each track's faces, one summary per track), unless
a routing rule sends it to the GPU endpoint, which analyses too.

A video job created with an edited report (functions.common.review) is rendered here, whole:
exactly the report's faces, no detection, nothing split or routed.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from faceflow import chunks, media, routing
from faceflow.images import BadInput

from . import gpu
from .aws import job_for_key, make_tracer, operation_for_key
from .jobs import DONE, FAILED, RUNNING
from .layout import audio_key, chunk_key, face_key, result_keys, s3_uri, work_keys
from .review import edited_report
from .settings import ANALYZE, ANONYMIZE, SWAP
from .videojobs import output_name
from .videoruntime import runtime

logger = Logger(service="faceflow-video", child=True)
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")

GPU_STAGE = "gpu"          # the job record's stage while the GPU endpoint has the job
SQS_BATCH = 10             # SendMessageBatch takes at most ten messages
# Object tag errors that mean "no tags to route on" rather than a fault.
_NO_TAGS = ("AccessDenied", "AccessDeniedException", "NoSuchTagSet", "NotImplemented")


@tracer.capture_method
def split_upload(upload: dict) -> dict[str, Any]:
    """One upload ({"bucket", "key", "version"}, functions.common.aws.object_identity)."""
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
    input_uri = s3_uri(upload["bucket"], upload["key"])
    jobs.put(job_id, RUNNING, input=input_uri, stage="split", operation=operation_for_key(upload["key"]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faceflow-") as tmp:
        src = Path(tmp) / f"source{Path(name).suffix.lower() or '.mp4'}"
        try:
            size = runtime.download(upload["bucket"], upload["key"], src)
            operation = operation_for_key(upload["key"]) or ANONYMIZE
            edited = edited_report(existing) if operation == ANONYMIZE else None
            if edited is not None:
                return render_upload(job_id, name, src, edited, start)
            decision = route_video(upload, src, size, existing)
            if decision.target == "gpu":
                return submit_to_gpu(job_id, name, input_uri, decision, operation)
            if operation == ANALYZE:
                return analyze_upload(job_id, name, src, decision, start)
            jobs.put(job_id, RUNNING, route=decision.rule_name, route_target=decision.target)
            return chunk_video(job_id, name, input_uri, src, Path(tmp), start)
        except BadInput as exc:
            return refuse(job_id, exc)


def refuse(job_id: str, exc: Exception) -> dict[str, Any]:
    """The job failed for good with the reason (bad input: a retry would not help)."""
    runtime.jobs.put(job_id, FAILED, error=str(exc))
    metrics.add_metric(name="JobsFailed", unit=MetricUnit.Count, value=1)
    logger.warning("video refused", extra={"reason": str(exc)})
    return {"job_id": job_id, "status": FAILED, "error": str(exc)}


def chunk_video(job_id: str, name: str, input_uri: str, src: Path, tmp: Path, start: float,
                swap: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cut the downloaded video into chunks, store them, the audio and the plan under
    work/{job_id}/, and queue one message per chunk. `swap` (a swap job's {"face": the source
    photo's bytes, "suffix": its extension, "options"}): the photo is stored beside the chunks
    and the plan names it and the options for the chunk workers. BadInput when the video
    cannot be split (nothing is written)."""
    jobs = runtime.jobs
    keys = work_keys(job_id)
    split = chunks.split_video(src, tmp / "chunks", target_seconds=runtime.video.chunk_seconds)
    plan_chunks = []
    for chunk in split.chunks:
        path = Path(chunk.path)
        key = chunk_key(job_id, chunk.index, path.suffix)
        runtime.upload(path, key)
        plan_chunks.append({**chunk.to_dict(), "path": None, "key": key})
    audio = None
    if split.audio:
        audio = audio_key(job_id, Path(split.audio).suffix)
        runtime.upload(Path(split.audio), audio, "application/octet-stream")
    plan = {"job_id": job_id, "name": name, "source": input_uri, "chunks": plan_chunks, "audio": audio,
            "info": split.info}
    if swap is not None:
        face = face_key(job_id, swap["suffix"])
        runtime.s3.put_object(Bucket=runtime.settings.output_bucket, Key=face, Body=swap["face"],
                              ContentType=media.media_type_for(face))
        plan.update(operation=SWAP, swap={"source": face, "options": swap["options"]})
    runtime.put_json(keys["plan"], plan)
    total = len(plan_chunks)
    runtime.video_jobs.plan(job_id, total, runtime.output_uri(keys["plan"]))
    jobs.put(job_id, RUNNING, stage="chunks")
    dispatch(job_id, total)
    ms = round((time.perf_counter() - start) * 1000, 1)
    metrics.add_metric(name="VideoChunks", unit=MetricUnit.Count, value=total)
    logger.info("video split", extra={"chunks": total, "ms": ms})
    return {"job_id": job_id, "status": RUNNING, "chunks": total}


_engine = None


def analysis_engine():
    """The face engine, loaded on the first analysis job: splitting needs none."""
    global _engine
    if _engine is None:
        from faceflow.engine import Engine
        _engine = Engine()
    return _engine


@tracer.capture_method
def analyze_upload(job_id: str, name: str, src: Path, decision: routing.Decision, start: float) -> dict[str, Any]:
    """Analyse the whole video here and write its report only (no media)."""
    from faceflow.analysis import DEFAULT_ATTRIBUTES
    runtime.jobs.put(job_id, RUNNING, stage="analyze", route=decision.rule_name, route_target=decision.target)
    report = analysis_engine().analyze_file(src, DEFAULT_ATTRIBUTES)
    report = {"job_id": job_id, **report, "source": name}
    report["summary"]["source"] = name
    _, report_key = result_keys(job_id, name)
    runtime.put_json(report_key, report)
    outputs = {"report": runtime.output_uri(report_key)}
    ms = round((time.perf_counter() - start) * 1000, 1)
    runtime.jobs.put(job_id, DONE, stage="done", outputs=outputs, faces=report["summary"]["faces"], ms=ms)
    metrics.add_metric(name="JobsDone", unit=MetricUnit.Count, value=1)
    logger.info("video analysed", extra={"tracks": len(report["tracks"]), "ms": ms})
    return {"job_id": job_id, "status": DONE, "outputs": outputs}


@tracer.capture_method
def render_upload(job_id: str, name: str, src: Path, edited: dict, start: float) -> dict[str, Any]:
    """A job created with an edited report (faceflow.review): its faces rendered here, whole,
    with no detection (the engine loads only to follow boxes drawn by hand), never routed to
    the GPU endpoint; the video and the rendered report written as a merged job's are."""
    from faceflow import review
    runtime.jobs.put(job_id, RUNNING, stage="review")
    video_key, report_key = result_keys(job_id, output_name(name))
    with tempfile.TemporaryDirectory(prefix="faceflow-review-") as tmp:
        dst, rendered = Path(tmp) / output_name(name), Path(tmp) / "report.json"
        summary = review.render_video(analysis_engine() if review.follows(edited) else None, src, dst, edited,
                                      report_out=rendered)
        runtime.upload(dst, video_key)
        report = {"job_id": job_id, **json.loads(rendered.read_text()), "source": name}
    report["summary"]["source"] = name
    runtime.put_json(report_key, report)
    outputs = {"video": runtime.output_uri(video_key), "report": runtime.output_uri(report_key)}
    ms = round((time.perf_counter() - start) * 1000, 1)
    runtime.jobs.put(job_id, DONE, stage="done", outputs=outputs, frames=summary["frames"],
                     faces=summary["masked"], ms=ms)
    metrics.add_metric(name="JobsDone", unit=MetricUnit.Count, value=1)
    logger.info("edited report rendered", extra={"frames": summary["frames"], "ms": ms})
    return {"job_id": job_id, "status": DONE, "outputs": outputs}


def dispatch(job_id: str, total: int) -> None:
    """One chunk message per chunk, to the chunk workers' queue."""
    url = runtime.video.chunk_queue_url
    for first in range(0, total, SQS_BATCH):
        entries = [{"Id": str(i), "MessageBody": json.dumps({"job_id": job_id, "index": i})}
                   for i in range(first, min(first + SQS_BATCH, total))]
        reply = runtime.sqs.send_message_batch(QueueUrl=url, Entries=entries)
        if reply.get("Failed"):
            raise RuntimeError(f"{len(reply['Failed'])} chunk messages were not queued")


# --- routing --------------------------------------------------------------------------------------

def object_tags(bucket: str, key: str) -> dict[str, str]:
    """The object's tags (keys lowercased); none when the function may not read them
    (AccessDenied) or the object has none."""
    try:
        tagset = runtime.s3.get_object_tagging(Bucket=bucket, Key=key).get("TagSet") or []
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in _NO_TAGS:
            raise
        logger.warning("object tags not readable; routed without them", extra={"code": code})
        return {}
    return {str(t.get("Key", "")).strip().lower(): str(t.get("Value", "")) for t in tagset}


def job_facts(upload: dict, src: Path, size: int, job: dict | None, operation: str | None = None) -> dict[str, Any]:
    """The facts faceflow.routing decides on (routing.video_facts), from a probe of the
    downloaded video, its size, the object's tags and the job record; `operation` is the
    upload's prefix's unless given (a swap manifest's target)."""
    info = None
    try:
        from faceflow.video import probe
        info = probe(src)
    except Exception:  # noqa: BLE001 - an unreadable video is refused by the split, as before
        logger.warning("video probe failed; routed without duration or size", exc_info=True)
    return routing.video_facts(size, info, object_tags(upload["bucket"], upload["key"]), job,
                               operation=operation or operation_for_key(upload["key"]) or ANONYMIZE)


def route_video(upload: dict, src: Path, size: int, job: dict | None, operation: str | None = None) -> routing.Decision:
    facts = job_facts(upload, src, size, job, operation)
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
def submit_to_gpu(job_id: str, name: str, input_uri: str, decision: routing.Decision,
                  operation: str = ANONYMIZE, source_uri: str | None = None,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Queue the whole video on the GPU endpoint. Nothing is split; an analysis writes its
    report only; a swap names its source face photo (`source_uri`) and its `options`."""
    video_key, report_key = result_keys(job_id, output_name(name))
    if operation == ANALYZE:
        _, report_key = result_keys(job_id, name)
    sub = gpu.submit(job_id, input_uri, None if operation == ANALYZE else runtime.output_uri(video_key),
                     operation=operation, report_uri=runtime.output_uri(report_key), source_uri=source_uri,
                     options=options, request_bucket=runtime.settings.output_bucket, s3=runtime.s3,
                     runtime=runtime.sagemaker)
    runtime.jobs.put(job_id, RUNNING, stage=GPU_STAGE, route=decision.rule_name, route_target=decision.target,
                     **sub.job_fields())
    metrics.add_metric(name="JobsSubmittedToGpu", unit=MetricUnit.Count, value=1)
    logger.info("video submitted to the GPU endpoint", extra={"rule": decision.rule_name})
    return {"job_id": job_id, "status": RUNNING, "target": "gpu", "route": decision.rule_name}
