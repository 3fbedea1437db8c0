"""What every video function reuses, built once per execution environment (at init): the
adapters (S3, Redis, job records), the session and whole-video stores, SQS and SageMaker
clients, and the S3 transfers of media files. No model: only the handlers that detect
(functions/video/session_chunk.py, chunk_worker.py) load one.
"""
from __future__ import annotations

import json
from functools import cache, cached_property
from pathlib import Path

import boto3
from botocore.config import Config

from faceflow import media
from faceflow.images import BadInput
from functions.video.config import VideoSettings

from .aws import Adapters
from .layout import SESSION_PREFIX, s3_uri
from .sessions import S3Checkpoints, SessionStore, VideoJobs

_RETRIES = Config(retries={"max_attempts": 3, "mode": "standard"})
# A lock or lease held for an invocation without a context (a local call) lasts this long.
_NO_CONTEXT_MS = 900_000


class VideoRuntime:
    def __init__(self, adapters: Adapters | None = None, video: VideoSettings | None = None):
        self.adapters = adapters or Adapters()
        self.settings = self.adapters.settings
        self.video = video or VideoSettings.from_env()
        self.checkpoints = S3Checkpoints(self.adapters.s3, self.settings.output_bucket, SESSION_PREFIX)
        self.sessions = SessionStore(self.adapters.redis, self.video.session_ttl_s, self.checkpoints)
        self.video_jobs = VideoJobs(self.adapters.redis, self.settings.job_ttl_s,
                                    job_prefix=self.adapters.jobs.prefix)

    @property
    def s3(self):
        return self.adapters.s3

    @property
    def jobs(self):
        return self.adapters.jobs

    @cached_property
    def sagemaker(self):
        return boto3.client("sagemaker-runtime", config=_RETRIES)

    @cached_property
    def sqs(self):
        return boto3.client("sqs", config=_RETRIES)

    @cache
    def queue_url(self, arn: str) -> str:
        """arn:aws:sqs:REGION:ACCOUNT:NAME → the queue's URL (asked once per queue)."""
        _, _, _, _, account, name = arn.split(":", 5)
        return self.sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]

    def lock_ms(self, context) -> int:
        """A lock or lease outlives the invocation that holds it by the margin, never more: a
        worker killed mid-chunk (timeout, OOM) frees it by itself."""
        remaining = context.get_remaining_time_in_millis() if context is not None else _NO_CONTEXT_MS
        return max(1000, int(remaining) + self.video.lock_margin_ms)

    # --- media in S3 ------------------------------------------------------------------------
    def output_uri(self, key: str) -> str:
        return s3_uri(self.settings.output_bucket, key)

    def download(self, bucket: str, key: str, dst: Path) -> int:
        """An input video (a whole upload or a stream chunk), size-checked before it is read.
        Returns its size in bytes."""
        limit = self.video.max_video_bytes
        length = self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if length > limit:
            raise BadInput(f"video too large: {length} bytes (limit {limit})")
        self.s3.download_file(bucket, key, str(dst))
        return int(length)

    def upload(self, path: Path, key: str, content_type: str | None = None) -> None:
        """A file into the output bucket (one PUT or a completed multipart upload: it appears
        whole or not at all), typed by its extension unless `content_type` says otherwise."""
        self.s3.upload_file(str(path), self.settings.output_bucket, key,
                            ExtraArgs={"ContentType": content_type or media.media_type_for(path)})

    def put_json(self, key: str, value) -> None:
        self.s3.put_object(Bucket=self.settings.output_bucket, Key=key, Body=json.dumps(value).encode(),
                           ContentType="application/json")


runtime = VideoRuntime()
