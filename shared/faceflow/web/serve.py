"""`faceflow serve`: the page and the HTTP API in one process on this machine, no AWS, no Redis.

aiohttp receives each request; everything the deployed API also answers (the photo routes, the
job routes, the OpenAPI document, the page) becomes the same payload 2.0 event API Gateway would
send (faceflow.web.events) and goes to a Powertools resolver built from faceflow.web.api, in a
bounded pool of threads (one resolver and one engine per thread: a resolver holds the current
event, so it serves one request at a time). What S3 does for the deployed API, serve does
itself: a job's upload URL is a PUT to /v1/uploads/<job> (a swap job's source face photo, its
second upload, a PUT to /v1/uploads/<job>/source; POST /v1/jobs/<job>/complete starts it once
both are in), its results are downloads from /v1/files/<job>/<name>, and a local worker runs
the job. Outside the document: the
compatibility routes POST /process and POST /analyze, and Prometheus' /metrics.

Requests are bounded with the API's limits and Error shape: a body over API Gateway's 10 MB is
a 413, one over the photo routes' 5 MiB a 413 too; when every worker is busy and the waiting
room is full a request gets 503 (Retry-After); a request that runs past its time gets 504.
"""
import asyncio
import base64
import functools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from aiohttp import web
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import BadRequestError, NotFoundError, ServiceError

from faceflow import media
from faceflow.web import api
from faceflow.web.events import build_event, new_request_id, response_parts
from faceflow.web.metrics import Metrics
from faceflow.web.page import add_page_routes
from faceflow.web.stream_route import add_stream_route

log = logging.getLogger("faceflow.serve")

MIB = 1024 * 1024
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"  # the deployed jobs' statuses
AWAITING_UPLOAD = "awaiting upload"  # a job's stage (and each upload's state) until its input has arrived
UPLOADING = "uploading"
RECEIVED = "received"    # an upload that is whole
UPLOADED = "uploaded"    # a swap job's stage once both uploads are in, until POST .../complete
TARGET, SOURCE = "input", "source"  # a job's uploads: the photo or video, and a swap's source face photo
SWAP = media.SWAP
UPLOAD_CHUNK = 1 * MIB


@dataclass
class Limits:
    """What one request and the server as a whole may take (the deployed API's limits)."""
    max_body_bytes: int = 10 * 1024 * 1024   # API Gateway's largest request body
    max_sync_bytes: int = api.MAX_SYNC_BYTES  # the photo routes' (FACEFLOW_MAX_SYNC_BYTES)
    max_photo_bytes: int = 25 * MIB           # a photo job's upload (FACEFLOW_MAX_UPLOAD_BYTES)
    max_video_bytes: int = 2 * 1024 * MIB     # a video job's upload
    workers: int = max(1, min(4, os.cpu_count() or 1))  # requests processed at once
    waiting: int = 16                         # requests waiting for a worker before a 503
    timeout_s: float = 60.0                   # a request's time (waiting included) before a 504
    jobs_waiting: int = 16                    # uploaded jobs waiting for the job worker
    jobs_kept: int = 200                      # finished jobs (and their files) kept
    url_ttl_s: int = 900                      # how long an upload URL takes uploads
    memory_bytes: Optional[int] = None        # images budgeted against (None: the machine's)


# -- engines: one per thread, loaded on first use --------------------------------------------

class Engines:
    """One face engine per thread that asks (an Engine's analyzers are built on demand and are
    not shared between threads), its load time in the metrics."""

    def __init__(self, metrics: Metrics, threads: int = 0, engine_options: Optional[dict] = None):
        self.metrics, self.threads, self.options = metrics, threads, engine_options or {}
        self._local = threading.local()

    def __call__(self):
        engine = getattr(self._local, "engine", None)
        if engine is None:
            from faceflow.engine import Engine
            start = time.perf_counter()
            engine = Engine(threads=self.threads, **self.options)
            self.metrics.model_load.labels(model="detector").set(time.perf_counter() - start)
            self._local.engine = engine
        return engine

    @functools.cached_property
    def analysis_attributes(self) -> tuple:
        """The default attributes when their models are installed, else none (detection only)."""
        from faceflow import bundle
        from faceflow.analysis import DEFAULT_ATTRIBUTES, models_for
        try:
            for name in models_for(DEFAULT_ATTRIBUTES):
                bundle.model_path(name, self.options.get("model_dir"))
        except bundle.ModelError:
            return ()
        return DEFAULT_ATTRIBUTES


# -- local jobs ------------------------------------------------------------------------------

class LocalJobs:
    """Jobs as the deployed API has them, run here: a record per job, its files in a folder of
    its own, one worker thread running them in order of upload."""

    def __init__(self, root: Path, limits: Limits, metrics: Metrics, engines: Engines):
        self.root, self.limits, self.metrics, self.engines = root, limits, metrics, engines
        self.root.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue(maxsize=limits.jobs_waiting)
        self._worker = threading.Thread(target=self._run, name="faceflow-jobs", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        while True:  # drop what waits; the job being run finishes
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._worker.join(timeout=30)

    # records
    def create(self, filename: str, content_type: str, operation: str, **fields) -> dict:
        """A job waiting for its upload (a swap job: for its two, `source_filename` and
        `source_content_type` among `fields`)."""
        job_id = uuid.uuid4().hex
        now = time.time()
        uploads = (TARGET, SOURCE) if operation == SWAP else (TARGET,)
        record = dict(id=job_id, status=QUEUED, stage=AWAITING_UPLOAD, created=now, updated=now, route="local",
                      operation=operation, filename=filename, content_type=content_type,
                      media=media.kind_of(filename), expires=now + self.limits.url_ttl_s,
                      uploads={what: AWAITING_UPLOAD for what in uploads}, **fields)
        with self._lock:
            self._records[job_id] = record
            self._forget_old()
        (self.root / job_id).mkdir()
        return dict(record)

    def get(self, job_id: str) -> Optional[dict]:
        with self._lock:
            record = self._records.get(job_id) if media.JOB_ID.match(job_id) else None
            return dict(record) if record is not None else None

    def update(self, job_id: str, **fields) -> None:
        with self._lock:
            self._records[job_id].update(fields, updated=time.time())

    def _forget_old(self) -> None:
        finished = sorted((r["updated"], r["id"]) for r in self._records.values() if r["status"] in (DONE, FAILED))
        for _, job_id in finished[:max(0, len(finished) - self.limits.jobs_kept)]:
            del self._records[job_id]
            shutil.rmtree(self.root / job_id, ignore_errors=True)

    def input_path(self, record: dict, what: str = TARGET) -> Path:
        """Where the job's upload `what` (TARGET or SOURCE) is kept."""
        name = record["filename"] if what == TARGET else record["source_filename"]
        return self.root / record["id"] / f"{what}{api.upload_suffix(name)}"

    def upload_media(self, record: dict, what: str) -> tuple[str, int]:
        """The Content-Type and the byte limit of the job's upload `what`."""
        if what == SOURCE:
            return record["source_content_type"], self.limits.max_photo_bytes
        return record["content_type"], self.limit_for(record)

    def file(self, job_id: str, name: str) -> Optional[Path]:
        """A finished job's output file by its name (None for anything else)."""
        record = self.get(job_id)
        if record is None or record["status"] != DONE or name not in (record.get("files") or {}).values():
            return None
        return self.root / job_id / name

    @staticmethod
    def _upload_stage(uploads: dict) -> str:
        states = set(uploads.values())
        return UPLOADING if UPLOADING in states else UPLOADED if states == {RECEIVED} else AWAITING_UPLOAD

    def claim_upload(self, job_id: str, what: str = TARGET) -> bool:
        """Take the job's upload `what` (one PUT at a time); False when it is there or coming."""
        with self._lock:
            record = self._records.get(job_id)
            if record is None or record["uploads"].get(what) != AWAITING_UPLOAD \
                    or record["stage"] not in (AWAITING_UPLOAD, UPLOADING):
                return False
            record["uploads"][what] = UPLOADING
            record["stage"] = UPLOADING
            return True

    def release_upload(self, job_id: str, what: str = TARGET) -> None:
        """An upload that did not complete: the job waits for that input again."""
        with self._lock:
            record = self._records.get(job_id)
            if record is not None and record["stage"] in (UPLOADING, AWAITING_UPLOAD, UPLOADED):
                record["uploads"][what] = AWAITING_UPLOAD
                record["stage"] = self._upload_stage(record["uploads"])

    def received(self, job_id: str, what: str) -> None:
        """A swap job's upload `what` is whole (the job starts at POST .../complete)."""
        with self._lock:
            record = self._records[job_id]
            record["uploads"][what] = RECEIVED
            record["stage"] = self._upload_stage(record["uploads"])
            record["updated"] = time.time()

    def complete(self, job_id: str) -> list[str]:
        """Start a swap job whose two uploads are in: the uploads still missing (nothing is
        started then), else [] (started now, or before: a repeated call changes nothing).
        QueueFull when too many jobs wait (the call may be repeated)."""
        with self._lock:
            record = self._records[job_id]
            if record["stage"] not in (AWAITING_UPLOAD, UPLOADING, UPLOADED):
                return []
            missing = [what for what, state in record["uploads"].items() if state != RECEIVED]
            if missing:
                return missing
            record["stage"] = "waiting"  # before the worker can take it, and before a second call
        if not self.start(job_id, stage_if_full=UPLOADED):
            raise queue.Full
        return []

    def limit_for(self, record: dict) -> int:
        return self.limits.max_video_bytes if record["media"] == "video" else self.limits.max_photo_bytes

    def start(self, job_id: str, stage_if_full: str = UPLOADING) -> bool:
        """Queue an uploaded job; False when the queue is full (the upload, or the completion,
        may be sent again: the job's stage goes back to `stage_if_full`)."""
        self.update(job_id, stage="waiting")  # before the worker can take it
        try:
            self._queue.put_nowait(job_id)
        except queue.Full:
            self.update(job_id, stage=stage_if_full)
            return False
        self.metrics.queue.labels(queue="jobs").set(self._queue.qsize())
        return True

    # the worker
    def _run(self) -> None:
        while True:
            job_id = self._queue.get()
            self.metrics.queue.labels(queue="jobs").set(self._queue.qsize())
            if job_id is None:
                return
            try:
                self._process(job_id)
            except Exception as exc:  # a job's failure is recorded, the worker goes on
                log.exception("job %s failed", job_id)
                self._fail(job_id, f"{type(exc).__name__}: {str(exc)[:300]}")

    def _fail(self, job_id: str, message: str) -> None:
        self.update(job_id, status=FAILED, stage=None, error=message)
        self.metrics.jobs.labels(status=FAILED).inc()

    def _process(self, job_id: str) -> None:
        from faceflow.bundle import ModelError
        from faceflow.images import BadInput, atomic_write
        record = self.get(job_id)
        if record is None:
            return
        src = self.input_path(record)
        folder = src.parent
        stem = Path(record["filename"]).stem
        is_video = record["media"] == "video"
        start = time.perf_counter()
        self.update(job_id, status=RUNNING, stage="processing")
        engine = self.engines()
        files: dict[str, str] = {"report": f"{stem}-report.json"}
        report_path = folder / files["report"]
        suffix = api.upload_suffix(record["filename"])
        frames_seen = [0]

        def progress(done: int, total: Optional[int] = None) -> None:
            self.metrics.frames.inc(max(0, done - frames_seen[0]))
            frames_seen[0] = done
            self.update(job_id, progress={"chunks_done": 0, "chunks_total": 1, "frames_done": done,
                                          "frames_total": total})
        video_name = f"{stem}-{{}}{suffix if suffix in media.VIDEO_OUTPUT_EXTENSIONS else '.mp4'}"
        try:
            if record["operation"] == "analyze":
                report = engine.analyze_file(src, attributes=self.engines.analysis_attributes or None)
                faces = len(report.get("faces", []))
            elif record["operation"] == SWAP:
                report, faces = self._swap(engine, record, src, files, report_path, video_name, progress)
            elif is_video:
                files["video"] = video_name.format("anonymized")
                from faceflow.video import VideoOptions
                if record.get("review") is not None:
                    # an edited report: exactly its faces (faceflow.review), as the split function renders it
                    from faceflow import review
                    summary = review.render_video(engine if review.follows(record["review"]) else None, src,
                                                  folder / files["video"], record["review"], report_out=report_path,
                                                  progress=progress)
                    faces, report = int(summary.get("masked") or 0), None
                else:
                    # the per-frame report is written as the frames go (as `faceflow anonymize --report`)
                    summary = engine.anonymize_file(src, folder / files["video"], options=None,
                                                    video_options=VideoOptions(), report=report_path,
                                                    progress=progress)
                    faces, report = int(summary.get("faces") or 0), None
            else:
                files["image"] = f"{stem}-anonymized{suffix}"
                if record.get("review") is not None:  # an edited report: exactly its faces
                    from faceflow import review
                    report = review.render_photo_file(src, folder / files["image"], record["review"])
                else:
                    report = engine.anonymize_file(src, folder / files["image"])
                faces = report.get("masked", len(report.get("faces", [])))
        except BadInput as exc:
            what = "the swap cannot be done" if record["operation"] == SWAP else "the input cannot be processed"
            self._fail(job_id, f"{what}: {exc}")
            return
        except ModelError as exc:  # an engine whose weights the operator did not supply
            self._fail(job_id, f"the {record['operation']} cannot run here: {exc}")
            return
        finally:
            for what in record["uploads"]:  # the job never runs again
                self.input_path(record, what).unlink(missing_ok=True)
        if report is not None:
            report.pop("output", None)
            report["source"] = record["filename"]
            atomic_write(report_path, json.dumps(report, indent=1).encode())
        self.metrics.faces.inc(faces)
        self.metrics.jobs.labels(status=DONE).inc()
        progress = {"chunks_done": 1, "chunks_total": 1}
        self.update(job_id, status=DONE, stage=None, files=files, faces=faces,
                    ms=round((time.perf_counter() - start) * 1000, 1),
                    outputs={kind: f"/v1/files/{job_id}/{name}" for kind, name in files.items()},
                    progress={**progress, **{k: v for k, v in (self.get(job_id).get("progress") or {}).items()
                                             if k.startswith("frames")}})

    def _swap(self, engine, record: dict, src: Path, files: dict, report_path: Path, video_name: str,
              progress) -> tuple[dict, int]:
        """A swap job's run (Engine.swap_file: the source face checked before anything is
        written, the output marked as synthetic): its report and the faces swapped onto."""
        from faceflow.swap import SwapOptions
        options = SwapOptions(**(record.get("options") or {}))
        face = self.input_path(record, SOURCE)
        if record["media"] == "video":
            from faceflow.video import VideoOptions
            files["video"] = video_name.format("swapped")
            summary = engine.swap_file(src, src.parent / files["video"], face, options,
                                       video_options=VideoOptions(), report=report_path, progress=progress)
            # the per-frame report, with the swap's facts on top as the deployed jobs give them
            # (and names, not this machine's paths)
            report = json.loads(report_path.read_text())
            report.update(operation=SWAP, options=summary["options"], marking=summary["marking"])
            if isinstance(report.get("summary"), dict):
                report["summary"].update(source=record["filename"], output=files["video"])
            faces = int(summary.get("faces") or 0)
        else:
            files["image"] = f"{Path(record['filename']).stem}-swapped{api.upload_suffix(record['filename'])}"
            report = engine.swap_file(src, src.parent / files["image"], face, options)
            faces = len(report.get("faces") or [])
        report["face_source"] = record["source_filename"]
        return report, faces


# -- the resolver's routes -------------------------------------------------------------------

def base_url(app: APIGatewayHttpResolver, public_url: Optional[str]) -> str:
    """Where clients reach this server: --public-url, else the Host they asked for."""
    if public_url:
        return public_url.rstrip("/")
    headers = app.current_event.headers
    proto = (headers.get("x-forwarded-proto") or "http").split(",")[0].strip()
    return f"{proto if proto in ('http', 'https') else 'http'}://{headers.get('host', '127.0.0.1')}"


def add_local_job_routes(app: APIGatewayHttpResolver, jobs: LocalJobs, public_url: Optional[str]) -> None:
    """The job routes of faceflow.web.api with local jobs behind them."""

    def job(job_id: str) -> dict:
        record = jobs.get(job_id)
        if record is None:
            raise NotFoundError(f"no job {job_id}")
        return record

    @app.post(**api.CREATE_JOB)
    def create_job(request: api.JobRequest) -> api.JobCreated:
        suffix = api.upload_suffix(request.filename)
        readable = api.readable_media_types(request.filename)
        if request.content_type is not None and request.content_type not in readable:
            kind = "video" if suffix in api.VIDEO_CONTENT_TYPES else "photo"
            raise BadRequestError(f"content_type of a {kind} must be one of {', '.join(readable)}")
        limit = jobs.limits.max_video_bytes if suffix in api.VIDEO_CONTENT_TYPES else jobs.limits.max_photo_bytes
        if request.size is not None and request.size > limit:
            raise ServiceError(413, f"{request.size} bytes is over the limit of {limit}")
        content_type = request.content_type or api.UPLOAD_CONTENT_TYPES[suffix]
        operation = request.operation or "anonymize"
        if request.report is not None and operation != "anonymize":  # as the deployed API answers
            raise BadRequestError("report: an edited report is rendered by an anonymize job, not an analysis or a swap")
        if request.report is not None and len(json.dumps(request.report)) > api.MAX_REPORT_BYTES:
            raise ServiceError(413, f"report: over the limit of {api.MAX_REPORT_BYTES} bytes of JSON")
        swap = swap_fields(request, suffix in api.VIDEO_CONTENT_TYPES, jobs.engines.options.get("model_dir"))
        record = jobs.create(request.filename, content_type, operation, sensitivity=request.sensitivity,
                             priority=request.priority, review=request.report, **swap)
        base = base_url(app, public_url)
        upload = api.Upload(url=f"{base}/v1/uploads/{record['id']}",
                            headers={"Content-Type": content_type}, expires_in=jobs.limits.url_ttl_s)
        if not swap:
            return api.JobCreated(job_id=record["id"], status=QUEUED, upload=upload)
        source = api.Upload(url=f"{base}/v1/uploads/{record['id']}/{SOURCE}",
                            headers={"Content-Type": swap["source_content_type"]}, expires_in=jobs.limits.url_ttl_s)
        return api.JobCreated(job_id=record["id"], status=QUEUED, upload=upload, source_upload=source,
                              complete_url=f"/v1/jobs/{record['id']}/complete")

    @app.get(**api.GET_JOB)
    def get_job(job_id: str) -> api.Job:
        return api.job_view(job(job_id))

    @app.get(**api.GET_JOB_UPLOAD)
    def get_upload(job_id: str) -> api.UploadStatus:
        raise ServiceError(409, f"job {job(job_id)['id']} was created for a single PUT, not a multipart upload")

    @app.post(**api.COMPLETE_JOB_UPLOAD)
    def complete_upload(job_id: str) -> api.Job:
        record = job(job_id)
        if record["operation"] != SWAP:
            raise ServiceError(409, f"job {record['id']} was created for a single PUT, not a multipart upload")
        try:
            missing = jobs.complete(record["id"])
        except queue.Full:
            raise ServiceError(503, "too many jobs waiting: complete the job again shortly") from None
        if missing:
            names = " and ".join("the target" if what == TARGET else "the source face photo" for what in missing)
            raise ServiceError(409, f"{names} of job {record['id']} {'have' if len(missing) > 1 else 'has'} not been "
                                    "uploaded: PUT it, then complete again")
        return api.job_view(job(job_id))

    @app.get(**api.GET_JOB_RESULT)
    def get_result(job_id: str) -> api.ResultLinks:
        record = job(job_id)
        if record["status"] == FAILED:
            raise ServiceError(410, f"job {job_id} failed: {record.get('error') or 'no reason recorded'}")
        if record["status"] != DONE:
            raise ServiceError(409, f"job {job_id} is {record['status']}")
        base = base_url(app, public_url)
        links = {f"{kind}_url": f"{base}/v1/files/{job_id}/{name}" for kind, name in record["files"].items()}
        return api.ResultLinks(**links, expires_in=jobs.limits.url_ttl_s)


def swap_fields(request: api.JobRequest, is_video: bool, model_dir) -> dict:
    """A swap job's record fields ({} for another operation), checked as the deployed API
    checks them (functions/api/app.py), and the engine's weights: 400 when it cannot run."""
    from faceflow.bundle import ModelError
    from faceflow.images import BadInput
    options = api.swap_request(request, is_video)
    if options is None:
        return {}
    from faceflow.swap import SwapOptions
    try:
        SwapOptions(**options)
        if options.get("engine") == "inswapper":  # the operator's own weights, or none here
            from faceflow.inswapper import model_files
            model_files(model_dir)
    except (BadInput, ModelError) as exc:
        raise BadRequestError(f"swap_options: {exc}") from None
    return {"source_filename": request.source_filename, "source_content_type": api.source_media_type(request),
            "options": options}


def add_compat_routes(app: APIGatewayHttpResolver, photos: api.PhotoRoutes, engines: Engines) -> None:
    """The routes of the two services faceflow follows, for their clients (not in the document):
    POST /process (multipart field `image` → the anonymised image) and POST /analyze (JSON
    {"image": base64} → {"image": the photo with its boxes as base64 JPEG, "faces": [...]})."""

    @app.post("/process", include_in_schema=False)
    def process():
        result = api.anonymize_image(api.read_image(app, photos.max_sync_bytes, field="image"), photos)
        return Response(status_code=200, content_type=api.CONTENT_TYPES[result.format], body=result.data,
                        headers={"X-Faceflow-Faces": str(len(result.report["faces"]))})

    # (a body model would put its schema into the document's components)
    @app.post("/analyze", include_in_schema=False)
    def analyze():
        event = app.current_event
        content_type = event.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != content_types.APPLICATION_JSON:
            raise ServiceError(415, 'send {"image": base64} as application/json')
        try:
            image = api.parse_json_body(event.decoded_body or "").get("image")
        except (ValueError, AttributeError):
            image = None
        if not isinstance(image, str):
            raise BadRequestError('send {"image": "<the photo, base64-encoded>"}')
        if len(image) > photos.max_sync_bytes * 4 // 3 + 4:
            raise ServiceError(413, f"image too large (limit {photos.max_sync_bytes} bytes)")
        try:
            data = base64.b64decode(image, validate=True)
        except ValueError:
            raise BadRequestError("image: not base64") from None
        if not data:
            raise BadRequestError("image: empty")
        record = api.analyze_image(data, photos, engines.analysis_attributes)
        drawn = annotated_jpeg(data, record["faces"], photos.memory_bytes)
        return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=json.dumps(
            {"image": base64.b64encode(drawn).decode("ascii"), "faces": record["faces"],
             "width": record["width"], "height": record["height"]}))


def annotated_jpeg(data: bytes, faces: list[dict], memory_bytes: Optional[int]) -> bytes:
    """The photo with each face's box and label, as JPEG."""
    from faceflow import images
    from faceflow.facetable import draw
    picture = images.decode(data, memory_bytes=memory_bytes)
    return images.encode(images.Picture(draw(images.to_bgr8(picture.pixels), faces), "JPEG"), "JPEG")


def build_resolver(photos: api.PhotoRoutes, jobs: LocalJobs, engines: Engines,
                   public_url: Optional[str]) -> APIGatewayHttpResolver:
    app = APIGatewayHttpResolver(enable_validation=True, json_body_deserializer=api.parse_json_body)
    api.add_error_handlers(app)
    api.add_photo_routes(app, photos)
    add_local_job_routes(app, jobs, public_url)
    add_compat_routes(app, photos, engines)
    add_page_routes(app)

    @app.not_found
    def not_found(exc: NotFoundError) -> Response:
        return api.error_response(404, "no such route")
    return app


# -- the HTTP server -------------------------------------------------------------------------

def error(status: int, message: str, headers: Optional[dict] = None) -> web.Response:
    return web.Response(status=status, content_type="application/json", headers=headers,
                        body=api.Error(message=message, status=status).model_dump_json().encode())


class _Context:
    """What Powertools keeps as the Lambda context (it reads none of it here)."""
    function_name = "faceflow-serve"
    aws_request_id = ""


class Server:
    """`faceflow serve`'s aiohttp application and what it holds: the metrics, the engines, the
    request pool, the local jobs (their files under `workdir`)."""

    def __init__(self, workdir: Path, limits: Optional[Limits] = None, public_url: Optional[str] = None,
                 engine_options: Optional[dict] = None):
        self.limits = limits or Limits()
        self.metrics = Metrics()
        cores = os.cpu_count() or 1
        # the request threads share the cores: each engine's onnxruntime gets its share
        self.engines = Engines(self.metrics, threads=max(1, cores // self.limits.workers),
                               engine_options=engine_options)
        self.jobs = LocalJobs(Path(workdir) / "jobs", self.limits, self.metrics, Engines(
            self.metrics, threads=0, engine_options=engine_options))
        self.photos = api.PhotoRoutes(engine=self.engines, max_sync_bytes=self.limits.max_sync_bytes,
                                      memory_bytes=self.limits.memory_bytes, faces_found=self.metrics.faces.inc)
        self.public_url = public_url
        self.pool = ThreadPoolExecutor(max_workers=self.limits.workers, thread_name_prefix="faceflow-request")
        self._local = threading.local()
        self._admitted = 0  # requests running or waiting for a thread

    def resolver(self) -> APIGatewayHttpResolver:
        app = getattr(self._local, "resolver", None)
        if app is None:
            app = self._local.resolver = build_resolver(self.photos, self.jobs, self.engines, self.public_url)
        return app

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.jobs.stop()

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._measure])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_put("/v1/uploads/{job_id}", functools.partial(self._upload, what=TARGET))
        app.router.add_put(f"/v1/uploads/{{job_id}}/{SOURCE}", functools.partial(self._upload, what=SOURCE))
        app.router.add_get("/v1/files/{job_id}/{name}", self._download)
        add_stream_route(app, self.jobs.engines)  # GET /v1/stream: live streams (engines on all cores, as jobs)
        for route in ("/v1/jobs/{job_id}/upload", "/v1/jobs/{job_id}/complete", "/v1/jobs/{job_id}/result",
                      "/v1/jobs/{job_id}", "/v1/jobs", "/v1/analyze", "/v1/anonymize", "/v1/openapi.json",
                      "/process", "/analyze", "/", "/static/{name}"):
            app.router.add_route("*", route, self._resolve)
        app.router.add_route("*", "/{path:.*}", self._resolve)  # the resolver's 404
        app.on_cleanup.append(lambda _: asyncio.get_running_loop().run_in_executor(None, self.close))
        return app

    @web.middleware
    async def _measure(self, request: web.Request, handler) -> web.StreamResponse:
        start = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        route = "other" if route == "/{path}" else route
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own refusals, in the Error shape
            response = error(exc.status, exc.reason)
        except Exception:  # a defect: logged, counted, answered in the Error shape
            log.exception("%s %s failed", request.method, route)
            response = error(500, "internal error (see the server's log)")
        self.metrics.observe(route, request.method, response.status, time.perf_counter() - start)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, self.metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": self.metrics.content_type})

    async def _read_body(self, request: web.Request, limit: int) -> Optional[bytes]:
        """The body, or None when it is over `limit` (read no further than that)."""
        if request.content_length is not None and request.content_length > limit:
            return None
        body = bytearray()
        async for chunk in request.content.iter_chunked(UPLOAD_CHUNK):
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    async def _resolve(self, request: web.Request) -> web.Response:
        body = await self._read_body(request, self.limits.max_body_bytes)
        if body is None:
            return error(413, f"request body too large (limit {self.limits.max_body_bytes} bytes)")
        peer = request.remote or "127.0.0.1"
        event = build_event(request.method, request.raw_path, list(request.headers.items()), body,
                            source_ip=peer, request_id=new_request_id())
        if self._admitted >= self.limits.workers + self.limits.waiting:
            return error(503, "busy: every worker is taken and the queue is full; try again shortly",
                         {"Retry-After": "1"})
        self._admitted += 1
        self.metrics.queue.labels(queue="requests").set(max(0, self._admitted - self.limits.workers))
        future = asyncio.get_running_loop().run_in_executor(self.pool, self._answer, event)

        def release(_):
            self._admitted -= 1
            self.metrics.queue.labels(queue="requests").set(max(0, self._admitted - self.limits.workers))
        future.add_done_callback(release)  # when the work ends, not when the client stops waiting
        try:
            status, headers, data = await asyncio.wait_for(asyncio.shield(future), self.limits.timeout_s)
        except asyncio.TimeoutError:
            return error(504, f"the request took longer than {self.limits.timeout_s:g} s")
        response = web.Response(status=status, body=data)
        for name, value in headers:
            if name == "content-type":
                response.headers["Content-Type"] = value
            else:
                response.headers.add(name, value)
        return response

    def _answer(self, event: dict) -> tuple[int, list[tuple[str, str]], bytes]:
        return response_parts(self.resolver().resolve(event, _Context()))

    async def _upload(self, request: web.Request, what: str) -> web.Response:
        """A job's input (`what`: TARGET, or a swap's SOURCE), PUT to the URL POST /v1/jobs
        gave; the job starts when it is whole (a swap job: at POST .../complete)."""
        record = self.jobs.get(request.match_info["job_id"])
        if record is None or what not in record["uploads"]:
            return error(404, "no such job" if record is None else f"job {record['id']} has no {what} upload")
        if record["uploads"][what] != AWAITING_UPLOAD:
            return error(409, f"job {record['id']} has its {what} already")
        if time.time() > record["expires"]:
            return error(403, "the upload URL has expired: create a new job")
        expected_type, limit = self.jobs.upload_media(record, what)
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != expected_type:
            return error(400, f"send the upload with Content-Type: {expected_type}")
        if request.content_length is not None and request.content_length > limit:
            return error(413, f"over the limit of {limit} bytes")
        if not self.jobs.claim_upload(record["id"], what):
            return error(409, f"job {record['id']} has its {what} already (or it is being uploaded)")
        target = self.jobs.input_path(record, what)
        partial = target.with_name(target.name + ".part")
        loop = asyncio.get_running_loop()
        received, whole = 0, False
        try:
            with open(partial, "wb") as out:
                async for chunk in request.content.iter_chunked(UPLOAD_CHUNK):
                    received += len(chunk)
                    if received > limit:
                        return error(413, f"over the limit of {limit} bytes")
                    await loop.run_in_executor(None, out.write, chunk)
            if received == 0:
                return error(400, "empty upload")
            partial.replace(target)
            whole = True
        finally:
            if not whole:  # refused, or the connection broke: nothing half-written stays
                partial.unlink(missing_ok=True)
                self.jobs.release_upload(record["id"], what)
        if record["operation"] == SWAP:
            self.jobs.received(record["id"], what)
            return web.Response(status=200)
        if not self.jobs.start(record["id"]):
            target.unlink(missing_ok=True)
            self.jobs.release_upload(record["id"])
            return error(503, "too many jobs waiting: send the upload again shortly", {"Retry-After": "5"})
        return web.Response(status=200)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self.jobs.file(request.match_info["job_id"], name)
        if path is None or not path.is_file():
            return error(404, "no such file")
        return web.FileResponse(path, headers={"Content-Type": media.media_type_for(name) if not name.endswith(".json")
                                               else "application/json",
                                               "Content-Disposition": f'attachment; filename="{name}"'})


def run(host: str = "127.0.0.1", port: int = 8080, workdir: Optional[Path] = None, limits: Optional[Limits] = None,
        public_url: Optional[str] = None, engine_options: Optional[dict] = None, ready=None) -> None:
    """Serve until interrupted; the jobs' files live in `workdir` (a temporary folder, removed
    at the end, when not given)."""
    with tempfile.TemporaryDirectory(prefix="faceflow-serve-") as scratch:
        server = Server(Path(workdir) if workdir else Path(scratch), limits, public_url, engine_options)
        web.run_app(server.application(), host=host, port=port, print=ready, access_log=None,
                    handle_signals=True)
