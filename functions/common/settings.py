"""Function configuration, read once from the environment (set by template.yaml or devstack).

| variable | meaning | default |
|---|---|---|
| FACEFLOW_INPUT_BUCKET | bucket that uploads land in (the only one with a trigger) | required |
| FACEFLOW_OUTPUT_BUCKET | bucket that results are written to (no trigger: no loop) | required |
| FACEFLOW_REDIS_URL | redis:// or rediss:// URL of the job store and idempotency records | required |
| FACEFLOW_JOB_TTL_S | how long job records live | 604800 (7 days) |
| FACEFLOW_MAX_UPLOAD_BYTES | largest object the stills function will read | 26214400 (25 MiB) |
| FACEFLOW_MAX_SYNC_BYTES | largest body POST /v1/analyze, /v1/anonymize and /v1/swap accept | 5242880 (5 MiB) |
| FACEFLOW_URL_TTL_S | lifetime of presigned upload/download URLs | 900 |
| AWS_LAMBDA_FUNCTION_MEMORY_SIZE | Lambda's own (MB): the memory budget images are checked against before decoding (faceflow.images.pixel_budget) | unset: FACEFLOW_MEMORY_MB, else the machine's memory |
| FACEFLOW_MODEL_DIR | model bundle (baked into the image at /opt/faceflow/models) | see faceflow.bundle |
| FACEFLOW_GPU_ENDPOINT | SageMaker async endpoint jobs may be routed to (functions/common/gpu.py; set by template.yaml only when the GPU part is deployed) | unset: no GPU |
| FACEFLOW_JWT_ISSUER | JWT issuer the WebSocket API's `$connect` authorizer accepts (functions/stream/authorizer.py; AuthMode JWT only) | unset |
| FACEFLOW_JWT_AUDIENCE | its accepted audiences, comma separated | unset |
| AWS_ENDPOINT_URL | boto3's own: points S3/SQS/SageMaker at moto in tests | unset (AWS) |

The video functions' own variables (FACEFLOW_CHUNK_QUEUE_URL, FACEFLOW_CHUNK_SECONDS,
FACEFLOW_SESSION_TTL_S, ...) are documented, and read, by functions/video/config.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from faceflow import media

UPLOAD_PREFIX = "uploads/"   # the input bucket's trigger prefix: faces masked
ANALYZE_PREFIX = "analyze/"  # the same, for analysis: only the JSON report is written
# Face swap: a job manifest (SWAP_MANIFEST_SUFFIX) under this prefix names a target and a
# source face uploaded under it too (functions.common.swapjobs); only manifests trigger.
SWAP_PREFIX = "swap/"
SWAP_MANIFEST_SUFFIX = ".json"
SWAP_MANIFEST_NAME = "manifest.json"   # the one an API job's completion writes: swap/{job_id}/manifest.json
ANONYMIZE, ANALYZE, SWAP = media.ANONYMIZE, media.ANALYZE, media.SWAP  # a job's operations (faceflow.media)
# Which operation an upload under each trigger prefix asks for.
PREFIX_OPERATIONS = {UPLOAD_PREFIX: ANONYMIZE, ANALYZE_PREFIX: ANALYZE, SWAP_PREFIX: SWAP}
RESULT_PREFIX = "results/"   # where results go in the output bucket
# The suffixes the input bucket's stills trigger fires for (template.yaml's S3 filters, either
# case) and the Content-Type of each; tests check the template agrees.
UPLOAD_CONTENT_TYPES = {ext: media.extension_media_type(ext) for ext in media.IMAGE_EXTENSIONS}


@dataclass(frozen=True)
class Settings:
    input_bucket: str
    output_bucket: str
    redis_url: str
    job_ttl_s: int = 7 * 24 * 3600
    max_upload_bytes: int = 25 * 1024 * 1024
    max_sync_bytes: int = 5 * 1024 * 1024
    url_ttl_s: int = 900
    # the function's memory in bytes: stills that would not fit in it are refused before decoding
    memory_bytes: int | None = None

    @classmethod
    def from_env(cls) -> "Settings":
        missing = [v for v in ("FACEFLOW_INPUT_BUCKET", "FACEFLOW_OUTPUT_BUCKET", "FACEFLOW_REDIS_URL")
                   if not os.environ.get(v)]
        if missing:
            raise RuntimeError(f"missing configuration: {', '.join(missing)}")
        env = os.environ
        return cls(
            input_bucket=env["FACEFLOW_INPUT_BUCKET"],
            output_bucket=env["FACEFLOW_OUTPUT_BUCKET"],
            redis_url=env["FACEFLOW_REDIS_URL"],
            job_ttl_s=int(env.get("FACEFLOW_JOB_TTL_S", cls.job_ttl_s)),
            max_upload_bytes=int(env.get("FACEFLOW_MAX_UPLOAD_BYTES", cls.max_upload_bytes)),
            max_sync_bytes=int(env.get("FACEFLOW_MAX_SYNC_BYTES", cls.max_sync_bytes)),
            url_ttl_s=int(env.get("FACEFLOW_URL_TTL_S", cls.url_ttl_s)),
            memory_bytes=function_memory_bytes(),
        )


def function_memory_bytes() -> int | None:
    """The memory Lambda gives this function (AWS_LAMBDA_FUNCTION_MEMORY_SIZE, in MB) in bytes;
    None where it is not set."""
    memory_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    return int(memory_mb) * 1024 * 1024 if memory_mb else None
