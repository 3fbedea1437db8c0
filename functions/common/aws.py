"""The edge adapters every function shares: settings, S3 client, Redis, jobs, idempotency,
and the Powertools Tracer.

Built once per execution environment (at init), reused by every invocation.
"""
from __future__ import annotations

import contextlib
import os
import re
from functools import cached_property
from typing import Any
from urllib.parse import unquote_plus

import boto3
import redis
from aws_lambda_powertools import Tracer
from aws_lambda_powertools.tracing.base import BaseProvider, BaseSegment
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig
from aws_lambda_powertools.utilities.idempotency.persistence.cache import CachePersistenceLayer
from botocore.config import Config

from .jobs import JobStore, job_id_for_object
from .settings import PREFIX_OPERATIONS, RESULT_PREFIX, Settings

_PREFIXES = "|".join(re.escape(p) for p in PREFIX_OPERATIONS)
_API_JOB_KEY = re.compile(rf"^(?:{_PREFIXES})(?P<job>[0-9a-f]{{32}})/(?P<name>[^/]+)$")


class Adapters:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()

    @cached_property
    def s3(self):
        return boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                signature_version="s3v4"))

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True,
                                    socket_timeout=5, socket_connect_timeout=3)

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.redis, self.settings.job_ttl_s)

    @cached_property
    def idempotency_store(self) -> CachePersistenceLayer:
        return CachePersistenceLayer(client=self.redis)

    @cached_property
    def idempotency_config(self) -> IdempotencyConfig:
        return IdempotencyConfig(expires_after_seconds=self.settings.job_ttl_s)


def make_tracer(service: str) -> Tracer:
    """Powertools' Tracer for `service`. With POWERTOOLS_TRACE_DISABLED set (devstack, tests,
    benchmarks) it gets a provider that does nothing, which spares importing
    aws_xray_sdk.core: its module-level recorder builds two X-Ray botocore clients, about
    170 ms of init. Otherwise (Lambda, Tracing: Active) it is the ordinary X-Ray Tracer."""
    if os.environ.get("POWERTOOLS_TRACE_DISABLED", "").strip().lower() in ("1", "true", "yes", "on"):
        return Tracer(service=service, disabled=True, provider=_NoTracing())
    return Tracer(service=service)


class _NoSegment(BaseSegment):
    def close(self, end_time: int | None = None) -> None: ...
    def add_subsegment(self, subsegment: Any) -> None: ...
    def remove_subsegment(self, subsegment: Any) -> None: ...
    def put_annotation(self, key: str, value: Any) -> None: ...
    def put_metadata(self, key: str, value: Any, namespace: str = "default") -> None: ...
    def add_exception(self, exception: BaseException, stack: Any, remote: bool = False) -> None: ...


class _NoTracing(BaseProvider):
    @contextlib.contextmanager
    def in_subsegment(self, name=None, **kwargs):
        yield _NoSegment()

    @contextlib.asynccontextmanager
    async def in_subsegment_async(self, name=None, **kwargs):
        yield _NoSegment()

    def put_annotation(self, key: str, value: Any) -> None: ...
    def put_metadata(self, key: str, value: Any, namespace: str = "default") -> None: ...
    def patch(self, modules: Any) -> None: ...
    def patch_all(self) -> None: ...


def object_identity(bucket: str, raw_key: str, version: str | None, etag: str | None) -> dict:
    """What makes an upload unique: bucket + key + version (or etag when unversioned).
    S3 event keys are URL-encoded (a space arrives as '+', a '+' as '%2B')."""
    key = unquote_plus(raw_key)
    return {"bucket": bucket, "key": key, "version": version or etag or ""}


def job_for_key(bucket: str, key: str, version: str) -> tuple[str, str]:
    """(job id, file name) for an upload: API jobs upload to uploads/<job id>/<name> (or
    analyze/<job id>/<name>); anything else dropped into the bucket gets an id derived from
    its identity."""
    match = _API_JOB_KEY.match(key)
    if match:
        return match["job"], match["name"]
    return job_id_for_object(bucket, key, version), key.rsplit("/", 1)[-1]


def operation_for_key(key: str) -> str | None:
    """The operation an upload asks for by its prefix (settings.PREFIX_OPERATIONS); None
    outside every trigger prefix."""
    return next((op for prefix, op in PREFIX_OPERATIONS.items() if key.startswith(prefix)), None)


def result_keys(job_id: str, name: str) -> tuple[str, str]:
    return f"{RESULT_PREFIX}{job_id}/{name}", f"{RESULT_PREFIX}{job_id}/{name}.json"
