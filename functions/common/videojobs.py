"""Whole videos after the split (functions.common.splitting): the chunks, then the merge.

Each chunk is processed with the chunk(s) before it as tracker warm-up and the next one as
look-ahead (faceflow.chunks), written to `work/{job_id}/out/` (the chunk, then its report:
the report's presence means done), and counted once in Redis (functions.common.sessions.
VideoJobs: a SET of done indexes; a chunk already counted is not processed again). The worker
that completes the last chunk holds the merge lease and merges in-process: a remux of
already-encoded chunks plus the original audio, seconds of work, that needs no second queue or
cold start; if it fails the lease is freed and the message's redelivery merges again.

The merge writes `results/{job_id}/{name}` and then its report; the job record says `done` only
after both are written (each S3 PUT is atomic), so the record is the completion signal.
"""
from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from faceflow import chunks, media
from faceflow.images import BadInput

from .aws import make_tracer
from .jobs import DONE, FAILED
from .layout import out_index, out_keys, result_keys, work_keys
from .settings import SWAP
from .videoruntime import runtime

logger = Logger(service="faceflow-video", child=True)
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")

DOWNLOAD_THREADS = 8  # the merge fetches its chunks and reports at once


def chunk_message(body: str) -> tuple[str, int] | None:
    """(job id, index) from a chunk message `{"job_id", "index"}`; None when malformed."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    job_id, index = (message.get("job_id"), message.get("index")) if isinstance(message, dict) else (None, None)
    if not isinstance(job_id, str) or not media.JOB_ID.match(job_id) or type(index) is not int or index < 0:
        return None
    return job_id, index


def load_plan(job_id: str) -> dict[str, Any]:
    obj = runtime.s3.get_object(Bucket=runtime.settings.output_bucket, Key=work_keys(job_id)["plan"])
    return json.loads(obj["Body"].read())


def recover_job(job_id: str, plan: dict) -> tuple[int, str, list[int]]:
    """The done set rebuilt from S3 after Redis lost it: a chunk is done once its report is
    written (the report goes up after the chunk)."""
    done = []
    for page in runtime.s3.get_paginator("list_objects_v2").paginate(
            Bucket=runtime.settings.output_bucket, Prefix=work_keys(job_id)["out"]):
        done += [i for i in (out_index(job_id, item["Key"]) for item in page.get("Contents", [])) if i is not None]
    return len(plan["chunks"]), runtime.output_uri(work_keys(job_id)["plan"]), sorted(done)


@tracer.capture_method
def process_job_chunk(engine, job_id: str, index: int, context) -> dict[str, Any]:
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
            _run_chunk(engine, job_id, index, plan)
        except BadInput as exc:
            runtime.jobs.put(job_id, FAILED, error=f"chunk {index}: {exc}")
            metrics.add_metric(name="JobsFailed", unit=MetricUnit.Count, value=1)
            logger.warning("chunk refused", extra={"reason": str(exc)})
            return {"job_id": job_id, "index": index, "status": FAILED}
        status = "done"
    else:
        metrics.add_metric(name="ChunksDuplicate", unit=MetricUnit.Count, value=1)
    done = runtime.video_jobs.chunk_done(job_id, index, runtime.lock_ms(context),
                                         recover=lambda: recover_job(job_id, plan))
    logger.info("chunk counted", extra={"done": done.done, "total": done.total, "added": done.added})
    if done.merge:
        merge_job(job_id, plan, done.token)
        status = "merged"
    return {"job_id": job_id, "index": index, "status": status, "chunks_done": done.done,
            "chunks_total": done.total}


def neighbours(plan: dict, index: int) -> tuple[list[int], int | None]:
    """The chunks a chunk's worker also reads: those before it that hold the warm-up frames
    (faceflow.chunks.warmup_for), and the next one (look-ahead, so its last frames get the
    boxes one pass over the whole video would give)."""
    before = [c.index for c in chunks.warmup_for(chunks.SplitResult.from_dict(plan), index)]
    return before, index + 1 if index + 1 < len(plan["chunks"]) else None


def _run_chunk(engine, job_id: str, index: int, plan: dict) -> None:
    start = time.perf_counter()
    entry = plan["chunks"][index]
    ext = Path(entry["key"]).suffix
    out_key, report_key = out_keys(job_id, index, ext)
    before, after = neighbours(plan, index)
    with tempfile.TemporaryDirectory(prefix="faceflow-") as tmp:
        tmp = Path(tmp)

        def fetch(k: int) -> Path:
            key = plan["chunks"][k]["key"]
            path = tmp / f"chunk-{k}{Path(key).suffix}"
            runtime.s3.download_file(runtime.settings.output_bucket, key, str(path))
            return path

        src = fetch(index)
        warmup = [fetch(k) for k in before] or None
        lookahead = fetch(after) if after is not None else None
        dst, report = tmp / f"out{ext}", tmp / "report.json"
        chunk = chunks.Chunk.from_dict({**entry, "path": str(src)})
        summary, _ = chunks.process_chunk(engine, chunk, dst, None, warmup=warmup, lookahead=lookahead,
                                          info=plan["info"], report=report, operation=chunk_operation(engine, plan),
                                          names=(runtime.output_uri(entry["key"]), runtime.output_uri(out_key)))
        runtime.upload(dst, out_key)
        runtime.upload(report, report_key, "application/json")  # last: its presence means done
    ms = round((time.perf_counter() - start) * 1000, 1)
    metrics.add_metric(name="ChunkMs", unit=MetricUnit.Milliseconds, value=ms)
    metrics.add_metric(name="ChunksDone", unit=MetricUnit.Count, value=1)
    logger.info("chunk done", extra={"ms": ms, "frames": summary.get("frames")})


def chunk_operation(engine, plan: dict):
    """What a chunk's faces get: the mask (None: process_chunk's default) or, for a swap job,
    the source face's swap (fresh per chunk: it keeps per-track state)."""
    if plan.get("operation") != SWAP:
        return None
    from .swapjobs import chunk_operation as swap_operation
    return swap_operation(engine, plan)


# --- the merge ----------------------------------------------------------------------------------

def swap_marking(path: Path) -> dict[str, Any]:
    """The synthetic mark of a merged swap, read back from the file: a swap is never delivered
    without it (a missing one is a defect: the merge fails and is retried)."""
    import av
    from faceflow import synthetic
    with av.open(str(path)) as container:
        source_type = container.metadata.get(synthetic.DIGITAL_SOURCE_TYPE_TAG)
    if not source_type:
        raise RuntimeError("the merged swap lost its synthetic mark")
    return {"synthetic": True, "digital_source_type": source_type, "where": "container metadata"}


def output_name(name: str) -> str:
    """The result keeps the upload's name where its container holds H.264 as it is."""
    path = Path(name)
    return name if path.suffix.lower() in media.VIDEO_OUTPUT_EXTENSIONS else path.stem + ".mp4"


def replay_merge(job_id: str, context, force: bool = False) -> dict[str, Any]:
    """The merge on its own (a replay): nothing to do unless every chunk is done and the
    merge has not finished (or `force`) and nobody else is merging."""
    status, token = runtime.video_jobs.start_merge(job_id, runtime.lock_ms(context), force)
    if token is None:
        metrics.add_metric(name="MergesSkipped", unit=MetricUnit.Count, value=1)
        return {"job_id": job_id, "status": status}
    return merge_job(job_id, load_plan(job_id), token)


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
            with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
                list(pool.map(lambda kv: runtime.s3.download_file(bucket, kv[0], str(kv[1])), downloads))
            reports = [json.loads(path.read_text()) for path in report_paths]
            name = output_name(plan["name"])
            dst = tmp / "final" / name
            dst.parent.mkdir()
            summary = chunks.merge_chunks(paths, dst, audio=audio, info=plan.get("info"))
            report = {"job_id": job_id, **chunks.merge_reports(reports), "source": name}
            if plan.get("operation") == SWAP:
                report.update(operation=SWAP, options=plan["swap"].get("options") or {},
                              marking=swap_marking(dst))
            video_key, report_key = result_keys(job_id, name)
            runtime.upload(dst, video_key)
            runtime.put_json(report_key, report)
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
    outputs = {"video": runtime.output_uri(video_key), "report": runtime.output_uri(report_key)}
    runtime.jobs.put(job_id, DONE, outputs=outputs, stage="merged", frames=summary.get("frames"),
                     faces=report.get("summary", {}).get("faces"), merge_ms=ms)
    runtime.video_jobs.merge_finished(job_id, token)
    metrics.add_metric(name="JobsDone", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="MergeMs", unit=MetricUnit.Milliseconds, value=ms)
    logger.info("video merged", extra={"ms": ms, "frames": summary.get("frames")})
    return {"job_id": job_id, "status": DONE, "outputs": outputs}
