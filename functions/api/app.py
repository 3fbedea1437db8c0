"""The deployed HTTP API (API Gateway HTTP API, payload 2.0): the routes and models of
faceflow.web.api (its docstring lists them), with the AWS side here: jobs in Redis, uploads and
results in S3 (presigned URLs), the caller's identity.

POST /v1/jobs answers one presigned PUT or, for `size` at or above the multipart threshold, an
S3 multipart upload (presigned part URLs). FACEFLOW_MULTIPART_THRESHOLD_BYTES (100 MiB) and
FACEFLOW_MULTIPART_PART_BYTES (64 MiB, at least S3's 5 MiB) set when an upload goes in parts and
how large they are.
Jobs belong to the caller (JWT subject or IAM principal): another caller gets 404, and so
does an authenticated caller for a job without an owner (one dropped into the bucket).
No `from __future__ import annotations` here: Powertools reads the route signatures' types
at run time to validate requests.
"""
import json
import math
import os
import re
import sys
from typing import Optional, Union

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver
from aws_lambda_powertools.event_handler.exceptions import BadRequestError, NotFoundError, ServiceError
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from faceflow import media
from faceflow.web import api
from faceflow.web.api import (
    MAX_PART_URLS,
    MULTIPART_THRESHOLD_BYTES,
    UPLOAD_CONTENT_TYPES,
    VIDEO_CONTENT_TYPES,
    Job,
    JobCreated,
    JobRequest,
    MultipartUpload,
    PartUpload,
    ReceivedPart,
    ResultLinks,
    Upload,
    UploadStatus,
    job_view,
)
from faceflow.web.page import add_page_routes
from functions.common.aws import Adapters, make_tracer, result_keys
from functions.common.jobs import DONE, FAILED, QUEUED, new_job_id
from functions.common.layout import swap_key
from functions.common.review import review_fields
from functions.common.settings import ANALYZE, ANALYZE_PREFIX, ANONYMIZE, SWAP, SWAP_MANIFEST_NAME, UPLOAD_PREFIX
from functions.video.config import VideoSettings

logger = Logger(service="faceflow-api")
tracer = make_tracer("faceflow-api")  # capture_response=False below: responses hold presigned
# URLs, face boxes or image bytes, none of which belongs in trace metadata
metrics = Metrics(namespace="faceflow", service="faceflow-api")
app = APIGatewayHttpResolver(enable_validation=True, json_body_deserializer=api.parse_json_body)

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
MIB = 1024 * 1024
# S3's multipart limits: every part but the last at least 5 MiB, at most 10,000 parts.
S3_MIN_PART_BYTES = 5 * MIB
S3_MAX_PARTS = 10_000
MULTIPART_PART_BYTES = int(os.environ.get("FACEFLOW_MULTIPART_PART_BYTES", 64 * MIB))
if MULTIPART_PART_BYTES < S3_MIN_PART_BYTES:
    raise RuntimeError(f"FACEFLOW_MULTIPART_PART_BYTES must be at least {S3_MIN_PART_BYTES} (S3's minimum part)")
MAX_MULTIPART_BYTES = MULTIPART_PART_BYTES * S3_MAX_PARTS
# Job record `upload` field: an open multipart upload, then one being (or already) joined.
MULTIPART, COMPLETING, ABORTED = "multipart", "completing", "aborted"


def faces_found(count: int) -> None:
    metrics.add_metric(name="FacesFound", unit=MetricUnit.Count, value=count)


api.add_error_handlers(app)
api.add_photo_routes(app, api.PhotoRoutes(
    engine=engine, max_sync_bytes=adapters.settings.max_sync_bytes, memory_bytes=adapters.settings.memory_bytes,
    faces_found=faces_found, decorate=tracer.capture_method(capture_response=False)))


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


@app.post(**api.CREATE_JOB)
@tracer.capture_method(capture_response=False)
def create_job(request: JobRequest) -> JobCreated:
    suffix = api.upload_suffix(request.filename)
    is_video = suffix in VIDEO_CONTENT_TYPES
    readable = api.readable_media_types(request.filename)
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
    operation = request.operation or ANONYMIZE
    report = None if request.report is None else json.dumps(request.report, separators=(",", ":"))
    if report is not None and operation != ANONYMIZE:
        raise BadRequestError("report: an edited report is rendered by an anonymize job, not an analysis or a swap")
    if report is not None and len(report) > api.MAX_REPORT_BYTES:
        raise ServiceError(413, f"report: {len(report)} bytes of JSON is over the limit of {api.MAX_REPORT_BYTES}")
    job_id = new_job_id()
    swap = swap_fields(request, job_id, is_video)
    key = swap_key(job_id, request.filename) if swap else \
        f"{ANALYZE_PREFIX if operation == ANALYZE else UPLOAD_PREFIX}{job_id}/{request.filename}"
    content_type = request.content_type or UPLOAD_CONTENT_TYPES[suffix]
    record = dict(owner=caller(), input=f"s3://{settings.input_bucket}/{key}", media="video" if is_video else "image",
                  sensitivity=request.sensitivity, priority=request.priority, operation=operation,
                  **review_fields(report), **(swap["record"] if swap else {}))
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
    if swap:
        return JobCreated(job_id=job_id, status=QUEUED, upload=upload, source_upload=swap["upload"],
                          complete_url=f"/v1/jobs/{job_id}/complete")
    return JobCreated(job_id=job_id, status=QUEUED, upload=upload)


def swap_fields(request: JobRequest, job_id: str, is_video: bool) -> Optional[dict]:
    """A swap job's source upload and record fields (None for another operation); 400 for a
    swap without a source or a source without a swap, or options that do not fit the target."""
    options = api.swap_request(request, is_video)
    if options is None:
        return None
    settings = adapters.settings
    key = swap_key(job_id, f"source/{request.source_filename}")
    content_type = api.source_media_type(request)
    url = adapters.s3.generate_presigned_url("put_object", ExpiresIn=settings.url_ttl_s, Params={
        "Bucket": settings.input_bucket, "Key": key, "ContentType": content_type})
    return {"upload": Upload(url=url, headers={"Content-Type": content_type}, expires_in=settings.url_ttl_s),
            "record": {"source": f"s3://{settings.input_bucket}/{key}", "options": options or None}}


def require_uploaded(job: dict, what: str) -> str:
    """The key of a swap job's upload `what` ("input": the target, "source": the face), or 409
    when it has not arrived."""
    key = job[what].split("/", 3)[3]
    try:
        adapters.s3.head_object(Bucket=adapters.settings.input_bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
        name = "the target" if what == "input" else "the source face photo"
        raise ServiceError(409, f"{name} of job {job['id']} has not been uploaded: PUT it, then complete "
                                "again") from None
    return key


def start_swap(job: dict) -> Job:
    """A swap job's completion: both uploads must be there (409 names the missing one); then
    its manifest, swap/{job_id}/manifest.json, starts it (functions.common.swapjobs)."""
    settings = adapters.settings
    keys = {what: require_uploaded(job, what) for what in ("input", "source")}
    manifest = {"target": keys["input"], "source": keys["source"], "options": job.get("options") or {},
                **{k: job[k] for k in ("sensitivity", "priority") if job.get(k)}}
    adapters.jobs.put(job["id"], QUEUED, upload=COMPLETING)
    adapters.s3.put_object(Bucket=settings.input_bucket, Key=swap_key(job["id"], SWAP_MANIFEST_NAME),
                           Body=json.dumps(manifest).encode(), ContentType="application/json")
    metrics.add_metric(name="SwapJobsStarted", unit=MetricUnit.Count, value=1)
    return job_view(owned_job(job["id"]))


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


@app.get(**api.GET_JOB_UPLOAD)
def get_upload(job_id: str) -> UploadStatus:
    job = owned_job(job_id)
    key, upload_id, size, part_size = open_upload(job)
    parts = received_parts(job, key, upload_id)
    good = complete_parts(parts, size, part_size)
    upload = multipart_upload(job_id, key, upload_id, size, part_size, received=good)
    return UploadStatus(**upload.model_dump(), received=[p for p in parts if p.part_number in good],
                        missing=[n for n in range(1, upload.parts_total + 1) if n not in good])


@app.post(**api.COMPLETE_JOB_UPLOAD)
@tracer.capture_method(capture_response=False)
def complete_upload(job_id: str) -> Job:
    job = owned_job(job_id)
    if job.get("upload") == COMPLETING:
        return job_view(job)  # a repeated call (the first answer was lost): the same answer
    if job.get("operation") == SWAP and job.get("upload") is None:
        return start_swap(job)  # two single PUTs
    key, upload_id, size, part_size = open_upload(job)
    if job.get("operation") == SWAP:
        require_uploaded(job, "source")  # before the parts are joined: the swap starts right after
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
    if job.get("operation") == SWAP:
        return start_swap(owned_job(job_id))
    return job_view(owned_job(job_id))


@app.get(**api.GET_JOB)
def get_job(job_id: str) -> Job:
    return job_view(owned_job(job_id))


@app.get(**api.GET_JOB_RESULT)
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


# The page (GET / and its files): the same origin as the routes it calls.
add_page_routes(app)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)


def openapi_json() -> str:
    return api.openapi_json(app, adapters.settings.max_sync_bytes)


if __name__ == "__main__" and "--openapi" in sys.argv:
    print(openapi_json())
