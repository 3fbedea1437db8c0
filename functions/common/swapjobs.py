"""Face swap jobs: a job manifest under the swap prefix (`swap/`, the only swap objects that
trigger) names the target (a photo or a video) and the source face (a photo), both uploaded
under the same prefix, and the options (events/swap_manifest.json; its S3 event:
events/s3_swap_manifest.json):

    {"target": "swap/greeting/template.mp4", "source": "swap/greeting/selfie.jpg",
     "options": {"engine": "landmark", "face_index": 0, "largest": false, "tracks": [1]},
     "sensitivity": "private", "priority": "low"}

An API job ("operation": "swap") uploads the two to `swap/{job_id}/` and its completion
writes `swap/{job_id}/manifest.json`, so the job id is the API's; a manifest dropped into the
bucket gets an id derived from its identity (functions.common.aws.job_for_key).

The split function runs it (functions/video/split.py): a photo target is swapped there, whole
(faceflow's Engine.swap_bytes) and written to `results/{job_id}/{name}` with its report; a video
is routed (operation "swap": the shipped rules send it to the GPU endpoint when one is
configured, never a private one), submitted there with the source's location, or cut into
chunks whose plan carries the operation and the source (copied to `work/{job_id}/`) for the
chunk workers. A swap that picks target faces by `tracks` (ids from an analysis report of the
whole video) runs whole, not in chunks, whose track ids are their own until the merge.

A bad manifest, a source that is not a photo or shows no face, a target that is neither photo
nor video: the job fails with the reason and nothing is written under results/.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from faceflow import media, routing
from faceflow.bundle import ModelError
from faceflow.images import BadInput
from faceflow.swap import ENGINES

from .aws import job_for_key, make_tracer
from .jobs import DONE, FAILED, RUNNING
from .layout import result_keys, s3_uri, work_keys
from .settings import SWAP, SWAP_MANIFEST_SUFFIX, SWAP_PREFIX

logger = Logger(service="faceflow-video", child=True)
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")

MAX_MANIFEST_BYTES = 64 * 1024
MANIFEST_FIELDS = ("target", "source", "options", "sensitivity", "priority")
# SwapOptions' fields a manifest may set (faceflow.swap checks the values), and their JSON types.
OPTION_TYPES = {"engine": (str,), "face_index": (int,), "largest": (bool,), "tracks": (list,)}
MAX_TRACKS = 1000
SENSITIVITIES = (*routing.SENSITIVITIES, *routing.API_SENSITIVITY)   # routing's words and the API's
PRIORITIES = routing.PRIORITIES


@dataclass(frozen=True)
class SwapManifest:
    target: str                # input bucket keys, under SWAP_PREFIX
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    sensitivity: str | None = None
    priority: str | None = None

    @property
    def target_kind(self) -> str:
        return media.kind_of(self.target)  # parse_manifest made sure it is one

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in {"target": self.target, "source": self.source, "options": self.options,
                                  "sensitivity": self.sensitivity, "priority": self.priority}.items()
                if v not in (None, {})}


def is_manifest_key(key: str) -> bool:
    return key.startswith(SWAP_PREFIX) and key.endswith(SWAP_MANIFEST_SUFFIX)


def _object_key(value: Any, name: str, kinds: tuple[str, ...]) -> str:
    if not isinstance(value, str) or not value:
        raise BadInput(f"swap manifest: {name} must be the key of an object in the input bucket")
    path = PurePosixPath(value)
    if not value.startswith(SWAP_PREFIX) or value.endswith("/") or ".." in path.parts or "//" in value \
            or len(value.encode()) > 1024:
        raise BadInput(f"swap manifest: {name} {value[:200]!r} must be a key under {SWAP_PREFIX} in the input bucket")
    kind = media.kind_of(value)
    if kind not in kinds:
        readable = sorted(media.IMAGE_EXTENSIONS) + (sorted(media.VIDEO_EXTENSIONS) if "video" in kinds else [])
        what = "a photo" if kinds == ("image",) else "a photo or a video"
        raise BadInput(f"swap manifest: {name} {value[:200]!r} must be {what} ({', '.join(readable)})")
    return value


def check_options(raw: Any, kind: str) -> dict[str, Any]:
    """The swap options of a manifest or API job, their names and JSON types checked (the
    values' meaning is faceflow.swap's); BadInput says what is wrong."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadInput("swap options must be a JSON object")
    unknown = sorted(set(raw) - set(OPTION_TYPES))
    if unknown:
        raise BadInput(f"unknown swap options {unknown} (known: {', '.join(OPTION_TYPES)})")
    for name, value in raw.items():
        if not isinstance(value, OPTION_TYPES[name]) or name != "largest" and isinstance(value, bool):
            raise BadInput(f"swap option {name} must be {OPTION_TYPES[name][0].__name__}, not {json.dumps(value)[:40]}")
    if "engine" in raw and raw["engine"] not in ENGINES:
        raise BadInput(f"swap option engine must be one of {', '.join(ENGINES)}, not {raw['engine'][:40]!r}")
    if raw.get("face_index", 0) < 0:
        raise BadInput("swap option face_index must be 0 or more (0: the largest face of the source)")
    tracks = raw.get("tracks")
    if tracks is not None:
        if kind != "video":
            raise BadInput("swap option tracks picks faces of a video (track ids from its analysis report)")
        if not tracks or len(tracks) > MAX_TRACKS or \
                not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tracks):
            raise BadInput(f"swap option tracks must be a list of 1 to {MAX_TRACKS} track ids (integers)")
    return dict(raw)


def parse_manifest(data: bytes) -> SwapManifest:
    """A swap manifest, checked; BadInput names the first problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BadInput(f"swap manifest too large: {len(data)} bytes (limit {MAX_MANIFEST_BYTES})")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise BadInput(f"swap manifest is not valid JSON: {getattr(exc, 'msg', type(exc).__name__)}") from None
    if not isinstance(raw, dict):
        raise BadInput('swap manifest must be a JSON object: {"target": key, "source": key, "options": {...}}')
    unknown = sorted(set(raw) - set(MANIFEST_FIELDS))
    if unknown:
        raise BadInput(f"swap manifest: unknown fields {unknown} (known: {', '.join(MANIFEST_FIELDS)})")
    if raw.get("source") is None:
        raise BadInput("swap manifest: source is required (the photo of the face to put in)")
    target = _object_key(raw.get("target"), "target", ("image", "video"))
    source = _object_key(raw.get("source"), "source", ("image",))
    if source == target:
        raise BadInput("swap manifest: target and source must be different objects")
    options = check_options(raw.get("options"), media.kind_of(target))
    sensitivity, priority = raw.get("sensitivity"), raw.get("priority")
    if sensitivity is not None and sensitivity not in SENSITIVITIES:
        raise BadInput(f"swap manifest: sensitivity must be one of {', '.join(SENSITIVITIES)}")
    if priority is not None and priority not in PRIORITIES:
        raise BadInput(f"swap manifest: priority must be one of {', '.join(PRIORITIES)}")
    return SwapManifest(target, source, options, sensitivity, priority)


def swap_options(options: dict[str, Any]):
    """faceflow.swap.SwapOptions from checked options; BadInput when it refuses them."""
    from faceflow.swap import SwapOptions
    try:
        return SwapOptions(**options)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"bad swap options: {exc}") from None


# --- running a manifest (the split function) ---------------------------------------------------

def _runtime():
    from .videoruntime import runtime
    return runtime


def _read_small(bucket: str, key: str, limit: int, what: str) -> bytes:
    """An object of at most `limit` bytes (checked before it is read); BadInput when it is
    missing or larger."""
    s3 = _runtime().s3
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            raise BadInput(f"{what} {key[:200]} is not in the input bucket: upload it first") from None
        raise
    if obj["ContentLength"] > limit:
        obj["Body"].close()
        raise BadInput(f"{what} too large: {obj['ContentLength']} bytes (limit {limit})")
    return obj["Body"].read()


def _sensitivity(manifest: SwapManifest, job: dict | None, tags: list[dict[str, str]]) -> dict[str, Any]:
    """The job's routing facts from the manifest, its record and the tags of the manifest,
    target and source objects: private from any of them wins (routing.video_facts)."""
    said = [manifest.sensitivity, (job or {}).get("sensitivity"),
            *(t.get(routing.SENSITIVITY_TAG) for t in tags)]
    said = [routing.API_SENSITIVITY.get(str(v).strip().lower(), v) for v in said if v not in (None, "")]
    record = dict(job or {})
    if said:
        normalised = [routing.normalise_sensitivity(v)[0] for v in said]
        record["sensitivity"] = "private" if "private" in normalised else said[0]
    record["priority"] = manifest.priority or record.get("priority")
    return record


@tracer.capture_method
def run_manifest(upload: dict) -> dict[str, Any]:
    """One swap manifest upload ({"bucket", "key", "version"}): the job runs, is submitted to
    the GPU endpoint, or is split; a bad one fails with the reason."""
    from . import splitting
    runtime = _runtime()
    job_id, _ = job_for_key(upload["bucket"], upload["key"], upload["version"])
    logger.append_keys(job_id=job_id)
    jobs = runtime.jobs
    existing = jobs.get(job_id)
    if (existing and existing["status"] == DONE) or runtime.video_jobs.merged(job_id):
        metrics.add_metric(name="JobsDuplicate", unit=MetricUnit.Count, value=1)
        return {"job_id": job_id, "status": DONE}
    if existing and existing["status"] == RUNNING and existing.get("stage") in (splitting.GPU_STAGE, "chunks"):
        metrics.add_metric(name="JobsDuplicate", unit=MetricUnit.Count, value=1)
        return {"job_id": job_id, "status": RUNNING, "stage": existing["stage"]}
    bucket = upload["bucket"]
    jobs.put(job_id, RUNNING, manifest=s3_uri(bucket, upload["key"]), stage="swap", operation=SWAP)
    start = time.perf_counter()
    try:
        manifest = parse_manifest(_read_small(bucket, upload["key"], MAX_MANIFEST_BYTES, "swap manifest"))
        face = _read_small(bucket, manifest.source, runtime.settings.max_upload_bytes, "source")
        _check_photo(face)
        name = PurePosixPath(manifest.target).name
        jobs.put(job_id, RUNNING, input=s3_uri(bucket, manifest.target), source=s3_uri(bucket, manifest.source),
                 media=manifest.target_kind, options=manifest.options or None)
        if manifest.target_kind == "image":
            return swap_photo(job_id, bucket, manifest, name, face, start)
        return swap_video(job_id, bucket, manifest, name, face, existing, start, upload["key"])
    except (BadInput, ModelError) as exc:  # ModelError: an engine whose weights the operator did not supply
        return splitting.refuse(job_id, exc)


def _check_photo(data: bytes) -> None:
    from faceflow import images
    try:
        images.sniff(data)
    except BadInput as exc:
        raise BadInput(f"the source must be a photo of the face to put in: {exc}") from None


def _engine():
    from .splitting import analysis_engine
    return analysis_engine()


def swap_photo(job_id: str, bucket: str, manifest: SwapManifest, name: str, face: bytes,
               start: float) -> dict[str, Any]:
    """Swap a photo target here and write it, then its report (the report last: done)."""
    runtime = _runtime()
    target = _read_small(bucket, manifest.target, runtime.settings.max_upload_bytes, "target")
    result = _engine().swap_bytes(target, face, swap_options(manifest.options), target_name=name,
                                  memory_bytes=runtime.settings.memory_bytes)
    image_key, report_key = result_keys(job_id, name)
    report = {"job_id": job_id, **result.report, "face_source": PurePosixPath(manifest.source).name}
    runtime.s3.put_object(Bucket=runtime.settings.output_bucket, Key=image_key, Body=result.data,
                          ContentType=media.image_media_type(result.format))
    runtime.put_json(report_key, report)
    outputs = {"image": runtime.output_uri(image_key), "report": runtime.output_uri(report_key)}
    ms = round((time.perf_counter() - start) * 1000, 1)
    runtime.jobs.put(job_id, DONE, stage="done", outputs=outputs, faces=len(report.get("faces") or []), ms=ms)
    metrics.add_metric(name="JobsDone", unit=MetricUnit.Count, value=1)
    logger.info("photo swapped", extra={"ms": ms})
    return {"job_id": job_id, "status": DONE, "outputs": outputs}


def swap_video(job_id: str, bucket: str, manifest: SwapManifest, name: str, face: bytes,
               existing: dict | None, start: float, manifest_key: str) -> dict[str, Any]:
    """Route a video target: the GPU endpoint, or chunks (or, with `tracks`, whole) here."""
    from . import splitting
    runtime = _runtime()
    target = {"bucket": bucket, "key": manifest.target}
    input_uri = s3_uri(bucket, manifest.target)
    with tempfile.TemporaryDirectory(prefix="faceflow-") as tmp:
        tmp = Path(tmp)
        src = tmp / f"target{PurePosixPath(name).suffix.lower()}"
        size = runtime.download(bucket, manifest.target, src)
        tags = [splitting.object_tags(bucket, key) for key in (manifest_key, manifest.target, manifest.source)]
        record = _sensitivity(manifest, existing, tags)
        decision = splitting.route_video(target, src, size, record, operation=SWAP)
        if decision.target == "gpu":
            return splitting.submit_to_gpu(job_id, name, input_uri, decision, SWAP,
                                           source_uri=s3_uri(bucket, manifest.source), options=manifest.options)
        # a source without a face fails the job now (BadInput), before anything is split
        _engine().swap_operation(face, swap_options(manifest.options), memory_bytes=runtime.settings.memory_bytes)
        runtime.jobs.put(job_id, RUNNING, route=decision.rule_name, route_target=decision.target)
        if manifest.options.get("tracks"):
            return swap_whole(job_id, name, src, face, manifest, tmp, start)
        return splitting.chunk_video(job_id, name, input_uri, src, tmp, start, swap={
            "face": face, "suffix": PurePosixPath(manifest.source).suffix.lower(), "options": manifest.options})


def swap_whole(job_id: str, name: str, src: Path, face: bytes, manifest: SwapManifest, tmp: Path,
               start: float) -> dict[str, Any]:
    """A video swap whose target faces are picked by track id, in one pass over the whole
    video (the ids are those of an analysis of the whole video)."""
    from .videojobs import output_name
    runtime = _runtime()
    face_path = tmp / f"face{PurePosixPath(manifest.source).suffix.lower()}"
    face_path.write_bytes(face)
    out_name = output_name(name)
    dst, report_path = tmp / "out" / out_name, tmp / "report.json"
    dst.parent.mkdir()
    runtime.jobs.put(job_id, RUNNING, stage="swap")
    _engine().swap_file(src, dst, face_path, swap_options(manifest.options), report=report_path)
    video_key, report_key = result_keys(job_id, out_name)
    report = {"job_id": job_id, **json.loads(report_path.read_text()), "source": out_name,
              "face_source": PurePosixPath(manifest.source).name}
    summary = report["summary"]
    summary.update(source=out_name, output=out_name)
    report.update(operation=SWAP, options=summary["options"], marking=summary["marking"])
    runtime.upload(dst, video_key)
    runtime.put_json(report_key, report)   # last: done
    outputs = {"video": runtime.output_uri(video_key), "report": runtime.output_uri(report_key)}
    ms = round((time.perf_counter() - start) * 1000, 1)
    runtime.jobs.put(job_id, DONE, stage="done", outputs=outputs, faces=summary["faces"], frames=summary["frames"],
                     ms=ms)
    metrics.add_metric(name="JobsDone", unit=MetricUnit.Count, value=1)
    logger.info("video swapped whole", extra={"ms": ms})
    return {"job_id": job_id, "status": DONE, "outputs": outputs}


def read_face(job_id: str, plan: dict) -> bytes:
    """A chunked swap's source photo, as the split function stored it under work/."""
    runtime = _runtime()
    key = plan["swap"]["source"]
    if not key.startswith(work_keys(job_id)["base"]):
        raise BadInput("the plan's swap source is not this job's")
    return runtime.s3.get_object(Bucket=runtime.settings.output_bucket, Key=key)["Body"].read()


_prepared: dict[str, Any] = {}   # job id -> its Swap (the source face prepared), the last job only


def chunk_operation(engine, plan: dict):
    """A chunk's swap: the job's source face, prepared once per execution environment, with
    fresh video state (smoothing, fades) for this chunk."""
    job_id = plan["job_id"]
    prepared = _prepared.get(job_id)
    if prepared is None:
        prepared = engine.swap_operation(read_face(job_id, plan), swap_options(plan["swap"].get("options") or {}),
                                         memory_bytes=_runtime().settings.memory_bytes)
        _prepared.clear()
        _prepared[job_id] = prepared
    return engine.swap_operation(prepared, fps=float(plan["info"]["fps"]))
