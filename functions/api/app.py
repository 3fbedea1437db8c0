"""The HTTP API (API Gateway HTTP API, payload 2.0).

    POST /v1/jobs                 create a job (a photo or a video; operation anonymize, the
                                  default, or analyze: the JSON report only; optional sensitivity
                                  and priority, used by the routing): a job id and where to upload,
                                  one presigned PUT or, for `size` at or above the multipart
                                  threshold, an S3 multipart upload (presigned part URLs)
    GET  /v1/jobs/{id}            status (queued, running, done, failed), stage, route, progress
                                  (videos: chunks done of total), outputs, error
    GET  /v1/jobs/{id}/upload     a multipart upload: which parts arrived, and fresh URLs for the
                                  missing ones (resume after a broken connection)
    POST /v1/jobs/{id}/complete   join the parts: the upload becomes the job's input and it starts
    GET  /v1/jobs/{id}/result     presigned download URLs of the result and its report
    POST /v1/analyze              small image in (raw body or multipart) → faces and their
                                  attributes as JSON (?attributes=, ?format=json|rekognition)
    POST /v1/anonymize            small image in → anonymised image out
    GET  /v1/openapi.json         this API's OpenAPI document

Every 4xx has one body shape, `{"message": ..., "status": ...}` (the Error schema).
FACEFLOW_MULTIPART_THRESHOLD_BYTES (100 MiB) and FACEFLOW_MULTIPART_PART_BYTES (64 MiB, at least
S3's 5 MiB) set when an upload goes in parts and how large they are.
Jobs belong to the caller (JWT subject or IAM principal): another caller gets 404, and so
does an authenticated caller for a job without an owner (one dropped into the bucket).
No `from __future__ import annotations` here: Powertools reads the route signatures' types
at run time to validate requests.
"""
import base64
import json
import math
import os
import re
import sys
import traceback
from pathlib import Path
from email.parser import BytesParser
from email.policy import HTTP
from typing import Annotated, Any, Literal, Optional, Union

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import (
    BadRequestError,
    NotFoundError,
    ServiceError,
)
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from aws_lambda_powertools.event_handler.openapi.params import Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from faceflow import media
from functions.common.aws import Adapters, make_tracer, result_keys
from functions.common.jobs import DONE, FAILED, QUEUED, new_job_id
from functions.video.config import VideoSettings
from functions.common.settings import UPLOAD_CONTENT_TYPES as PHOTO_CONTENT_TYPES
from functions.common.settings import ANALYZE, ANALYZE_PREFIX, ANONYMIZE, UPLOAD_PREFIX


def parse_json_body(text: str) -> Any:
    """json.loads for request bodies: input it cannot represent (nesting deeper than the
    interpreter's recursion limit, integers over Python's digit limit) is a decode error, which
    Powertools answers as a bad request, not a crash."""
    try:
        return json.loads(text)
    except (RecursionError, ValueError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        raise json.JSONDecodeError(f"unreadable JSON: {type(exc).__name__}", text, 0) from None


logger = Logger(service="faceflow-api")
tracer = make_tracer("faceflow-api")  # capture_response=False below: responses hold presigned
# URLs, face boxes or image bytes, none of which belongs in trace metadata
metrics = Metrics(namespace="faceflow", service="faceflow-api")
app = APIGatewayHttpResolver(enable_validation=True, json_body_deserializer=parse_json_body)

adapters = Adapters()
video_settings = VideoSettings.from_env()  # the split function's limits, checked before an upload
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
CONTENT_TYPES = {fmt: media_type for fmt, (_, media_type) in media.IMAGE_FORMATS.items()}
# Whole videos (the split function takes them from uploads/).
VIDEO_CONTENT_TYPES = media.VIDEO_MEDIA_TYPES
UPLOAD_CONTENT_TYPES = {**PHOTO_CONTENT_TYPES, **VIDEO_CONTENT_TYPES}


def _either_case(suffix: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in suffix)


# A plain file name (it becomes part of an S3 key) with an extension of a photo or video read:
# in the document, so clients and generated requests know it.
UPLOAD_NAME = (r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,200}\.("
               + "|".join(_either_case(s[1:]) for s in sorted(UPLOAD_CONTENT_TYPES)) + ")$")
# What a job's operation reads: a photo job one of the still-image types, a video job one of the
# video types. Anything else (text/html, a value with CRLF) is refused, never signed into a URL.
PHOTO_MEDIA_TYPES = tuple(sorted(set(PHOTO_CONTENT_TYPES.values())))
VIDEO_MEDIA_TYPES = tuple(sorted(set(VIDEO_CONTENT_TYPES.values())))
UploadMediaType = Literal[PHOTO_MEDIA_TYPES + VIDEO_MEDIA_TYPES]  # type: ignore[valid-type]
# Bodies /v1/analyze and /v1/anonymize take: an image, raw or as a multipart/form-data file.
IMAGE_BODY_TYPES = (*CONTENT_TYPES.values(), "application/octet-stream", "multipart/form-data")

MIB = 1024 * 1024
# S3's multipart limits: every part but the last at least 5 MiB, at most 10,000 parts.
S3_MIN_PART_BYTES = 5 * MIB
S3_MAX_PARTS = 10_000
# Uploads of at least this many bytes go in parts (S3 advises multipart above about 100 MB): a
# broken connection costs one part, not the whole file. A 2 GiB video is 32 parts of 64 MiB.
MULTIPART_THRESHOLD_BYTES = int(os.environ.get("FACEFLOW_MULTIPART_THRESHOLD_BYTES", 100 * MIB))
MULTIPART_PART_BYTES = int(os.environ.get("FACEFLOW_MULTIPART_PART_BYTES", 64 * MIB))
if MULTIPART_PART_BYTES < S3_MIN_PART_BYTES:
    raise RuntimeError(f"FACEFLOW_MULTIPART_PART_BYTES must be at least {S3_MIN_PART_BYTES} (S3's minimum part)")
MAX_MULTIPART_BYTES = MULTIPART_PART_BYTES * S3_MAX_PARTS
# Presigned part URLs in one answer: keeps it far below Lambda's 6 MB response limit; the
# upload route hands out the next ones.
MAX_PART_URLS = 1000
# Job record `upload` field: an open multipart upload, then one being (or already) joined.
MULTIPART, COMPLETING, ABORTED = "multipart", "completing", "aborted"


# -- request and response models -------------------------------------------------------------

class Error(BaseModel):
    """The body of every error answer."""
    message: str = Field(description="what was wrong, for a person to read")
    status: Optional[int] = Field(default=None, description="the HTTP status; every answer of the function has it "
                                  "(API Gateway's own 401, 403 and 429 answers carry only `message`)")


class JobRequest(BaseModel):
    filename: str = Field(pattern=UPLOAD_NAME, description=(
        "name of the photo or video, e.g. party.jpg, talk.mp4: letters, digits, '.', '_', '-' and spaces, ending in "
        + ", ".join(sorted(UPLOAD_CONTENT_TYPES))))
    content_type: Optional[UploadMediaType] = Field(  # type: ignore[valid-type]
        default=None, description="Content-Type to upload with: an image type for a photo, a video type for a "
                                  "video (default: the type of the filename's extension)")
    size: Optional[int] = Field(default=None, ge=1, description=(
        f"bytes to upload; at or above the multipart threshold ({MULTIPART_THRESHOLD_BYTES}) the upload is an S3 "
        "multipart upload that can be resumed"))
    sensitivity: Optional[Literal["private", "normal"]] = Field(
        default=None, description="private: processed only by the Lambda functions, never the GPU endpoint")
    priority: Optional[Literal["low", "normal", "high"]] = Field(
        default=None, description="low-priority long videos may wait for the GPU endpoint")
    operation: Optional[Literal["anonymize", "analyze"]] = Field(
        default=None, description="anonymize (default): the masked photo or video and its report; analyze: only the "
                                  "JSON report, each face with its attributes (a video: per frame, and per track a "
                                  "summary of a sample of its faces)")


class Upload(BaseModel):
    """One presigned PUT of the whole file."""
    method: Literal["PUT"] = "PUT"
    url: str
    headers: dict[str, str]
    expires_in: int


class PartUpload(BaseModel):
    part_number: int = Field(description="1-based; part n holds bytes (n-1)*part_size up to n*part_size")
    url: str = Field(description="presigned PUT URL of this part")


class MultipartUpload(BaseModel):
    """An S3 multipart upload: PUT each part to its URL (in any order, again if it failed),
    then POST complete_url."""
    method: Literal["multipart"] = "multipart"
    upload_id: str
    size: int
    part_size: int = Field(description="bytes in every part but the last")
    parts_total: int
    parts: list[PartUpload] = Field(description=f"URLs of parts not received yet (at most {MAX_PART_URLS}; "
                                                "status_url gives the next ones)")
    expires_in: int = Field(description="seconds the part URLs stay valid; status_url gives fresh ones")
    status_url: str = Field(description="GET: which parts arrived, URLs for the missing ones")
    complete_url: str = Field(description="POST when every part is uploaded")


class ReceivedPart(BaseModel):
    part_number: int
    size: int
    etag: str


class UploadStatus(MultipartUpload):
    received: list[ReceivedPart]
    missing: list[int] = Field(description="part numbers not received yet, or received with the wrong size")


class JobCreated(BaseModel):
    job_id: str
    status: str
    upload: Annotated[Union[Upload, MultipartUpload], Field(discriminator="method")]


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
    operation: Optional[str] = None
    progress: Optional[Progress] = None
    error: Optional[str] = None
    outputs: Optional[dict[str, str]] = None
    faces: Optional[int] = None
    ms: Optional[float] = None


class ResultLinks(BaseModel):
    """An analysis job has only its report."""
    image_url: Optional[str] = None
    video_url: Optional[str] = None
    report_url: str
    expires_in: int


class FacesFound(BaseModel):
    """Faces in one image (the CLI's `analyze` object: see the README's JSON schema)."""
    model_config = {"extra": "allow"}
    source: str
    width: int
    height: int
    format: str
    faces: list[dict[str, Any]]


class DetectFaces(BaseModel):
    """Amazon Rekognition DetectFaces' response shape (see the README's Rekognition mapping)."""
    model_config = {"extra": "allow"}
    FaceDetails: list[dict[str, Any]]


ERROR_MEANINGS = {
    400: "bad request: malformed JSON or fields, or an image that cannot be read",
    404: "no such job for this caller",
    409: "the job is not in a state that allows this (not done yet, upload incomplete)",
    410: "the job failed: its result will never exist (the message says why and what to do)",
    413: "too large",
    415: "unsupported Content-Type",
}


# The routes that take the id POST /v1/jobs returns (OpenAPI links: clients and generated
# tests follow them).
JOB_LINKS = {name: {"operationId": name, "parameters": {"job_id": "$response.body#/job_id"}}
             for name in ("getJob", "getJobUpload", "completeJobUpload", "getJobResult")}


def answers(success: int, description: str, content: dict, *errors: int, links: Optional[dict] = None,
            headers: Optional[dict] = None) -> dict:
    """A route's documented responses: its success and each error it gives, all errors with the
    Error schema."""
    extra = {"links": links} if links else {}
    if headers:
        extra["headers"] = headers
    documented = {success: {"description": description, "content": content, **extra}}
    for status in sorted(errors):
        documented[status] = {"description": ERROR_MEANINGS[status],
                              "content": {content_types.APPLICATION_JSON: {"model": Error}}}
    return documented


def json_of(model: type) -> dict:
    return {content_types.APPLICATION_JSON: {"model": model}}


PATTERN_MISMATCH = "not of the form the OpenAPI document gives (see the field's description)"


def error_response(status: int, message: str) -> Response:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON,
                    body=Error(message=message, status=status).model_dump_json())


# -- jobs ------------------------------------------------------------------------------------

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


@app.post("/v1/jobs", status_code=201, operation_id="createJob",
          responses=answers(201, "the job, and where to upload its input", json_of(JobCreated), 400, 413, 415,
                            links=JOB_LINKS))
@tracer.capture_method(capture_response=False)
def create_job(request: JobRequest) -> JobCreated:
    suffix = "." + request.filename.rsplit(".", 1)[-1].lower()  # one of UPLOAD_CONTENT_TYPES: the pattern says so
    is_video = suffix in VIDEO_CONTENT_TYPES
    readable = VIDEO_MEDIA_TYPES if is_video else PHOTO_MEDIA_TYPES
    if request.content_type is not None and request.content_type not in readable:
        raise BadRequestError(f"content_type of a {'video' if is_video else 'photo'} must be one of "
                              f"{', '.join(readable)}")
    settings = adapters.settings
    size = request.size
    if size is not None and not is_video and size > settings.max_upload_bytes:
        raise ServiceError(413, f"a photo of {size} bytes is over the limit of {settings.max_upload_bytes}")
    if size is not None and is_video and size > video_settings.max_video_bytes:
        raise ServiceError(413, f"a video of {size} bytes is over the limit of {video_settings.max_video_bytes}")
    if size is not None and size > MAX_MULTIPART_BYTES:
        raise ServiceError(413, f"{size} bytes is over the limit of {MAX_MULTIPART_BYTES}")
    job_id = new_job_id()
    operation = request.operation or ANONYMIZE
    key = f"{ANALYZE_PREFIX if operation == ANALYZE else UPLOAD_PREFIX}{job_id}/{request.filename}"
    content_type = request.content_type or UPLOAD_CONTENT_TYPES[suffix]
    record = dict(owner=caller(), input=f"s3://{settings.input_bucket}/{key}", media="video" if is_video else "image",
                  sensitivity=request.sensitivity, priority=request.priority, operation=operation)
    if size is not None and size >= MULTIPART_THRESHOLD_BYTES:
        upload_id = adapters.s3.create_multipart_upload(
            Bucket=settings.input_bucket, Key=key, ContentType=content_type)["UploadId"]
        record.update(upload=MULTIPART, upload_id=upload_id, size=size, part_size=MULTIPART_PART_BYTES)
        adapters.jobs.put(job_id, QUEUED, **record)
        upload: Union[Upload, MultipartUpload] = multipart_upload(job_id, key, upload_id, size, MULTIPART_PART_BYTES,
                                                                  received=set())
    else:
        url = adapters.s3.generate_presigned_url(
            "put_object", ExpiresIn=settings.url_ttl_s,
            Params={"Bucket": settings.input_bucket, "Key": key, "ContentType": content_type})
        adapters.jobs.put(job_id, QUEUED, **record)
        upload = Upload(url=url, headers={"Content-Type": content_type}, expires_in=settings.url_ttl_s)
    metrics.add_metric(name="JobsCreated", unit=MetricUnit.Count, value=1)
    return JobCreated(job_id=job_id, status=QUEUED, upload=upload)


def multipart_upload(job_id: str, key: str, upload_id: str, size: int, part_size: int,
                     received: set[int]) -> MultipartUpload:
    settings = adapters.settings
    total = math.ceil(size / part_size)
    missing = [n for n in range(1, total + 1) if n not in received][:MAX_PART_URLS]
    parts = [PartUpload(part_number=n, url=adapters.s3.generate_presigned_url(
        "upload_part", ExpiresIn=settings.url_ttl_s,
        Params={"Bucket": settings.input_bucket, "Key": key, "UploadId": upload_id, "PartNumber": n}))
        for n in missing]
    return MultipartUpload(upload_id=upload_id, size=size, part_size=part_size, parts_total=total, parts=parts,
                           expires_in=settings.url_ttl_s, status_url=f"/v1/jobs/{job_id}/upload",
                           complete_url=f"/v1/jobs/{job_id}/complete")


def open_upload(job: dict) -> tuple[str, str, int, int]:
    """(key, upload id, size, part size) of the job's multipart upload that is still open."""
    state = job.get("upload")
    if state is None:
        raise ServiceError(409, f"job {job['id']} was created for a single PUT, not a multipart upload")
    if state != MULTIPART:
        raise ServiceError(409, f"the upload of job {job['id']} is {'complete' if state == COMPLETING else state}")
    key = job["input"].split("/", 3)[3]
    return key, job["upload_id"], int(job["size"]), int(job["part_size"])


def received_parts(job: dict, key: str, upload_id: str) -> list[ReceivedPart]:
    """The parts S3 holds (list_parts, every page), or 409 when the upload is gone (aborted by
    the bucket's lifecycle rule)."""
    parts: list[ReceivedPart] = []
    marker = 0
    for _ in range(S3_MAX_PARTS // 1000 + 1):  # 1000 parts a page
        try:
            page = adapters.s3.list_parts(Bucket=adapters.settings.input_bucket, Key=key, UploadId=upload_id,
                                          PartNumberMarker=marker)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                adapters.jobs.put(job["id"], FAILED, upload=ABORTED,
                                  error="the upload was aborted (incomplete for too long)")
                raise ServiceError(409, f"the upload of job {job['id']} was aborted: create a new job") from None
            raise
        parts += [ReceivedPart(part_number=p["PartNumber"], size=p["Size"], etag=p["ETag"])
                  for p in page.get("Parts", [])]
        if not page.get("IsTruncated"):
            break
        marker = int(page["NextPartNumberMarker"])
    return parts


def complete_parts(parts: list[ReceivedPart], size: int, part_size: int) -> set[int]:
    """Part numbers of `parts` that hold exactly the bytes they should."""
    total = math.ceil(size / part_size)
    last = size - (total - 1) * part_size
    return {p.part_number for p in parts
            if 1 <= p.part_number <= total and p.size == (last if p.part_number == total else part_size)}


@app.get("/v1/jobs/<job_id>/upload", operation_id="getJobUpload",
         responses=answers(200, "the parts received and URLs for the missing ones", json_of(UploadStatus), 404, 409))
def get_upload(job_id: str) -> UploadStatus:
    job = owned_job(job_id)
    key, upload_id, size, part_size = open_upload(job)
    parts = received_parts(job, key, upload_id)
    good = complete_parts(parts, size, part_size)
    upload = multipart_upload(job_id, key, upload_id, size, part_size, received=good)
    return UploadStatus(**upload.model_dump(), received=[p for p in parts if p.part_number in good],
                        missing=[n for n in range(1, upload.parts_total + 1) if n not in good])


@app.post("/v1/jobs/<job_id>/complete", status_code=202, operation_id="completeJobUpload",
          responses=answers(202, "the parts are joined; the job starts", json_of(Job), 404, 409))
@tracer.capture_method(capture_response=False)
def complete_upload(job_id: str) -> Job:
    job = owned_job(job_id)
    if job.get("upload") == COMPLETING:
        return job_view(job)  # a repeated call (the first answer was lost): the same answer
    key, upload_id, size, part_size = open_upload(job)
    parts = received_parts(job, key, upload_id)
    good = complete_parts(parts, size, part_size)
    missing = [n for n in range(1, math.ceil(size / part_size) + 1) if n not in good]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        raise ServiceError(409, f"{len(missing)} part(s) missing or of the wrong size: {shown}; "
                                f"GET /v1/jobs/{job_id}/upload gives their URLs")
    settings = adapters.settings
    adapters.jobs.put(job_id, QUEUED, upload=COMPLETING)
    try:
        adapters.s3.complete_multipart_upload(
            Bucket=settings.input_bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p.part_number, "ETag": p.etag}
                                       for p in sorted(parts, key=lambda p: p.part_number) if p.part_number in good]})
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code == "NoSuchUpload" and adapters.jobs.get(job_id)["status"] != QUEUED:
            # joined already (a retried request S3 had finished, or a concurrent call): the
            # upload's processing has started
            metrics.add_metric(name="MultipartUploadsCompleted", unit=MetricUnit.Count, value=1)
            return job_view(owned_job(job_id))
        if code not in ("InvalidPart", "InvalidPartOrder", "EntityTooSmall", "NoSuchUpload"):
            # S3 may succeed on a retry; the status stays what the processing made it
            adapters.jobs.put(job_id, None, upload=MULTIPART)
            raise
        # S3 will never join these parts: free them now rather than at the lifecycle rule
        if code != "NoSuchUpload":
            adapters.s3.abort_multipart_upload(Bucket=settings.input_bucket, Key=key, UploadId=upload_id)
        adapters.jobs.fail_unless_finished(job_id, f"S3 refused to join the parts: {code}", upload=ABORTED)
        raise ServiceError(409, f"S3 refused to join the parts ({code}); the upload is aborted: create a new job") \
            from None
    metrics.add_metric(name="MultipartUploadsCompleted", unit=MetricUnit.Count, value=1)
    return job_view(owned_job(job_id))


def job_view(job: dict) -> Job:
    fields = {k: v for k, v in job.items() if k in Job.model_fields}
    progress = job.get("progress")
    if not isinstance(progress, dict) and job.get("chunks_total") is not None:
        progress = {"chunks_done": job.get("chunks_done") or 0, "chunks_total": job["chunks_total"]}
    try:
        fields["progress"] = Progress(**progress) if isinstance(progress, dict) else None
    except ValueError:
        fields["progress"] = None
    return Job(**fields)


@app.get("/v1/jobs/<job_id>", operation_id="getJob", responses=answers(200, "the job", json_of(Job), 404))
def get_job(job_id: str) -> Job:
    return job_view(owned_job(job_id))


@app.get("/v1/jobs/<job_id>/result", operation_id="getJobResult",
         responses=answers(200, "download links of the result and its report", json_of(ResultLinks), 404, 409, 410))
def get_result(job_id: str) -> ResultLinks:
    job = owned_job(job_id)
    if job["status"] == FAILED:  # final: a client stops polling and acts on the reason
        raise ServiceError(410, f"job {job_id} failed: {job.get('error') or 'no reason recorded'}")
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
    if "report" not in keys or main is None and job.get("operation") != ANALYZE:
        return None
    urls = {} if main is None else {"video_url" if main == "video" else "image_url": link(keys[main])}
    return ResultLinks(**urls, report_url=link(keys["report"]), expires_in=adapters.settings.url_ttl_s)


# -- small images, synchronously -------------------------------------------------------------

def request_image() -> bytes:
    """The image from a raw body or the first file of a multipart/form-data body, size-checked
    before any decoding."""
    event = app.current_event
    limit = adapters.settings.max_sync_bytes
    content_type = event.headers.get("content-type", "")
    if content_type and content_type.split(";")[0].strip().lower() not in IMAGE_BODY_TYPES:
        raise ServiceError(415, f"send the image as {', '.join(IMAGE_BODY_TYPES)}, not {content_type[:100]}")
    try:
        declared = int(event.headers.get("content-length") or 0)
    except ValueError:
        declared = 0
    if declared > limit * 4 // 3 + 4096:
        raise ServiceError(413, f"request body too large (limit {limit} bytes)")
    body = event.body or ""
    data = base64.b64decode(body) if event.is_base64_encoded else body.encode("latin-1", "replace")
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


# The names are faceflow.analysis.ATTRIBUTES; openapi_json() writes them into the document
# (importing that module here would load cv2 on every cold start, job routes included).
ATTRIBUTE_LIST = r"^[A-Za-z]{1,20}(,[A-Za-z]{1,20}){0,9}$"


@app.post("/v1/analyze", operation_id="analyze", responses=answers(
    200, "the faces found, each with its attributes (format=json), or DetectFaces' response (format=rekognition)",
    {content_types.APPLICATION_JSON: {"schema": {"oneOf": [{"$ref": "#/components/schemas/FacesFound"},
                                                           {"$ref": "#/components/schemas/DetectFaces"}]}}},
    400, 413, 415))
@tracer.capture_method(capture_response=False)
def analyze(attributes: Annotated[Optional[str], Query(pattern=ATTRIBUTE_LIST, description=(
                "what to compute per face, comma-separated, or none (detection only); default: every attribute "
                "but the mesh"))] = None,
            format: Annotated[Literal["json", "rekognition"], Query(description=(
                "json: faceflow's record; rekognition: Amazon Rekognition DetectFaces' response"))] = "json",
            ) -> Union[FacesFound, DetectFaces]:
    from faceflow.analysis import MESH_ATTRIBUTES, parse_attributes
    from faceflow.images import BadInput, TooLarge
    try:
        chosen = parse_attributes(attributes)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    if format == "rekognition" and MESH_ATTRIBUTES & set(chosen):
        chosen = parse_attributes((*chosen, "mesh"))  # its Landmarks come from the mesh that runs anyway
    data = request_image()  # size-checked before the engine is even loaded
    try:
        record = engine().analyze_bytes(data, source="request", attributes=chosen or None,
                                        memory_bytes=adapters.settings.memory_bytes)
    except TooLarge as exc:
        raise ServiceError(413, str(exc)) from None
    except BadInput as exc:
        raise BadRequestError(str(exc)) from None
    metrics.add_metric(name="FacesFound", unit=MetricUnit.Count, value=len(record["faces"]))
    if format == "rekognition":
        from faceflow.rekognition import detect_faces_response
        return DetectFaces(**detect_faces_response(record))
    return FacesFound(**record)


# No return annotation: the body is an image, which Powertools would try to validate as JSON.
@app.post("/v1/anonymize", operation_id="anonymize", responses=answers(
    200, "the anonymised image, in the format it came in (X-Faceflow-Faces: faces masked)",
    {t: {"schema": {"type": "string", "format": "binary"}} for t in CONTENT_TYPES.values()}, 400, 413, 415,
    headers={"X-Faceflow-Faces": {"description": "faces masked", "schema": {"type": "integer", "minimum": 0}}}))
@tracer.capture_method(capture_response=False)
def anonymize(method: Annotated[Literal["blur", "pixelate", "solid"], Query()] = "blur",
              shape: Annotated[Literal["ellipse", "box"], Query()] = "ellipse"):
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


# -- the page ---------------------------------------------------------------------------------

# The page's files (index.html, app.js, app.css), served by the API itself: the same origin as
# the routes it calls, and nothing fetched from anywhere else.
PAGE_DIR = Path(media.__file__).resolve().parent / "web" / "static"
PAGE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
              ".css": "text/css; charset=utf-8"}
PAGE_FILE = r"^[a-z]{1,20}\.(html|js|css)$"
# Scripts and styles from the page's own origin only; images, video and the JSON report come
# from presigned storage URLs (another origin) or the browser's own blob: URLs.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data: https: http:; "
                                           "media-src 'self' blob: https: http:; connect-src 'self' blob: https: http:; "
                                           "object-src 'none'; base-uri 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def page_file(name: str) -> Response:
    path = PAGE_DIR / name
    if not re.match(PAGE_FILE, name) or not path.is_file():
        raise NotFoundError(f"no page file {name[:100]}")
    return Response(status_code=200, content_type=PAGE_TYPES[path.suffix], body=path.read_text(),
                    headers=PAGE_HEADERS)


@app.get("/", operation_id="page", include_in_schema=False)
def page():
    return page_file("index.html")


@app.get("/static/<name>", operation_id="pageFile", include_in_schema=False)
def page_static(name: str):
    return page_file(name)


# -- the OpenAPI document --------------------------------------------------------------------

@app.get("/v1/openapi.json", operation_id="openapi", responses=answers(200, "this API's OpenAPI document",
                                               {content_types.APPLICATION_JSON: {"schema": {"type": "object"}}}))
def openapi():
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=openapi_json())


def openapi_json() -> str:
    """Powertools' document, with what it cannot say from the signatures: the image routes'
    request bodies (raw bytes, which its validation does not parse), and without the 422
    answer it documents for validation errors, which this API answers 400."""
    document = json.loads(app.get_openapi_json_schema(title="faceflow", version="1", description=__doc__))
    image = {"schema": {"type": "string", "format": "binary"}}
    form = {"schema": {"type": "object", "required": ["file"],
                       "properties": {"file": {"type": "string", "format": "binary"}}}}
    for path in ("/v1/analyze", "/v1/anonymize"):
        document["paths"][path]["post"]["requestBody"] = {
            "required": True, "description": f"one image, at most {adapters.settings.max_sync_bytes} bytes",
            "content": {**{t: image for t in IMAGE_BODY_TYPES if t != "multipart/form-data"},
                        "multipart/form-data": form}}
    from faceflow.analysis import ATTRIBUTES
    names = "|".join(ATTRIBUTES)
    for parameter in document["paths"]["/v1/analyze"]["post"].get("parameters", []):
        if parameter["name"] == "attributes":
            parameter["schema"] = {"type": "string", "pattern": f"^(none|({names})(,({names})){{0,9}})$"}
            parameter["description"] += f" (from {', '.join(ATTRIBUTES)})"
    for operations in document["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError", "ResponseValidationError"):
        if f'"#/components/schemas/{unused}"' not in json.dumps(document["paths"]):
            schemas.pop(unused, None)
    return json.dumps(document, indent=2)


# -- errors: one shape ------------------------------------------------------------------------

@app.exception_handler(ServiceError)
def service_error(exc: ServiceError) -> Response:
    return error_response(exc.status_code, exc.msg)


@app.exception_handler(RequestValidationError)
def invalid_request(exc: RequestValidationError) -> Response:
    # Malformed JSON and wrong fields are the client's fault: 400 with what was wrong (never the
    # input itself).
    problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: "
                + (PATTERN_MISMATCH if e.get("type") == "string_pattern_mismatch" else str(e.get("msg")))
                + (f" ({e['ctx']['error']})" if isinstance(e.get("ctx"), dict) and "error" in e["ctx"] else "")
                for e in exc.errors()]
    return error_response(400, "invalid request: " + "; ".join(problems))


@app.exception_handler(RequestUnsupportedContentType)
def unsupported_content_type(exc: RequestUnsupportedContentType) -> Response:
    return error_response(415, "send the request body as application/json")


@app.exception_handler(UnicodeDecodeError)
def undecodable_body(exc: UnicodeDecodeError) -> Response:
    # Powertools decodes a JSON or form body as UTF-8 before validating it; a body that is not
    # UTF-8 is the client's fault. Any other decode error is a defect and stays one.
    try:
        app.current_event.decoded_body
    except UnicodeDecodeError:
        return error_response(400, "the request body is not UTF-8")
    raise exc


@app.exception_handler(ValueError)
def unreadable_form(exc: ValueError) -> Response:
    # Powertools' multipart parser raises a bare ValueError for a body it cannot split (no
    # boundary): the client's fault. A ValueError from anywhere else is a defect and stays one.
    if any(frame.f_code.co_name == "_parse_multipart_data" for frame, _ in traceback.walk_tb(exc.__traceback__)):
        return error_response(400, f"unreadable multipart/form-data body: {exc}")
    raise exc


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)


if __name__ == "__main__" and "--openapi" in sys.argv:
    print(openapi_json())
