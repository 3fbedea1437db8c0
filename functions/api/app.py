"""The HTTP API (API Gateway HTTP API, payload 2.0).

    POST /v1/jobs               create a job (a photo or a video; optional sensitivity and
                                priority, used by the routing): a job id and a presigned upload URL
    GET  /v1/jobs/{id}          status (queued, running, done, failed), stage, route, progress
                                (videos: chunks done of total), outputs, error
    GET  /v1/jobs/{id}/result   presigned download URLs of the result and its report
    POST /v1/analyze            small image in (raw body or multipart) → faces as JSON
    POST /v1/anonymize          small image in → anonymised image out
    GET  /v1/openapi.json       this API's OpenAPI document

Jobs belong to the caller (JWT subject or IAM principal): another caller gets 404, and so
does an authenticated caller for a job without an owner (one dropped into the bucket).
No `from __future__ import annotations` here: Powertools reads the route signatures' types
at run time to validate requests.
"""
import base64
import json
import os
import re
import sys
from email.parser import BytesParser
from email.policy import HTTP
from typing import Annotated, Literal, Optional

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import (
    BadRequestError,
    NotFoundError,
    ServiceError,
)
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field

from faceflow import media
from functions.common.aws import Adapters, make_tracer, result_keys
from functions.common.jobs import DONE, QUEUED, new_job_id
from functions.common.settings import UPLOAD_CONTENT_TYPES as PHOTO_CONTENT_TYPES
from functions.common.settings import UPLOAD_PREFIX

logger = Logger(service="faceflow-api")
tracer = make_tracer("faceflow-api")  # capture_response=False below: responses hold presigned
# URLs, face boxes or image bytes, none of which belongs in trace metadata
metrics = Metrics(namespace="faceflow", service="faceflow-api")
app = APIGatewayHttpResolver(enable_validation=True)

adapters = Adapters()
_engine = None


def engine():
    """The face engine, loaded on first use: only /v1/analyze and /v1/anonymize need it, so a
    cold start that serves the job routes skips cv2, onnxruntime and the models (about a third
    of a second). Environments initialised ahead of traffic (provisioned concurrency,
    SnapStart) load it at init instead, so no request waits for it there."""
    global _engine
    if _engine is None:
        from faceflow.engine import Engine
        _engine = Engine()
    return _engine


if os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") in ("provisioned-concurrency", "snap-start"):
    engine()

JOB_ID = media.JOB_ID
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,200}$"
CONTENT_TYPES = {fmt: media_type for fmt, (_, media_type) in media.IMAGE_FORMATS.items()}
# Whole videos (the split function takes them from uploads/).
VIDEO_CONTENT_TYPES = media.VIDEO_MEDIA_TYPES
UPLOAD_CONTENT_TYPES = {**PHOTO_CONTENT_TYPES, **VIDEO_CONTENT_TYPES}


class JobRequest(BaseModel):
    filename: str = Field(pattern=SAFE_NAME, description="name of the photo or video, e.g. party.jpg, talk.mp4")
    content_type: Optional[str] = Field(default=None, description="Content-Type to upload with")
    sensitivity: Optional[Literal["private", "normal"]] = Field(
        default=None, description="private: processed only by the Lambda functions, never the GPU endpoint")
    priority: Optional[Literal["low", "normal", "high"]] = Field(
        default=None, description="low-priority long videos may wait for the GPU endpoint")


class Upload(BaseModel):
    url: str
    method: str = "PUT"
    headers: dict[str, str]
    expires_in: int


class JobCreated(BaseModel):
    job_id: str
    status: str
    upload: Upload


class Progress(BaseModel):
    chunks_done: int
    chunks_total: int


class Job(BaseModel):
    id: str
    status: str
    created: float
    updated: float
    stage: Optional[str] = None
    route: Optional[str] = None
    progress: Optional[Progress] = None
    error: Optional[str] = None
    outputs: Optional[dict[str, str]] = None
    faces: Optional[int] = None
    ms: Optional[float] = None


class ResultLinks(BaseModel):
    image_url: Optional[str] = None
    video_url: Optional[str] = None
    report_url: str
    expires_in: int


def caller() -> str:
    """Who is asking: the JWT subject or the IAM principal (API Gateway checked either)."""
    ctx = app.current_event.raw_event.get("requestContext", {})
    auth = ctx.get("authorizer") or {}
    jwt = (auth.get("jwt") or {}).get("claims") or {}
    iam = auth.get("iam") or {}
    return jwt.get("sub") or iam.get("userArn") or "anonymous"


def owned_job(job_id: str) -> dict:
    job = adapters.jobs.get(job_id) if JOB_ID.match(job_id) else None
    who = caller()
    # a job without an owner (an object dropped into the bucket) is nobody's: only an
    # unauthenticated caller (a local stack without an authorizer) may read it
    owner = job.get("owner") if job is not None else None
    if job is None or owner != who and not (owner is None and who == "anonymous"):
        raise NotFoundError(f"no job {job_id}")
    return job


@app.post("/v1/jobs")
@tracer.capture_method(capture_response=False)
def create_job(request: JobRequest) -> Response[JobCreated]:
    suffix = "." + request.filename.rsplit(".", 1)[-1].lower() if "." in request.filename else ""
    if suffix not in UPLOAD_CONTENT_TYPES:
        raise BadRequestError(f"filename must end in one of {', '.join(sorted(UPLOAD_CONTENT_TYPES))}")
    job_id = new_job_id()
    key = f"{UPLOAD_PREFIX}{job_id}/{request.filename}"
    content_type = request.content_type or UPLOAD_CONTENT_TYPES[suffix]
    settings = adapters.settings
    url = adapters.s3.generate_presigned_url(
        "put_object", ExpiresIn=settings.url_ttl_s,
        Params={"Bucket": settings.input_bucket, "Key": key, "ContentType": content_type})
    adapters.jobs.put(job_id, QUEUED, owner=caller(), input=f"s3://{settings.input_bucket}/{key}",
                      media="video" if suffix in VIDEO_CONTENT_TYPES else "image",
                      sensitivity=request.sensitivity, priority=request.priority)
    metrics.add_metric(name="JobsCreated", unit=MetricUnit.Count, value=1)
    body = JobCreated(job_id=job_id, status=QUEUED, upload=Upload(
        url=url, headers={"Content-Type": content_type}, expires_in=settings.url_ttl_s))
    return Response(status_code=201, content_type=content_types.APPLICATION_JSON, body=body)


@app.get("/v1/jobs/<job_id>")
def get_job(job_id: str) -> Job:
    job = owned_job(job_id)
    fields = {k: v for k, v in job.items() if k in Job.model_fields}
    progress = job.get("progress")
    if not isinstance(progress, dict) and job.get("chunks_total") is not None:
        progress = {"chunks_done": job.get("chunks_done") or 0, "chunks_total": job["chunks_total"]}
    try:
        fields["progress"] = Progress(**progress) if isinstance(progress, dict) else None
    except ValueError:
        fields["progress"] = None
    return Job(**fields)


@app.get("/v1/jobs/<job_id>/result")
def get_result(job_id: str) -> ResultLinks:
    job = owned_job(job_id)
    if job["status"] != DONE:
        raise ServiceError(409, f"job {job_id} is {job['status']}" +
                           (f": {job['error']}" if job.get("error") else ""))
    settings = adapters.settings

    def link(key: str) -> str:
        return adapters.s3.generate_presigned_url(
            "get_object", ExpiresIn=settings.url_ttl_s, Params={"Bucket": settings.output_bucket, "Key": key})
    links = recorded_links(job, link)
    if links is not None:
        return links
    name = job["input"].rsplit("/", 1)[-1]
    image_key, report_key = result_keys(job_id, name)
    return ResultLinks(image_url=link(image_key), report_url=link(report_key), expires_in=settings.url_ttl_s)


_OUTPUT_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/(?P<key>.+)$")


def recorded_links(job: dict, link) -> Optional[ResultLinks]:
    """Links from the job record's `outputs` (a video's result is named apart from its input;
    the GPU endpoint's too), for objects of the output bucket only; None when it has none."""
    outputs = job.get("outputs")
    if not isinstance(outputs, dict):
        return None
    keys = {}
    for kind, uri in outputs.items():
        match = _OUTPUT_URI.match(str(uri))
        if match and match["bucket"] == adapters.settings.output_bucket:
            keys[kind] = match["key"]
    main = next((k for k in ("video", "image", "output") if k in keys), None)
    if main is None or "report" not in keys:
        return None
    urls = {"video_url" if main == "video" else "image_url": link(keys[main])}
    return ResultLinks(**urls, report_url=link(keys["report"]), expires_in=adapters.settings.url_ttl_s)


def request_image() -> bytes:
    """The image from a raw body or the first file of a multipart/form-data body, size-checked
    before any decoding."""
    event = app.current_event
    limit = adapters.settings.max_sync_bytes
    declared = int(event.headers.get("content-length") or 0)
    if declared > limit * 4 // 3 + 4096:
        raise ServiceError(413, f"request body too large (limit {limit} bytes)")
    body = event.body or ""
    data = base64.b64decode(body) if event.is_base64_encoded else body.encode("latin-1", "replace")
    content_type = event.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + data)
        parts = [p for p in message.iter_parts() if p.get_filename() or p.get_param("name", header="content-disposition") == "file"]
        if not parts:
            raise BadRequestError("multipart body has no file part")
        data = parts[0].get_payload(decode=True) or b""
    if len(data) > limit:
        raise ServiceError(413, f"image too large: {len(data)} bytes (limit {limit})")
    if not data:
        raise BadRequestError("empty body: send the image as the body or as a multipart file")
    return data


@app.post("/v1/analyze")
@tracer.capture_method(capture_response=False)
def analyze() -> dict:
    from faceflow.images import BadInput, TooLarge
    data = request_image()  # size-checked before the engine is even loaded
    try:
        record = engine().analyze_bytes(data, source="request", memory_bytes=adapters.settings.memory_bytes)
    except TooLarge as exc:
        raise ServiceError(413, str(exc)) from None
    except BadInput as exc:
        raise BadRequestError(str(exc)) from None
    metrics.add_metric(name="FacesFound", unit=MetricUnit.Count, value=len(record["faces"]))
    return record


# No return annotation on the two routes below: their bodies are not JSON, and Powertools
# would try to validate them as such.
@app.post("/v1/anonymize", responses={200: {"description": "the anonymised image, same format",
                                            "content": {t: {} for t in CONTENT_TYPES.values()}}})
@tracer.capture_method(capture_response=False)
def anonymize(method: Annotated[str, Query(pattern="^(blur|pixelate|solid)$")] = "blur",
              shape: Annotated[str, Query(pattern="^(ellipse|box)$")] = "ellipse"):
    from faceflow.anonymize import MaskOptions
    from faceflow.images import BadInput, TooLarge
    data = request_image()
    try:
        result = engine().anonymize_bytes(data, MaskOptions(method=method, shape=shape), source="request",
                                          memory_bytes=adapters.settings.memory_bytes)
    except TooLarge as exc:
        raise ServiceError(413, str(exc)) from None
    except BadInput as exc:
        raise BadRequestError(str(exc)) from None
    faces = len(result.report["faces"])
    metrics.add_metric(name="FacesFound", unit=MetricUnit.Count, value=faces)
    return Response(status_code=200, content_type=CONTENT_TYPES[result.format], body=result.data,
                    headers={"X-Faceflow-Faces": str(faces)})


@app.get("/v1/openapi.json")
def openapi():
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=openapi_json())


def openapi_json() -> str:
    return app.get_openapi_json_schema(title="faceflow", version="1", description=__doc__)


@app.exception_handler(RequestValidationError)
def invalid_request(exc: RequestValidationError) -> Response[str]:
    # Malformed JSON and wrong fields are the client's fault: 400 with what was wrong.
    problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    return Response(status_code=400, content_type=content_types.APPLICATION_JSON,
                    body=json.dumps({"statusCode": 400, "message": "invalid request: " + "; ".join(problems)}))


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)


if __name__ == "__main__" and "--openapi" in sys.argv:
    print(openapi_json())
