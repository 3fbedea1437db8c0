"""faceflow's HTTP API (payload format 2.0 events, Powertools' APIGatewayHttpResolver).

    POST /v1/jobs                 create a job (a photo or a video; operation anonymize, the
                                  default, or analyze: the JSON report only; optional sensitivity
                                  and priority, used by the routing; `report`: an edited report
                                  to render instead of detecting): a job id and where to upload,
                                  one PUT or, for `size` at or above the multipart threshold of
                                  the deployed API, an S3 multipart upload (presigned part URLs)
    GET  /v1/jobs/{id}            status (queued, running, done, failed), stage, route, progress
                                  (videos: chunks done of total), outputs, error
    GET  /v1/jobs/{id}/upload     a multipart upload: which parts arrived, and fresh URLs for the
                                  missing ones (resume after a broken connection)
    POST /v1/jobs/{id}/complete   join the parts: the upload becomes the job's input and it starts
    GET  /v1/jobs/{id}/result     download URLs of the result and its report
    POST /v1/analyze              small image in (raw body or multipart) → faces and their
                                  attributes as JSON (?attributes=, ?format=json|rekognition)
    POST /v1/anonymize            small image in → anonymised image out; with an edited report
                                  (multipart part `report`), exactly its faces, not detected
    POST /v1/swap                 small target photo and source face photo in (multipart) → the
                                  target with the source's face, marked as synthetic
    GET  /v1/openapi.json         this API's OpenAPI document

A face swap job ("operation": "swap", a photo or a video) has a second upload, the photo of the
face to put in (`source_filename`): PUT both, then POST /v1/jobs/{id}/complete to start it.

Every error has one body shape, `{"message": ..., "status": ...}` (the Error schema).

This module holds what the deployed API (functions/api/app.py: S3, Redis, the caller's
identity) and `faceflow serve` (faceflow.web.serve: local files, one process) share: the
models, the job routes' declarations (each host implements them), the photo routes
(add_photo_routes), the error handlers (add_error_handlers) and the document (openapi_json).
No `from __future__ import annotations` here: Powertools reads the route signatures' types at
run time to validate requests. Imports stay light: the engine is loaded on first use.
"""
import base64
import json
import os
import re
import traceback
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Annotated, Any, Callable, Literal, Optional, Union

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.exceptions import BadRequestError, ServiceError
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from aws_lambda_powertools.event_handler.openapi.params import Query
from pydantic import BaseModel, Field

from faceflow import media

TITLE, VERSION = "faceflow", "1"
MIB = 1024 * 1024

# Photo uploads: every still-image extension read and its Content-Type.
PHOTO_CONTENT_TYPES = {ext: media.extension_media_type(ext) for ext in media.IMAGE_EXTENSIONS}
# Whole videos.
VIDEO_CONTENT_TYPES = media.VIDEO_MEDIA_TYPES
UPLOAD_CONTENT_TYPES = {**PHOTO_CONTENT_TYPES, **VIDEO_CONTENT_TYPES}
# Each output format's media type (an anonymised photo comes back in the format it came in).
CONTENT_TYPES = {fmt: media_type for fmt, (_, media_type) in media.IMAGE_FORMATS.items()}
# Bodies /v1/analyze and /v1/anonymize take: an image, raw or as a multipart/form-data file.
IMAGE_BODY_TYPES = (*CONTENT_TYPES.values(), "application/octet-stream", "multipart/form-data")
# Largest body of the synchronous photo routes (the deployed API: FACEFLOW_MAX_SYNC_BYTES).
MAX_SYNC_BYTES = 5 * MIB

# Largest edited report (faceflow.review) a job request carries, as JSON: a video's faces per
# frame stay well under it for an hour of video, and API Gateway takes 10 MB.
MAX_REPORT_BYTES = 4 * MIB

# Uploads of at least this many bytes go in parts on the deployed API (S3 advises multipart
# above about 100 MB): a broken connection costs one part, not the whole file. In the document,
# so it is read here.
MULTIPART_THRESHOLD_BYTES = int(os.environ.get("FACEFLOW_MULTIPART_THRESHOLD_BYTES", 100 * MIB))
# Presigned part URLs in one answer: keeps it far below Lambda's 6 MB response limit; the
# upload route hands out the next ones.
MAX_PART_URLS = 1000


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


def _either_case(suffix: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in suffix)


# A plain file name (it becomes part of an S3 key or a local file name) with an extension of a
# photo or video read: in the document, so clients and generated requests know it.
UPLOAD_NAME = (r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,200}\.("
               + "|".join(_either_case(s[1:]) for s in sorted(UPLOAD_CONTENT_TYPES)) + ")$")
# What a job's operation reads: a photo job one of the still-image types, a video job one of the
# video types. Anything else (text/html, a value with CRLF) is refused, never signed into a URL.
PHOTO_MEDIA_TYPES = tuple(sorted(set(PHOTO_CONTENT_TYPES.values())))
VIDEO_MEDIA_TYPES = tuple(sorted(set(VIDEO_CONTENT_TYPES.values())))
UploadMediaType = Literal[PHOTO_MEDIA_TYPES + VIDEO_MEDIA_TYPES]  # type: ignore[valid-type]
PhotoMediaType = Literal[PHOTO_MEDIA_TYPES]  # type: ignore[valid-type]
# A photo's name: a swap's source face.
PHOTO_NAME = (r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,200}\.("
              + "|".join(_either_case(s[1:]) for s in sorted(PHOTO_CONTENT_TYPES)) + ")$")
SWAP_ENGINES = ("landmark", "inswapper")   # faceflow.swap.ENGINES (importing it would load cv2)


def upload_suffix(filename: str) -> str:
    """The lower-case extension of a JobRequest's filename (one of UPLOAD_CONTENT_TYPES: its
    pattern says so)."""
    return "." + filename.rsplit(".", 1)[-1].lower()


def readable_media_types(filename: str) -> tuple[str, ...]:
    return VIDEO_MEDIA_TYPES if upload_suffix(filename) in VIDEO_CONTENT_TYPES else PHOTO_MEDIA_TYPES


# -- request and response models -------------------------------------------------------------

class Error(BaseModel):
    """The body of every error answer."""
    message: str = Field(description="what was wrong, for a person to read")
    status: Optional[int] = Field(default=None, description="the HTTP status; every answer of the function has it "
                                  "(API Gateway's own 401, 403 and 429 answers carry only `message`)")


class SwapJobOptions(BaseModel):
    """Which faces a swap takes and gives (faceflow.swap.SwapOptions)."""
    model_config = {"extra": "forbid"}
    engine: Optional[Literal[SWAP_ENGINES]] = Field(  # type: ignore[valid-type]
        default=None, description="landmark (default, shipped models) or inswapper (the operator's own weights)")
    face_index: Optional[int] = Field(default=None, ge=0, description="the source photo's face, counted left to "
                                                                      "right from 0 (default: its largest)")
    largest: Optional[bool] = Field(default=None, description="only the target's largest face")
    tracks: Optional[list[Annotated[int, Field(ge=0)]]] = Field(
        default=None, min_length=1, max_length=1000,
        description="a video's faces by track id (from an analysis of the whole video); default: every face")


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
    operation: Optional[Literal[media.OPERATIONS]] = Field(
        default=None, description="anonymize (default): the masked photo or video and its report; analyze: only the "
                                  "JSON report, each face with its attributes (a video: per frame, and per track a "
                                  "summary of a sample of its faces); swap: the source face (source_filename) put "
                                  "onto the photo's or video's faces, marked as synthetic")
    source_filename: Optional[str] = Field(default=None, pattern=PHOTO_NAME, description=(
        "a swap's second upload, required for it and only for it: the photo of the face to put in, ending in "
        + ", ".join(sorted(PHOTO_CONTENT_TYPES))))
    source_content_type: Optional[PhotoMediaType] = Field(  # type: ignore[valid-type]
        default=None, description="Content-Type to upload the source with (default: its extension's)")
    swap_options: Optional[SwapJobOptions] = Field(default=None, description="a swap's options")
    report: Optional[dict[str, Any]] = Field(default=None, description=(
        "an edited report (the README's Review: the report of an earlier job with faces removed, exempted or "
        "added, tracks dropped or exempted, boxes drawn by hand): the job renders exactly its faces instead of "
        f"detecting them; operation anonymize only; at most {MAX_REPORT_BYTES} bytes as JSON"))


def swap_request(request: JobRequest, is_video: bool) -> Optional[dict]:
    """A swap job's options as given (None for another operation); 400 for a swap without a
    source, a source or options without a swap, or options that do not fit the target."""
    if request.operation != media.SWAP:
        if request.source_filename is not None or request.swap_options is not None:
            raise BadRequestError("source_filename and swap_options are a swap's (\"operation\": \"swap\") only")
        return None
    if request.source_filename is None:
        raise BadRequestError("a swap needs source_filename: the photo of the face to put in, a second upload")
    options = request.swap_options.model_dump(exclude_none=True) if request.swap_options else {}
    if options.get("tracks") and not is_video:
        raise BadRequestError("swap_options.tracks picks faces of a video (track ids from its analysis report)")
    if options.get("tracks") and options.get("largest"):
        raise BadRequestError("swap_options: choose either the largest face or tracks, not both")
    return options


def source_media_type(request: JobRequest) -> str:
    """A swap's source photo's Content-Type: as given, else its extension's."""
    return request.source_content_type or UPLOAD_CONTENT_TYPES[upload_suffix(request.source_filename)]


class Upload(BaseModel):
    """One PUT of the whole file."""
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
    source_upload: Optional[Upload] = Field(default=None, description="a swap's source face photo: PUT it here")
    complete_url: Optional[str] = Field(default=None, description="a swap: POST here once both uploads are done "
                                                                  "(and a multipart upload's parts are)")


class Progress(BaseModel):
    chunks_done: int
    chunks_total: int
    frames_done: Optional[int] = Field(default=None, description="frames processed (jobs run by `faceflow serve`, "
                                                                 "where a video is one chunk)")
    frames_total: Optional[int] = Field(default=None, description="frames in the video, when known")


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


def job_view(job: dict) -> Job:
    """The Job answer of a job record (extra fields left out; a malformed progress dropped)."""
    fields = {k: v for k, v in job.items() if k in Job.model_fields}
    progress = job.get("progress")
    if not isinstance(progress, dict) and job.get("chunks_total") is not None:
        progress = {"chunks_done": job.get("chunks_done") or 0, "chunks_total": job["chunks_total"]}
    try:
        fields["progress"] = Progress(**progress) if isinstance(progress, dict) else None
    except ValueError:
        fields["progress"] = None
    return Job(**fields)


# -- documented answers ----------------------------------------------------------------------

ERROR_MEANINGS = {
    400: "bad request: malformed JSON or fields, or an image that cannot be read",
    404: "no such job for this caller",
    409: "the job is not in a state that allows this (not done yet, upload incomplete)",
    410: "the job failed: its result will never exist (the message says why and what to do)",
    413: "too large",
    415: "unsupported Content-Type",
    503: "busy: too many jobs waiting (a local server's bounded queue); try again after Retry-After",
}


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


# The routes that take the id POST /v1/jobs returns (OpenAPI links: clients and generated
# tests follow them).
JOB_LINKS = {name: {"operationId": name, "parameters": {"job_id": "$response.body#/job_id"}}
             for name in ("getJob", "getJobUpload", "completeJobUpload", "getJobResult")}

# The job routes, declared once: each host implements them (`@app.post(**CREATE_JOB)`), so both
# documents say the same.
CREATE_JOB = dict(rule="/v1/jobs", status_code=201, operation_id="createJob", responses=answers(
    201, "the job, and where to upload its input", json_of(JobCreated), 400, 413, 415, links=JOB_LINKS))
GET_JOB = dict(rule="/v1/jobs/<job_id>", operation_id="getJob",
               responses=answers(200, "the job", json_of(Job), 404))
GET_JOB_UPLOAD = dict(rule="/v1/jobs/<job_id>/upload", operation_id="getJobUpload", responses=answers(
    200, "the parts received and URLs for the missing ones", json_of(UploadStatus), 404, 409))
COMPLETE_JOB_UPLOAD = dict(rule="/v1/jobs/<job_id>/complete", status_code=202, operation_id="completeJobUpload",
                           responses=answers(202, "the parts are joined; the job starts", json_of(Job), 404, 409, 503))
GET_JOB_RESULT = dict(rule="/v1/jobs/<job_id>/result", operation_id="getJobResult", responses=answers(
    200, "download links of the result and its report", json_of(ResultLinks), 404, 409, 410))


PATTERN_MISMATCH = "not of the form the OpenAPI document gives (see the field's description)"


def error_response(status: int, message: str) -> Response:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON,
                    body=Error(message=message, status=status).model_dump_json())


# -- errors: one shape ------------------------------------------------------------------------

def add_error_handlers(app: ApiGatewayResolver) -> None:
    """Every refusal as an Error: the client's faults (malformed JSON, wrong fields, a body that
    is not UTF-8 or not multipart) are 4xx; anything else stays a defect."""

    @app.exception_handler(ServiceError)
    def service_error(exc: ServiceError) -> Response:
        return error_response(exc.status_code, exc.msg)

    @app.exception_handler(RequestValidationError)
    def invalid_request(exc: RequestValidationError) -> Response:
        # what was wrong, never the input itself
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
        # Powertools decodes a JSON or form body as UTF-8 before validating it; any other decode
        # error is a defect and stays one.
        try:
            app.current_event.decoded_body
        except UnicodeDecodeError:
            return error_response(400, "the request body is not UTF-8")
        raise exc

    @app.exception_handler(ValueError)
    def unreadable_form(exc: ValueError) -> Response:
        # Powertools' multipart parser raises a bare ValueError for a body it cannot split (no
        # boundary). A ValueError from anywhere else is a defect and stays one.
        if any(frame.f_code.co_name == "_parse_multipart_data" for frame, _ in traceback.walk_tb(exc.__traceback__)):
            return error_response(400, f"unreadable multipart/form-data body: {exc}")
        raise exc


# -- small images, synchronously -------------------------------------------------------------

@dataclass
class PhotoRoutes:
    """What the photo routes need from their host: the engine (loaded on first use), the body
    limit, the memory images are budgeted against (None: the machine's), what to do with the
    number of faces found (a metric), and a decorator for each route (tracing)."""
    engine: Callable[[], Any]
    max_sync_bytes: int = MAX_SYNC_BYTES
    memory_bytes: Optional[int] = None
    faces_found: Callable[[int], None] = lambda count: None
    decorate: Callable[[Callable], Callable] = lambda route: route


def request_body(event, limit: int, limit_text: str) -> bytes:
    """The request's bytes; a declared length past what `limit` bytes of content can take (with
    base64's growth and a multipart envelope) is refused before the body is decoded."""
    try:
        declared = int(event.headers.get("content-length") or 0)
    except ValueError:
        declared = 0
    if declared > limit * 4 // 3 + 4096:
        raise ServiceError(413, f"request body too large ({limit_text})")
    body = event.body or ""
    return base64.b64decode(body) if event.is_base64_encoded else body.encode("latin-1", "replace")


def read_image(app: ApiGatewayResolver, limit: int, fields: Optional[dict] = None,
               field: str = "file") -> bytes:
    """The image from a raw body or the first file of a multipart/form-data body (a part with a
    filename, or named `field`), size-checked before any decoding. `fields`: names of other
    parts to read too (as text, into it)."""
    event = app.current_event
    content_type = event.headers.get("content-type", "")
    if content_type and content_type.split(";")[0].strip().lower() not in IMAGE_BODY_TYPES:
        raise ServiceError(415, f"send the image as {', '.join(IMAGE_BODY_TYPES)}, not {content_type[:100]}")
    data = request_body(event, limit, f"limit {limit} bytes")
    if content_type.startswith("multipart/form-data"):
        data = form_file(content_type, data, field, fields=fields)
    if len(data) > limit:
        raise ServiceError(413, f"image too large: {len(data)} bytes (limit {limit})")
    if not data:
        raise BadRequestError("empty body: send the image as the body or as a multipart file")
    return data


SWAP_PARTS = ("target", "source")   # POST /v1/swap's form fields


def read_swap_pair(app: ApiGatewayResolver, limit: int) -> tuple[bytes, bytes]:
    """(target, source) from a multipart/form-data body with the two files, the whole body
    size-checked before any decoding."""
    event = app.current_event
    content_type = event.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise ServiceError(415, "send the target and source photos as multipart/form-data files named "
                                f"{' and '.join(SWAP_PARTS)}, not {content_type[:100] or 'no Content-Type'}")
    data = request_body(event, limit, f"limit {limit} bytes for both photos")
    if len(data) > limit:
        raise ServiceError(413, f"request body too large: {len(data)} bytes (limit {limit} for both photos)")
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + data)
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()} \
        if message.is_multipart() else {}
    found = []
    for name in SWAP_PARTS:
        part = parts.get(name)
        payload = part.get_payload(decode=True) if part is not None else None
        if not payload:
            what = "the photo whose faces are swapped" if name == "target" else "the face to put in"
            raise BadRequestError(f"the multipart body needs a non-empty file named {name} ({what})")
        found.append(payload)
    return found[0], found[1]


def form_file(content_type: str, data: bytes, field: str = "file", fields: Optional[dict] = None) -> bytes:
    """The first file of a multipart/form-data body (a part with a filename, or named `field`);
    the parts named in `fields` are not it: their text goes into `fields`."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + data)
    parts = []
    for p in message.iter_parts():
        name = p.get_param("name", header="content-disposition")
        if fields is not None and name in fields:
            fields[name] = (p.get_payload(decode=True) or b"").decode("utf-8", "replace")
        elif p.get_filename() or name == field:
            parts.append(p)
    if not parts:
        raise BadRequestError("multipart body has no file part")
    return parts[0].get_payload(decode=True) or b""


# The names are faceflow.analysis.ATTRIBUTES; openapi_json() writes them into the document
# (importing that module here would load cv2 on every cold start, job routes included).
ATTRIBUTE_LIST = r"^[A-Za-z]{1,20}(,[A-Za-z]{1,20}){0,9}$"


def add_photo_routes(app: ApiGatewayResolver, photos: PhotoRoutes) -> None:
    """POST /v1/analyze, POST /v1/anonymize, POST /v1/swap and GET /v1/openapi.json on `app`."""

    @app.post("/v1/analyze", operation_id="analyze", responses=answers(
        200, "the faces found, each with its attributes (format=json), or DetectFaces' response (format=rekognition)",
        {content_types.APPLICATION_JSON: {"schema": {"oneOf": [{"$ref": "#/components/schemas/FacesFound"},
                                                               {"$ref": "#/components/schemas/DetectFaces"}]}}},
        400, 413, 415))
    @photos.decorate
    def analyze(attributes: Annotated[Optional[str], Query(pattern=ATTRIBUTE_LIST, description=(
                    "what to compute per face, comma-separated, or none (detection only); default: every attribute "
                    "but the mesh"))] = None,
                format: Annotated[Literal["json", "rekognition"], Query(description=(
                    "json: faceflow's record; rekognition: Amazon Rekognition DetectFaces' response"))] = "json",
                ) -> Union[FacesFound, DetectFaces]:
        chosen = attribute_choice(attributes, format)
        record = analyze_image(read_image(app, photos.max_sync_bytes), photos, chosen, format)
        if format == "rekognition":
            return DetectFaces(**record)
        return FacesFound(**record)

    # No return annotation: the body is an image, which Powertools would try to validate as JSON.
    @app.post("/v1/anonymize", operation_id="anonymize", responses=answers(
        200, "the anonymised image, in the format it came in (X-Faceflow-Faces: faces masked)",
        {t: {"schema": {"type": "string", "format": "binary"}} for t in CONTENT_TYPES.values()}, 400, 413, 415,
        headers={"X-Faceflow-Faces": {"description": "faces masked", "schema": {"type": "integer", "minimum": 0}}}))
    @photos.decorate
    def anonymize(method: Annotated[Literal["blur", "pixelate", "solid"], Query()] = "blur",
                  shape: Annotated[Literal["ellipse", "box"], Query()] = "ellipse",
                  cells: Annotated[Optional[int], Query(description=(
                      "strength: detail left across a face for blur and pixelate, the same for every face size; "
                      "2 (the default) is the strongest before solid, up to 32"))] = None):
        form = {"report": None}
        data = read_image(app, photos.max_sync_bytes, form)
        result = anonymize_image(data, photos, method, shape, form["report"], cells)
        faces = result.report.get("masked", len(result.report["faces"]))
        return Response(status_code=200, content_type=CONTENT_TYPES[result.format], body=result.data,
                        headers={"X-Faceflow-Faces": str(faces)})

    # No return annotation: the body is an image (see anonymize).
    @app.post("/v1/swap", operation_id="swap", responses=answers(
        200, "the target photo, in the format it came in, with the source's face on its faces, marked as synthetic "
             "(IPTC DigitalSourceType in its XMP; X-Faceflow-Faces: faces swapped)",
        {t: {"schema": {"type": "string", "format": "binary"}} for t in CONTENT_TYPES.values()}, 400, 413, 415,
        headers={"X-Faceflow-Faces": {"description": "faces swapped", "schema": {"type": "integer", "minimum": 0}}}))
    @photos.decorate
    def swap(engine: Annotated[Literal[SWAP_ENGINES], Query(  # type: ignore[valid-type]
                 description="landmark (shipped models) or inswapper (the operator's own weights)")] = "landmark",
             face_index: Annotated[Optional[int], Query(ge=0, le=1000, description=(
                 "the source photo's face, counted left to right from 0 (default: its largest)"))] = None,
             largest: Annotated[bool, Query(description="only the target's largest face")] = False):
        target, source = read_swap_pair(app, photos.max_sync_bytes)
        result = swap_image(target, source, photos, engine, face_index, largest)
        return Response(status_code=200, content_type=CONTENT_TYPES[result.format], body=result.data,
                        headers={"X-Faceflow-Faces": str(result.report["swapped"])})

    @app.get("/v1/openapi.json", operation_id="openapi", responses=answers(
        200, "this API's OpenAPI document", {content_types.APPLICATION_JSON: {"schema": {"type": "object"}}}))
    def openapi():
        return Response(status_code=200, content_type=content_types.APPLICATION_JSON,
                        body=openapi_json(app, photos.max_sync_bytes))


def attribute_choice(attributes: Optional[str], format: str = "json") -> tuple:
    """The attributes to compute (an unknown name is a 400); Rekognition's format adds the mesh
    when it runs anyway, for its Landmarks."""
    from faceflow.analysis import MESH_ATTRIBUTES, parse_attributes
    try:
        chosen = parse_attributes(attributes)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    if format == "rekognition" and MESH_ATTRIBUTES & set(chosen):
        chosen = parse_attributes((*chosen, "mesh"))
    return chosen


def analyze_image(data: bytes, photos: PhotoRoutes, chosen: tuple = (), format: str = "json") -> dict:
    """The analysis record of an image (DetectFaces' response for format=rekognition) with the
    `chosen` attributes (attribute_choice); a bad image is a 400, one too large for the memory
    budget a 413."""
    from faceflow.images import BadInput, TooLarge
    try:
        record = photos.engine().analyze_bytes(data, source="request", attributes=chosen or None,
                                               memory_bytes=photos.memory_bytes)
    except TooLarge as exc:
        raise ServiceError(413, str(exc)) from None
    except BadInput as exc:
        raise BadRequestError(str(exc)) from None
    photos.faces_found(len(record["faces"]))
    if format == "rekognition":
        from faceflow.rekognition import detect_faces_response
        return detect_faces_response(record)
    return record


def anonymize_image(data: bytes, photos: PhotoRoutes, method: str = "blur", shape: str = "ellipse",
                    report: Optional[str] = None, cells: Optional[int] = None):
    """The engine's Result for an image (the masked image, its format and report); with an
    edited `report` (JSON text), exactly its faces, no detection (faceflow.review). `cells`:
    the mask's strength (faceflow.anonymize.MaskOptions; its default when None)."""
    from faceflow.anonymize import MaskOptions
    from faceflow.images import BadInput, TooLarge
    try:
        options = MaskOptions(method=method, shape=shape, **({} if cells is None else {"cells": cells}))
    except ValueError as exc:  # a strength out of MaskOptions' range
        raise BadRequestError(str(exc)) from None
    try:
        if report is not None:
            from faceflow import review
            return review.render_photo(data, report, options, source="request", memory_bytes=photos.memory_bytes)
        result = photos.engine().anonymize_bytes(data, options, source="request", memory_bytes=photos.memory_bytes)
    except TooLarge as exc:
        raise ServiceError(413, str(exc)) from None
    except BadInput as exc:
        raise BadRequestError(str(exc)) from None
    photos.faces_found(len(result.report["faces"]))
    return result


def swap_image(target: bytes, source: bytes, photos: PhotoRoutes, engine: str = "landmark",
               face_index: Optional[int] = None, largest: bool = False):
    """The engine's Result for a photo swap (the marked image, its format and report): a bad
    photo or a source without a face is a 400, as is an engine whose weights this deployment
    lacks; one too large for the memory budget a 413."""
    from faceflow.bundle import ModelError
    from faceflow.images import BadInput, TooLarge
    from faceflow.swap import SwapOptions
    try:
        result = photos.engine().swap_bytes(target, source, SwapOptions(engine=engine, face_index=face_index,
                                                                        largest=largest),
                                            target_name="request", memory_bytes=photos.memory_bytes)
    except TooLarge as exc:
        raise ServiceError(413, str(exc)) from None
    except (BadInput, ModelError) as exc:
        raise BadRequestError(str(exc)) from None
    photos.faces_found(len(result.report["faces"]))
    return result


# -- the OpenAPI document --------------------------------------------------------------------

def openapi_json(app: ApiGatewayResolver, max_sync_bytes: int = MAX_SYNC_BYTES) -> str:
    """Powertools' document, with what it cannot say from the signatures: the image routes'
    request bodies (raw bytes, which its validation does not parse), and without the 422
    answer it documents for validation errors, which this API answers 400."""
    document = json.loads(app.get_openapi_json_schema(title=TITLE, version=VERSION, description=__doc__))
    image = {"schema": {"type": "string", "format": "binary"}}
    form = {"schema": {"type": "object", "required": ["file"],
                       "properties": {"file": {"type": "string", "format": "binary"}}}}
    for path in ("/v1/analyze", "/v1/anonymize"):
        document["paths"][path]["post"]["requestBody"] = {
            "required": True, "description": f"one image, at most {max_sync_bytes} bytes",
            "content": {**{t: image for t in IMAGE_BODY_TYPES if t != "multipart/form-data"},
                        "multipart/form-data": form}}
    pair = {"schema": {"type": "object", "required": list(SWAP_PARTS),
                       "properties": {name: {"type": "string", "format": "binary"} for name in SWAP_PARTS}}}
    document["paths"]["/v1/swap"]["post"]["requestBody"] = {
        "required": True, "description": f"the target photo and the source face photo, at most {max_sync_bytes} "
                                         "bytes together", "content": {"multipart/form-data": pair}}
    reviewed = {"schema": {**form["schema"], "properties": {**form["schema"]["properties"], "report": {
        "type": "object", "description": (
            "an edited report (the README's Review): its `width`, `height` and `faces` (a face may carry "
            "\"exempt\": true; a face drawn by hand {\"box\": [x, y, w, h], \"source\": \"manual\"}): exactly "
            "those faces are masked, none detected; a report that does not fit the image is a 400 naming the field")}}},
        "encoding": {"report": {"contentType": "application/json"}}}
    document["paths"]["/v1/anonymize"]["post"]["requestBody"]["content"]["multipart/form-data"] = reviewed
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
