"""The Lambda side of the GPU endpoint (a SageMaker asynchronous endpoint, functions/gpu/).

Submitting a job: the job descriptor (the JSON functions/gpu/server.py reads) is written to
S3 and the endpoint is invoked with `invoke_endpoint_async(InputLocation=that object,
InferenceId=job id)`; SageMaker queues it, runs it, and writes the worker's JSON answer to the
OutputLocation (success) or the FailureLocation (a 4xx/5xx answer), then posts a notification
on the endpoint's success or error SNS topic.

    from functions.common import gpu
    if gpu.enabled():
        sub = gpu.submit(job_id, "s3://in/uploads/<job>/clip.mp4", "s3://out/results/<job>/clip.mp4")
        jobs.put(job_id, QUEUED, **sub.job_fields())

Finishing it: `update_from_notification` turns that notification (the SageMaker message,
its SNS wrapper, or a Lambda SNS event record) into a job update; `update_from_result` does the
same for the worker's JSON itself (read from the output or failure object, or included in
the notification). A job update is a dict for functions.common.jobs.JobStore:

    update = gpu.update_from_notification(record, s3=adapters.s3)
    jobs.put(update.pop("job_id"), update.pop("status"), **update)

| variable | meaning | default |
|---|---|---|
| FACEFLOW_GPU_ENDPOINT | name of the SageMaker async endpoint (set by template.yaml only when the GPU part is deployed) | unset: no GPU |
| FACEFLOW_OUTPUT_BUCKET | where the request descriptors are written (under results/_gpu/requests/) | required to submit |
| AWS_ENDPOINT_URL | boto3's own: points S3 and sagemaker-runtime at moto in tests | unset (AWS) |
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from faceflow import media

ENDPOINT_ENV = "FACEFLOW_GPU_ENDPOINT"
REQUEST_PREFIX = "results/_gpu/requests/"   # output bucket; expires with results/
CONTENT_TYPE = "application/json"
OPERATIONS = media.OPERATIONS
DONE, FAILED = "done", "failed"            # functions.common.jobs' statuses
BACKEND = "gpu"
MAX_INVOCATION_TIMEOUT_S = 3600           # SageMaker's limit for one async invocation
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")   # an InferenceId is at most 64
_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<key>.*[^/])$")


class GpuError(RuntimeError):
    """The GPU endpoint cannot take the job (not configured, a bad request)."""


def endpoint_name() -> str | None:
    return os.environ.get(ENDPOINT_ENV) or None


def enabled() -> bool:
    """Whether this deployment has a GPU endpoint (template.yaml sets the variable only then)."""
    return endpoint_name() is not None


def split_s3_uri(uri: str, name: str = "location") -> tuple[str, str]:
    match = _S3_URI.match(uri or "")
    if not match:
        raise GpuError(f"{name} {str(uri)[:200]!r} is not an s3://bucket/key URI of an object")
    return match["bucket"], match["key"]


# --- submit -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Submission:
    job_id: str
    endpoint: str
    request: str            # s3:// of the job descriptor (the InputLocation)
    inference_id: str
    output_location: str    # where SageMaker will put the worker's answer on success
    failure_location: str | None

    def job_fields(self) -> dict[str, str]:
        """Fields for the job record (JobStore.put(job_id, status, **fields))."""
        fields = {"backend": BACKEND, "gpu_endpoint": self.endpoint, "gpu_request": self.request,
                  "gpu_inference_id": self.inference_id, "gpu_output_location": self.output_location}
        if self.failure_location:
            fields["gpu_failure_location"] = self.failure_location
        return fields

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_request(job_id: str, input_uri: str, output_uri: str | None, operation: str = "anonymize",
                  options: Mapping[str, Any] | None = None, report_uri: str | None = None,
                  source_uri: str | None = None) -> dict[str, Any]:
    """The job descriptor functions/gpu/server.py takes (checked here, and again there)."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise GpuError(f"job id {str(job_id)[:80]!r} cannot be an InferenceId (1-64 letters, digits, '.', '_', '-')")
    if operation not in OPERATIONS:
        raise GpuError(f"operation {operation!r} is not one the GPU worker runs ({', '.join(OPERATIONS)})")
    split_s3_uri(input_uri, "input")
    if output_uri is None and report_uri is None:
        raise GpuError("an output (or, for analyze, a report) location is required")
    if (operation == "swap") != (source_uri is not None):
        raise GpuError("a swap, and only a swap, names a source: the photo of the face to put in")
    request: dict[str, Any] = {"job_id": job_id, "operation": operation, "input": input_uri}
    if source_uri is not None:
        split_s3_uri(source_uri, "source")
        request["source"] = source_uri
    if output_uri is not None:
        split_s3_uri(output_uri, "output")
        request["output"] = output_uri
    if report_uri is not None:
        split_s3_uri(report_uri, "report")
        request["report"] = report_uri
    if options:
        request["options"] = dict(options)
    return request


def request_location(job_id: str, bucket: str | None = None) -> tuple[str, str]:
    bucket = bucket or os.environ.get("FACEFLOW_OUTPUT_BUCKET")
    if not bucket:
        raise GpuError("no bucket for the GPU request: pass request_bucket or set FACEFLOW_OUTPUT_BUCKET")
    return bucket, f"{REQUEST_PREFIX}{job_id}.json"


def submit(job: str | Mapping[str, Any], input_uri: str, output_uri: str | None = None, *,
           operation: str = "anonymize", options: Mapping[str, Any] | None = None,
           report_uri: str | None = None, source_uri: str | None = None, endpoint: str | None = None,
           request_bucket: str | None = None,
           s3=None, runtime=None, invocation_timeout_s: int = MAX_INVOCATION_TIMEOUT_S,
           request_ttl_s: int | None = None) -> Submission:
    """Queue `job` on the GPU endpoint: write its descriptor to S3, then invoke the endpoint
    asynchronously with InferenceId = the job id. Returns where the answer will appear.

    `job` is a job id or a job record ({"id": ...}). Submitting the same job again writes the
    same descriptor object and queues it again (the worker's outputs are deterministic)."""
    job_id = job if isinstance(job, str) else (job.get("id") or job.get("job_id"))
    endpoint = endpoint or endpoint_name()
    if not endpoint:
        raise GpuError(f"no GPU endpoint configured ({ENDPOINT_ENV} is unset)")
    request = build_request(job_id, input_uri, output_uri, operation, options, report_uri, source_uri)
    bucket, key = request_location(job_id, request_bucket)
    if s3 is None or runtime is None:
        import boto3
        from botocore.config import Config
        config = Config(retries={"max_attempts": 3, "mode": "standard"})
        s3 = s3 or boto3.client("s3", config=config)
        runtime = runtime or boto3.client("sagemaker-runtime", config=config)
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(request).encode(), ContentType=CONTENT_TYPE)
    args = {"EndpointName": endpoint, "InputLocation": f"s3://{bucket}/{key}", "ContentType": CONTENT_TYPE,
            "Accept": CONTENT_TYPE, "InferenceId": job_id,
            "InvocationTimeoutSeconds": max(1, min(int(invocation_timeout_s), MAX_INVOCATION_TIMEOUT_S))}
    if request_ttl_s:
        args["RequestTTLSeconds"] = int(request_ttl_s)
    reply = runtime.invoke_endpoint_async(**args)
    return Submission(job_id=job_id, endpoint=endpoint, request=f"s3://{bucket}/{key}",
                      inference_id=reply.get("InferenceId") or job_id,
                      output_location=reply["OutputLocation"], failure_location=reply.get("FailureLocation"))


# --- results ---------------------------------------------------------------------------------

def update_from_result(result: bytes | str | Mapping[str, Any], job_id: str | None = None,
                       failed: bool = False) -> dict[str, Any]:
    """A job update from the worker's JSON answer (the output object, the failure object, or
    the body included in a notification). `failed`: it came from the failure side."""
    data = _json_object(result)
    if data is None:
        text = result.decode(errors="replace") if isinstance(result, bytes) else str(result)
        if failed:
            return _failed(job_id, _clip(text) or "the GPU worker failed without a message")
        return _failed(job_id, f"the GPU worker answered something that is not its JSON result: {_clip(text)!r}")
    job_id = data.get("job_id") or job_id
    if failed or data.get("status") != DONE:
        message = data.get("error") or "the GPU worker failed without a message"
        update = _failed(job_id, str(message))
        if data.get("error_type"):
            update["error_type"] = str(data["error_type"])
        return update
    outputs = {}
    if data.get("output"):
        outputs[data.get("media") or "output"] = data["output"]
    if data.get("report"):
        outputs["report"] = data["report"]
    update: dict[str, Any] = {"job_id": job_id, "status": DONE, "backend": BACKEND, "outputs": outputs}
    for name in ("faces", "frames", "ms", "media"):
        if data.get(name) is not None:
            update[name] = data[name]
    return update


def update_from_notification(message: Any, s3=None) -> dict[str, Any]:
    """A job update from a SageMaker async notification: the message (a dict or its JSON),
    an SNS message ({"Message": ...}), or a Lambda SNS event with one record.

    The worker's answer is taken from the notification when it is included
    (IncludeInferenceResponseIn), else read from the output/failure object when `s3` is given;
    otherwise a success gives status done with only the output location, and a failure the
    reason SageMaker gives (which quotes the worker's error body)."""
    note = _notification(message)
    job_id = note.get("inferenceId")
    status = str(note.get("invocationStatus", "")).lower()
    response = note.get("responseParameters") or {}
    failed = status != "completed"
    body = _included_body(note.get("responseBody"))
    if body is not None:
        update = update_from_result(body, job_id, failed)
    else:
        location = response.get("failureLocation" if failed else "outputLocation")
        if s3 is not None and location:
            update = update_from_result(read_object(s3, location), job_id, failed)
        elif failed:
            update = _failed(job_id, _reason(note.get("failureReason")))
        else:
            update = {"job_id": job_id, "status": DONE, "backend": BACKEND}
    if failed and update["status"] != FAILED:  # never let a failure read as done
        update = _failed(job_id, _reason(note.get("failureReason")))
    location = response.get("failureLocation" if failed else "outputLocation")
    if location:
        update["gpu_failure_location" if failed else "gpu_output_location"] = location
    return update


def updates_from_sns_event(event: Mapping[str, Any], s3=None) -> list[dict[str, Any]]:
    """Every job update in a Lambda SNS event (one per record)."""
    return [update_from_notification(record, s3) for record in event.get("Records", [])]


def read_object(s3, uri: str) -> bytes:
    bucket, key = split_s3_uri(uri, "result location")
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _notification(message: Any) -> dict[str, Any]:
    if isinstance(message, (bytes, str)):
        message = _json_object(message)
        if message is None:
            raise GpuError("notification is not a JSON object")
    if not isinstance(message, Mapping):
        raise GpuError(f"notification must be a JSON object, not {type(message).__name__}")
    if "Records" in message:                   # a Lambda SNS event
        records = message["Records"]
        if len(records) != 1:
            raise GpuError(f"expected one SNS record, got {len(records)}: use updates_from_sns_event")
        message = records[0]
    if "Sns" in message:                       # a Lambda SNS record
        message = message["Sns"]
    if "Message" in message and "invocationStatus" not in message:   # the SNS envelope
        return _notification(message["Message"])
    if "invocationStatus" not in message or "inferenceId" not in message:
        raise GpuError("not a SageMaker async inference notification (no invocationStatus/inferenceId)")
    return dict(message)


def _included_body(body: Any) -> bytes | str | None:
    """The worker's answer when the notification includes it (IncludeInferenceResponseIn)."""
    if not isinstance(body, Mapping) or body.get("content") in (None, ""):
        return None
    content = body["content"]
    if str(body.get("encoding", "")).upper() == "BASE64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            return None
    return content


def _json_object(value: Any) -> dict[str, Any] | None:
    if isinstance(value, Mapping):
        return dict(value)
    try:
        data = json.loads(value)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _reason(reason: Any) -> str:
    """The worker's own error message when SageMaker's failureReason quotes its JSON body
    ('ClientError: Received client error (422) from primary with message "{...}". ...')."""
    text = str(reason or "the GPU endpoint reported a failure without a reason")
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        quoted = _json_object(text[start:end + 1])
        if quoted and quoted.get("error"):
            return str(quoted["error"])
    return _clip(text)


def _failed(job_id: str | None, error: str) -> dict[str, Any]:
    return {"job_id": job_id, "status": FAILED, "backend": BACKEND, "error": _clip(error)}


def _clip(text: str, limit: int = 1000) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"
