"""The GPU worker: the container behind the SageMaker asynchronous endpoint.

SageMaker runs the image as `<entrypoint> serve` and talks HTTP to port 8080:

* `GET /ping`: 200 once the engine is loaded (503 while it loads, 500 if it could not load).
* `GET /metrics`: Prometheus' text format (faceflow.web.metrics): requests and failures by
  route, latency histograms, faces found, frames processed, jobs waiting for a slot, the
  engine's load time, the process' CPU and memory.
* `POST /invocations`: the body is the job descriptor that functions/common/gpu.py wrote to
  S3 and SageMaker read back from the InputLocation:

      {"job_id": "…", "operation": "anonymize" | "analyze" | "swap",
       "input": "s3://bucket/uploads/…/clip.mp4", "output": "s3://bucket/results/…/clip.mp4",
       "report": "s3://…/clip.mp4.json" (optional: output + ".json"),
       "source": "s3://bucket/swap/…/face.jpg" (swap only: the photo of the face to put in),
       "options": {"method", "shape", "mask_scale", "cells", "verify", "hold", "keep_audio", "batch"}
                  (swap: {"engine", "face_index", "largest", "tracks", "hold", "keep_audio", "batch"})}

  The worker reads the input media from S3 itself, runs the engine (batched detection for
  video: VideoOptions(batch=N)), writes the output and then, last, the JSON report, and
  answers `{"job_id", "status": "done", "output", "report", "faces", "frames", "ms", ...}`,
  which SageMaker stores at the request's OutputLocation and announces on the success topic.
  For `analyze` there is no media output: the report goes to `report`, else to `output`.

  A bad job answers a JSON error with a 4xx status (400 bad descriptor, 403 S3 access denied,
  404 missing object or bucket, 413 too large, 422 not an image or video); SageMaker then
  stores it at the FailureLocation and announces it on the error topic. An unexpected failure
  is a 500 whose body says only "internal error": tracebacks go to the log, never the body.

S3 writes are ordered so that a reader never sees a half-done job: each object appears
whole (a PUT or a completed multipart upload), the media output first and the report last,
so a report's presence means its output is complete; SageMaker's own response object comes
after both.

Execution providers: TensorRT when this onnxruntime has it (FACEFLOW_GPU_TENSORRT=0 skips
it), then CUDA, then CPU; with neither GPU provider the worker runs on CPU and logs a WARNING.

| variable | meaning | default |
|---|---|---|
| FACEFLOW_GPU_PORT | port to listen on | SAGEMAKER_BIND_TO_PORT, else 8080 |
| FACEFLOW_GPU_HOST | address to listen on | 0.0.0.0 |
| FACEFLOW_GPU_BATCH | video frames per detector call | 16 |
| FACEFLOW_GPU_WORKERS | jobs run at once (match MaxConcurrentInvocationsPerInstance) | 1 |
| FACEFLOW_GPU_MAX_INPUT_BYTES | largest input object read | 10 GiB |
| FACEFLOW_GPU_DETECTOR | detector name | yunet |
| FACEFLOW_GPU_TENSORRT | 0 to leave TensorRT out | 1 |
| FACEFLOW_GPU_WORKDIR | where inputs and outputs are staged | the system temp folder |
| FACEFLOW_MODEL_DIR | model bundle | /opt/faceflow/models in the image |
| AWS_ENDPOINT_URL | boto3's own (moto in tests) | unset |
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger

from faceflow import media
from faceflow.web.metrics import Metrics

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "faceflow-gpu"))

TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
OPERATIONS = media.OPERATIONS
VIDEO_OUTPUTS = {ext: media.VIDEO_MEDIA_TYPES[ext] for ext in media.VIDEO_OUTPUT_EXTENSIONS}
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<key>.+)$")
MAX_BODY_BYTES = 1024 * 1024  # the descriptor is a few hundred bytes; media never travels in it
MAX_SOURCE_BYTES = 25 * 1024 * 1024  # a swap's source face photo: the stills function's upload limit


# --- execution providers ------------------------------------------------------------------------

def choose_providers(available: list[str] | tuple[str, ...], tensorrt: bool = True) -> tuple[list[str], str | None]:
    """(providers in order, a warning or None) for an onnxruntime build offering `available`.

    TensorRT (when offered and wanted) before CUDA, CUDA before CPU; CPU always last as the
    fallback for operators the GPU providers do not take. Without a GPU provider: CPU alone,
    and a warning to log. Azure and other providers are never chosen."""
    available = set(available)
    chosen = [p for p in ((TENSORRT,) if tensorrt else ()) + (CUDA,) if p in available]
    if chosen:
        return chosen + [CPU], None
    gpu_named = sorted(p for p in available if p not in (CPU, "AzureExecutionProvider"))
    return [CPU], (f"no GPU execution provider in this onnxruntime (available: {sorted(available)}); "
                   f"running on CPU" + (f" (ignored: {gpu_named})" if gpu_named else "") +
                   ": install onnxruntime-gpu with CUDA to use the GPU")


# --- configuration ------------------------------------------------------------------------------

def _env_int(name: str, default: int, low: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: not an integer") from None
    if value < low:
        raise SystemExit(f"{name}={value}: must be at least {low}")
    return value


@dataclass
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    batch: int = 16
    workers: int = 1
    max_input_bytes: int = 10 * 1024 ** 3
    detector: str = "yunet"
    tensorrt: bool = True
    model_dir: str | None = None
    workdir: str | None = None

    @classmethod
    def from_env(cls) -> "Config":
        env = os.environ
        return cls(
            host=env.get("FACEFLOW_GPU_HOST") or cls.host,
            port=_env_int("FACEFLOW_GPU_PORT", _env_int("SAGEMAKER_BIND_TO_PORT", cls.port)),
            batch=_env_int("FACEFLOW_GPU_BATCH", cls.batch),
            workers=_env_int("FACEFLOW_GPU_WORKERS", cls.workers),
            max_input_bytes=_env_int("FACEFLOW_GPU_MAX_INPUT_BYTES", cls.max_input_bytes),
            detector=env.get("FACEFLOW_GPU_DETECTOR") or cls.detector,
            tensorrt=env.get("FACEFLOW_GPU_TENSORRT", "1").strip().lower() not in ("0", "false", "no", "off"),
            model_dir=env.get("FACEFLOW_MODEL_DIR") or None,
            workdir=env.get("FACEFLOW_GPU_WORKDIR") or None,
        )


# --- jobs ---------------------------------------------------------------------------------------

class JobError(Exception):
    """A job that cannot be done as asked: answered with `status` and `message`."""

    def __init__(self, status: int, message: str, kind: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.kind = int(status), message, kind


@dataclass
class Job:
    job_id: str
    operation: str
    input: tuple[str, str]
    output: tuple[str, str] | None
    report: tuple[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    source: tuple[str, str] | None = None   # a swap's source face photo

    @property
    def input_uri(self) -> str:
        return _uri(self.input)


def _uri(location: tuple[str, str] | None) -> str | None:
    return None if location is None else f"s3://{location[0]}/{location[1]}"


def parse_s3_uri(value: Any, name: str) -> tuple[str, str]:
    if not isinstance(value, str) or not value:
        raise JobError(400, f"{name} must be an s3://bucket/key string")
    match = _S3_URI.match(value)
    if not match or match["key"].endswith("/"):
        raise JobError(400, f"{name} {value[:200]!r} is not an s3://bucket/key URI of an object")
    return match["bucket"], match["key"]


# Options a job may carry: name -> (type check, description for errors).
_OPTION_TYPES = {
    "method": (lambda v: isinstance(v, str), "a string (blur, pixelate, solid)"),
    "shape": (lambda v: isinstance(v, str), "a string (ellipse, box)"),
    "mask_scale": (lambda v: _is_number(v), "a number"),
    "cells": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "verify": (lambda v: isinstance(v, bool), "true or false"),
    "hold": (lambda v: _is_number(v) and 0 <= v <= 30, "a number of seconds from 0 to 30"),
    "keep_audio": (lambda v: isinstance(v, bool), "true or false"),
    "batch": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256,
              "an integer from 1 to 256"),
    # a swap's (faceflow.swap.SwapOptions checks the values)
    "engine": (lambda v: isinstance(v, str), "a string (landmark, inswapper)"),
    "face_index": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   "a non-negative integer"),
    "largest": (lambda v: isinstance(v, bool), "true or false"),
    "tracks": (lambda v: isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v),
               "a list of track ids (integers)"),
}
SWAP_OPTIONS = ("engine", "face_index", "largest", "tracks")
MASK_OPTIONS = ("method", "shape", "mask_scale", "cells", "verify")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_job(body: bytes) -> Job:
    """The job descriptor, checked; JobError(400) says what is wrong with it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobError(400, f"request body is not valid JSON: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(data, dict):
        raise JobError(400, "request body must be a JSON object (the job descriptor)")
    unknown = sorted(set(data) - {"job_id", "operation", "input", "output", "report", "source", "options"})
    if unknown:
        raise JobError(400, f"unknown fields {unknown} (known: job_id, operation, input, output, report, source, "
                            f"options)")
    job_id = data.get("job_id")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise JobError(400, "job_id must be 1-128 letters, digits, '.', '_' or '-'")
    operation = data.get("operation", "anonymize")
    if operation not in OPERATIONS:
        raise JobError(400, f"operation {str(operation)[:40]!r} is not supported here (supported: "
                            f"{', '.join(OPERATIONS)})")
    source = parse_s3_uri(data.get("input"), "input")
    output = parse_s3_uri(data["output"], "output") if data.get("output") is not None else None
    report = parse_s3_uri(data["report"], "report") if data.get("report") is not None else None
    face = parse_s3_uri(data["source"], "source") if data.get("source") is not None else None
    if (operation == "swap") != (face is not None):
        raise JobError(400, "a swap needs source (the photo of the face to put in); only a swap takes one")
    if operation in ("anonymize", "swap"):
        if output is None:
            raise JobError(400, f"output is required for {operation}")
        report = report or (output[0], output[1] + ".json")
    else:
        report = report or output
        output = None
        if report is None:
            raise JobError(400, "analyze needs report (or output): where the JSON report goes")
    if source in (output, report) or face is not None and face in (output, report):
        raise JobError(400, "output and report must not overwrite the input or the source")
    if output is not None and output == report:
        raise JobError(400, "output and report must be different objects")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise JobError(400, "options must be a JSON object")
    unknown = sorted(set(options) - set(_OPTION_TYPES))
    if unknown:
        raise JobError(400, f"unknown options {unknown} (known: {', '.join(_OPTION_TYPES)})")
    for name, value in options.items():
        check, what = _OPTION_TYPES[name]
        if not check(value):
            raise JobError(400, f"option {name} must be {what}, not {json.dumps(value)[:40]}")
    if operation == "anonymize":
        _mask_options(options)  # refuse bad mask options before any media is read
    if operation == "swap":
        misplaced = sorted(set(options) & set(MASK_OPTIONS))
        if misplaced:
            raise JobError(400, f"options {misplaced} are not a swap's (its own: {', '.join(SWAP_OPTIONS)})")
        _swap_options(options)  # refuse bad swap options before any media is read
    elif set(options) & set(SWAP_OPTIONS):
        raise JobError(400, f"options {sorted(set(options) & set(SWAP_OPTIONS))} are a swap's only")
    return Job(job_id, operation, source, output, report, options, face)


def _swap_options(options: dict[str, Any]):
    """faceflow.swap.SwapOptions from a swap job's options (checked by it)."""
    from faceflow.swap import SwapOptions
    try:
        return SwapOptions(**{k: options[k] for k in SWAP_OPTIONS if k in options})
    except (TypeError, ValueError) as exc:
        raise JobError(400, f"bad options: {exc}") from None


def _mask_options(options: dict[str, Any]):
    from faceflow.anonymize import MaskOptions
    try:
        return MaskOptions(**{k: options[k] for k in ("method", "shape", "mask_scale", "cells") if k in options})
    except ValueError as exc:
        raise JobError(400, f"bad options: {exc}") from None


# --- the worker ---------------------------------------------------------------------------------

class Worker:
    """Loads the engine once, then runs jobs (at most `config.workers` at a time)."""

    def __init__(self, config: Config, s3=None):
        self.config = config
        self._s3 = s3
        self.engine = None
        self.providers: list[str] = []
        self.load_error: str | None = None
        self._slots = threading.BoundedSemaphore(config.workers)
        self.metrics = Metrics()
        self._in_flight = 0  # invocations being run or waiting for a slot
        self._in_flight_lock = threading.Lock()

    def in_flight(self, change: int) -> None:
        """Count an invocation in (+1) or out (-1); those beyond the slots are the queue."""
        with self._in_flight_lock:
            self._in_flight += change
            self.metrics.queue.labels(queue="jobs").set(max(0, self._in_flight - self.config.workers))

    @property
    def s3(self):
        if self._s3 is None:
            import boto3
            from botocore.config import Config as BotoConfig
            self._s3 = boto3.client("s3", config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"},
                                                            signature_version="s3v4"))
        return self._s3

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def load(self) -> None:
        try:
            import onnxruntime
            from faceflow.engine import Engine
            providers, warning = choose_providers(onnxruntime.get_available_providers(), self.config.tensorrt)
            if warning:
                logger.warning(warning, extra={"providers": providers})
            start = time.perf_counter()
            engine = Engine(detector=self.config.detector, model_dir=self.config.model_dir, providers=providers)
            used = list(engine.detector.providers)
            if providers[0] != CPU and used and used[0] == CPU:
                logger.warning("GPU providers were requested but the session runs on CPU "
                               "(CUDA or TensorRT libraries missing?)", extra={"requested": providers, "used": used})
            self.s3  # noqa: B018 - build the client now, not in the first job
            self.metrics.model_load.labels(model="detector").set(time.perf_counter() - start)
            self.providers = used
            self.engine = engine
            logger.info("engine loaded", extra={"providers": used, "batch": self.config.batch,
                                                "workers": self.config.workers,
                                                "ms": round((time.perf_counter() - start) * 1000, 1)})
        except Exception as exc:  # noqa: BLE001 - reported by /ping; the details go to the log
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("engine failed to load")

    # --- one job -----------------------------------------------------------------------------
    def run(self, job: Job) -> dict[str, Any]:
        with self._slots, tempfile.TemporaryDirectory(prefix="faceflow-gpu-", dir=self.config.workdir) as tmp:
            start = time.perf_counter()
            local = self._download(job, Path(tmp))
            face = self._source_face(job, Path(tmp)) if job.operation == "swap" else None
            kind = self._kind(local)
            if kind == "video" and local.suffix.lower() not in media.VIDEO_EXTENSIONS:
                local = local.rename(local.with_suffix(".mp4"))  # the engine picks video by suffix
            if face is not None:
                result = self._swap(job, local, kind, face, Path(tmp))
            elif kind == "video":
                result = self._video(job, local, Path(tmp))
            else:
                result = self._image(job, local)
            result["ms"] = round((time.perf_counter() - start) * 1000, 1)
            logger.info("job done", extra={"job_id": job.job_id, "operation": job.operation, "media": kind,
                                           "faces": result["faces"], "frames": result["frames"], "ms": result["ms"]})
            return result

    def _download(self, job: Job, tmp: Path, location: tuple[str, str] | None = None, what: str = "input",
                  limit: int | None = None) -> Path:
        """The job's input (or `location`, named `what` in errors) staged in `tmp`."""
        location = location or job.input
        bucket, key = location
        uri = _uri(location)
        try:
            head = self.s3.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - mapped to a 4xx where it is the job's fault
            error = _s3_error(exc, "read", location)
            if isinstance(error, JobError) and error.status == 404 and not self._bucket_exists(bucket):
                error = JobError(404, f"cannot read {uri}: bucket {bucket} does not exist", "not_found")
            raise error from None
        size = head.get("ContentLength", 0)
        limit = limit or self.config.max_input_bytes
        if size == 0:
            raise JobError(422, f"{what} {uri} is empty", "bad_input")
        if size > limit:
            raise JobError(413, f"{what} {uri} is {size} bytes, over the {limit} byte limit", "too_large")
        suffix = Path(key).suffix.lower()
        local = tmp / (what + (suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""))
        try:
            self.s3.download_file(bucket, key, str(local))
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(exc, "read", location) from None
        return local

    def _source_face(self, job: Job, tmp: Path) -> bytes:
        """A swap's source: a photo (of at most MAX_SOURCE_BYTES), its bytes."""
        from faceflow import images
        local = self._download(job, tmp, job.source, "source", MAX_SOURCE_BYTES)
        data = local.read_bytes()
        try:
            images.sniff(data)
        except images.BadInput as exc:
            raise JobError(422, f"source {_uri(job.source)} must be a photo of the face to put in ({exc})",
                           "bad_input") from None
        return data

    def _bucket_exists(self, bucket: str) -> bool:
        """(A HEAD of a missing object and of an object in a missing bucket both say 404.)"""
        try:
            self.s3.head_bucket(Bucket=bucket)
            return True
        except Exception as exc:  # noqa: BLE001
            error = _s3_error(exc, "read", (bucket, ""))
            return not (isinstance(error, JobError) and error.status == 404)

    @staticmethod
    def _kind(local: Path) -> str:
        """"image" or "video": by extension, else by content."""
        from faceflow import images
        suffix = local.suffix.lower()
        if suffix in media.VIDEO_EXTENSIONS:
            return "video"
        if suffix in media.IMAGE_EXTENSIONS:
            return "image"
        with open(local, "rb") as f:
            head = f.read(1 << 16)
        try:
            images.sniff(head)
            return "image"
        except images.BadInput:
            pass
        from faceflow.video import probe
        try:
            probe(local)
            return "video"
        except images.BadInput as exc:
            raise JobError(422, f"input is not an image or a video faceflow reads ({exc})", "bad_input") from None

    def _image(self, job: Job, local: Path) -> dict[str, Any]:
        from faceflow import images
        from faceflow.analysis import DEFAULT_ATTRIBUTES
        engine = self.engine
        data = local.read_bytes()
        try:
            if job.operation == "analyze":
                report = engine.analyze_bytes(data, source=job.input_uri, attributes=DEFAULT_ATTRIBUTES)
                frames, faces = 1, len(report["faces"])
                output = None
            else:
                fmt = images.sniff(data)[0]
                result = engine.anonymize_bytes(data, _mask_options(job.options),
                                                images.format_for(job.output[1], fmt), source=job.input_uri,
                                                verify=job.options.get("verify", True))
                report = result.report
                per_frame = report.get("frames")
                frames = len(per_frame) if per_frame else 1
                faces = sum(len(f["faces"]) for f in per_frame) if per_frame else len(report["faces"])
                output = job.output
                self._put(output, result.data, media.image_media_type(result.format))
                report["output"] = _uri(output)
        except images.BadInput as exc:
            raise JobError(422, f"input {job.input_uri}: {exc}", "bad_input") from None
        report = {"job_id": job.job_id, "operation": job.operation, **report}
        self._put(job.report, json.dumps(report).encode(), "application/json")  # last: the job is complete
        return self._result(job, "image", output, faces, frames)

    def _video(self, job: Job, local: Path, tmp: Path) -> dict[str, Any]:
        """The core's video entry points (faceflow.video.anonymize_video / analyze_video),
        batched; the report then names the S3 objects, not the staged files."""
        from faceflow.analysis import DEFAULT_ATTRIBUTES
        from faceflow.images import BadInput
        from faceflow.video import VideoOptions, analyze_video, anonymize_video
        batch = job.options.get("batch", self.config.batch)
        options = VideoOptions(batch=batch, max_missing_s=job.options.get("hold", VideoOptions.max_missing_s),
                               keep_audio=job.options.get("keep_audio", True))
        dst = None
        try:
            if job.operation == "anonymize":
                suffix = Path(job.output[1]).suffix.lower()
                if suffix not in VIDEO_OUTPUTS:
                    raise JobError(400, f"output for a video must end in {', '.join(VIDEO_OUTPUTS)}, not "
                                        f"{suffix or 'no extension'}")
                dst, report_path = tmp / ("output" + suffix), tmp / "report.json"
                anonymize_video(self.engine, local, dst, _mask_options(job.options), report=report_path,
                                options=options, verify=job.options.get("verify", False))
                report = json.loads(report_path.read_text())
            else:
                report = analyze_video(self.engine, local, options, attributes=DEFAULT_ATTRIBUTES)
        except BadInput as exc:
            raise JobError(422, f"input {job.input_uri}: {exc}", "bad_input") from None
        summary = report["summary"]
        summary.update(job_id=job.job_id, operation=job.operation, source=job.input_uri,
                       output=_uri(job.output), batch=batch, providers=self.providers)
        report["source"] = job.input_uri
        if dst is not None:
            self._upload(job.output, dst, VIDEO_OUTPUTS[dst.suffix])
        self._put(job.report, json.dumps(report).encode(), "application/json")  # last: the job is complete
        return self._result(job, "video", job.output, summary["faces"], summary["frames"])

    def _swap(self, job: Job, local: Path, kind: str, face: bytes, tmp: Path) -> dict[str, Any]:
        """A swap (faceflow.swap through the engine): the target's faces get the source's; the
        output carries the synthetic mark the engine writes. The source is checked (a face in
        it) before anything is written."""
        from faceflow import images
        from faceflow.bundle import ModelError
        from faceflow.video import VideoOptions
        options = _swap_options(job.options)
        try:
            if kind == "image":
                data = local.read_bytes()
                result = self.engine.swap_bytes(data, face, options,
                                                images.format_for(job.output[1], images.sniff(data)[0]),
                                                target_name=job.input_uri)
                self._put(job.output, result.data, media.image_media_type(result.format))
                report = {"job_id": job.job_id, **result.report, "output": _uri(job.output)}
                frames, faces = 1, len(report["faces"])
            else:
                suffix = Path(job.output[1]).suffix.lower()
                if suffix not in VIDEO_OUTPUTS:
                    raise JobError(400, f"output for a video must end in {', '.join(VIDEO_OUTPUTS)}, not "
                                        f"{suffix or 'no extension'}")
                batch = job.options.get("batch", self.config.batch)
                video = VideoOptions(batch=batch, max_missing_s=job.options.get("hold", VideoOptions.max_missing_s),
                                     keep_audio=job.options.get("keep_audio", True))
                dst, report_path = tmp / ("output" + suffix), tmp / "report.json"
                self.engine.swap_file(local, dst, face, options, video_options=video, report=report_path)
                report = json.loads(report_path.read_text())
                summary = report["summary"]
                summary.update(job_id=job.job_id, source=job.input_uri, output=_uri(job.output), batch=batch,
                               providers=self.providers)
                report.update(source=job.input_uri, operation=job.operation, options=summary["options"],
                              marking=summary["marking"])  # where a photo's report has them
                frames, faces = summary["frames"], summary["faces"]
                self._upload(job.output, dst, VIDEO_OUTPUTS[dst.suffix])
        except images.BadInput as exc:
            raise JobError(422, f"swap onto {job.input_uri}: {exc}", "bad_input") from None
        except ModelError as exc:  # an engine whose weights the operator did not supply
            raise JobError(400, str(exc), "unavailable") from None
        report["face_source"] = _uri(job.source)
        self._put(job.report, json.dumps(report).encode(), "application/json")  # last: the job is complete
        return self._result(job, kind, job.output, faces, frames)

    def _result(self, job: Job, media: str, output, faces: int, frames: int) -> dict[str, Any]:
        return {"job_id": job.job_id, "status": "done", "operation": job.operation, "media": media,
                "input": job.input_uri, "output": _uri(output), "report": _uri(job.report),
                "faces": faces, "frames": frames, "providers": self.providers,
                "batch": job.options.get("batch", self.config.batch) if media == "video" else 1}

    def _put(self, location: tuple[str, str], data: bytes, content_type: str) -> None:
        try:
            self.s3.put_object(Bucket=location[0], Key=location[1], Body=data, ContentType=content_type)
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(exc, "write", location) from None

    def _upload(self, location: tuple[str, str], path: Path, content_type: str) -> None:
        # upload_file: one PUT, or a multipart upload for large files; either way the object
        # appears only when complete.
        try:
            self.s3.upload_file(str(path), location[0], location[1], ExtraArgs={"ContentType": content_type})
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(exc, "write", location) from None


def _s3_error(exc: Exception, verb: str, location: tuple[str, str]) -> Exception:
    """A JobError for S3 failures that are the job's fault (missing, forbidden); others as they are."""
    from botocore.exceptions import ClientError
    if not isinstance(exc, ClientError):
        cause = getattr(exc, "last_exception", None)  # boto3's transfer wraps ClientErrors
        if isinstance(cause, ClientError):
            exc = cause
        else:
            return exc
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    uri = _uri(location)
    if code == "NoSuchBucket":
        return JobError(404, f"cannot {verb} {uri}: bucket {location[0]} does not exist", "not_found")
    if code in ("404", "NoSuchKey", "NotFound") or status == 404:
        what = f"input {uri} does not exist" if verb == "read" else f"cannot {verb} {uri}: not found"
        return JobError(404, what, "not_found")
    if code in ("403", "AccessDenied", "Forbidden") or status == 403:
        if verb == "read":  # a role without s3:ListBucket gets 403, not 404, for a missing object
            return JobError(403, f"access denied reading {uri} (or it does not exist)", "forbidden")
        return JobError(403, f"access denied: cannot {verb} {uri}", "forbidden")
    return exc


# --- HTTP -----------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server_version = "faceflow-gpu"
    protocol_version = "HTTP/1.1"
    worker: Worker  # set on the subclass made by make_server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        logger.debug("http " + format % args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.split("?")[0] == "/metrics":
            data = self.worker.metrics.exposition()
            self.send_response(200)
            self.send_header("Content-Type", self.worker.metrics.content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self.path.split("?")[0] != "/ping":
            self._send(404, {"error": f"no such path {self.path[:100]} (GET /ping, POST /invocations)"})
            return
        worker = self.worker
        if worker.ready:
            self._send(200, {"status": "ok", "providers": worker.providers})
        elif worker.load_error:
            self._send(500, {"status": "failed", "error": "the engine could not load (see the endpoint logs)"})
        else:
            self._send(503, {"status": "loading"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/invocations":
            self._send(404, {"error": f"no such path {self.path[:100]} (GET /ping, POST /invocations)"})
            return
        start = time.perf_counter()
        self.worker.in_flight(+1)
        status = 500
        try:
            status = self._invoke()
        finally:
            self.worker.in_flight(-1)
            self.worker.metrics.observe("/invocations", "POST", status, time.perf_counter() - start)

    def _invoke(self) -> int:
        """Run one job; the status answered."""
        job_id = None
        try:
            body = self._body()
            job = parse_job(body)
            job_id = job.job_id
            if not self.worker.ready:
                raise JobError(503, "the engine is not loaded yet; retry", "not_ready")
            result = self.worker.run(job)
            self.worker.metrics.faces.inc(int(result.get("faces") or 0))
            self.worker.metrics.frames.inc(int(result.get("frames") or 0))
            self._send(200, result)
            return 200
        except JobError as exc:
            level = logger.error if exc.status >= 500 else logger.warning
            level("job refused", extra={"job_id": job_id, "status": exc.status, "reason": exc.message})
            self._send(exc.status, {"job_id": job_id, "status": "failed", "error": exc.message,
                                    "error_type": exc.kind, "http_status": exc.status})
            return exc.status
        except Exception:  # noqa: BLE001 - the traceback goes to the log, never the body
            logger.exception("job failed", extra={"job_id": job_id})
            self._send(500, {"job_id": job_id, "status": "failed", "error_type": "internal",
                             "error": "internal error while processing the job (see the endpoint logs)",
                             "http_status": 500})
            return 500

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise JobError(411, "Content-Length is required")
        try:
            size = int(length)
        except ValueError:
            raise JobError(400, "bad Content-Length") from None
        if size > MAX_BODY_BYTES:
            # Read (and drop) a moderately large body so the client gets the answer rather than
            # a reset connection; beyond that, answer and close.
            if size <= 16 * MAX_BODY_BYTES:
                left = size
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            else:
                self.close_connection = True
            raise JobError(413, f"request body of {size} bytes is over the {MAX_BODY_BYTES} byte limit "
                                f"(send the job descriptor; media stays in S3)", "too_large")
        return self.rfile.read(size)


def make_server(config: Config, worker: Worker | None = None) -> tuple[ThreadingHTTPServer, Worker]:
    worker = worker or Worker(config)
    handler = type("BoundHandler", (Handler,), {"worker": worker})
    server = ThreadingHTTPServer((config.host, config.port), handler)
    server.daemon_threads = False   # on SIGTERM, running jobs finish before the process exits
    server.block_on_close = True
    return server, worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m functions.gpu.server",
                                     description="faceflow GPU worker for a SageMaker asynchronous endpoint")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve"],
                        help="SageMaker starts the container with `serve`")
    parser.add_argument("--host", default=None, help="address to listen on (FACEFLOW_GPU_HOST, 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="port (FACEFLOW_GPU_PORT, 8080)")
    parser.add_argument("--batch", type=int, default=None, help="video frames per detector call (FACEFLOW_GPU_BATCH)")
    args = parser.parse_args(argv)
    config = Config.from_env()
    if args.host:
        config.host = args.host
    if args.port is not None:
        config.port = args.port
    if args.batch is not None:
        config.batch = max(1, args.batch)
    server, worker = make_server(config)
    # Listen at once (SageMaker pings from the start); /ping says 200 once the engine is in.
    threading.Thread(target=worker.load, name="load-engine", daemon=True).start()
    from .stream_server import start as start_streams
    streams = start_streams(worker, config.host)  # real-time streams over gRPC, on the same engine

    def stop(signum, _frame):
        logger.info("stopping", extra={"signal": signum})
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("listening", extra={"host": config.host, "port": server.server_address[1]})
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if streams is not None:
            streams.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
