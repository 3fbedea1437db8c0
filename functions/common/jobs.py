"""Job records in Redis: one hash per job, with a TTL.

status: queued → running → done | failed (with the error). Fields are strings; `outputs`
and `progress` are JSON. Nothing here falls back silently: a Redis error propagates, so the
function fails and Lambda retries.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import redis

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATUSES = (QUEUED, RUNNING, DONE, FAILED)
_JSON_FIELDS = ("outputs", "progress", "options")


def _encoded(fields: dict[str, Any]) -> dict[str, str]:
    """Redis hash values: JSON for the structured fields, text for the rest; None left out."""
    return {k: json.dumps(v) if k in _JSON_FIELDS else str(v) for k, v in fields.items() if v is not None}


def job_key(prefix: str, job_id: str) -> str:
    """The job's hash. The id is a hash tag ({...}) so that scripts touching it and the
    video keys of the same job (functions.common.sessions) stay in one slot of a clustered
    Redis such as ElastiCache Serverless (a multi-key script across slots is refused)."""
    return f"{prefix}{{{job_id}}}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def job_id_for_object(bucket: str, key: str, version: str) -> str:
    """A stable id for an object dropped into the bucket without an API job: the same
    upload (bucket, key, version or etag) always maps to the same job."""
    return hashlib.sha256(f"{bucket}\n{key}\n{version}".encode()).hexdigest()[:32]


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int, prefix: str = "faceflow:job:"):
        self.client, self.ttl_s, self.prefix = client, ttl_s, prefix

    @classmethod
    def from_url(cls, url: str, ttl_s: int) -> "JobStore":
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                        socket_connect_timeout=3), ttl_s)

    def _key(self, job_id: str) -> str:
        return job_key(self.prefix, job_id)

    def put(self, job_id: str, status: str | None, **fields: Any) -> None:
        """Write `fields` (None values skipped) and the status; `status` None leaves it as it is."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status}")
        now = str(time.time())
        record = {"updated": now, **({"status": status} if status else {}), **_encoded(fields)}
        key = self._key(job_id)
        pipe = self.client.pipeline()
        pipe.hsetnx(key, "created", now)
        pipe.hset(key, mapping=record)
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self._key(job_id))
        if not raw:
            return None
        job = {"id": job_id, **raw}
        for name in _JSON_FIELDS:
            if name in job:
                job[name] = json.loads(job[name])
        for name in ("created", "updated"):
            job[name] = float(job[name])
        return job

    # Sets the fields only while the job is neither done nor failed (a failure found later
    # must not overwrite a result, nor the job's own, more precise, refusal).
    _FAIL_UNLESS_FINISHED = """
    local status = redis.call('HGET', KEYS[1], 'status')
    if status == 'done' or status == 'failed' then return status end
    redis.call('HSETNX', KEYS[1], 'created', ARGV[2])
    for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    redis.call('EXPIRE', KEYS[1], ARGV[1])
    return ''
    """

    def fail_unless_finished(self, job_id: str, error: str, **fields: Any) -> str | None:
        """Mark the job failed with `error` unless it is done or failed already. Returns None
        when it was marked, else the status it kept."""
        now = str(time.time())
        record = {"status": FAILED, "updated": now, "error": error, **_encoded(fields)}
        args = [self.ttl_s, now, *(item for pair in record.items() for item in pair)]
        kept = self.client.eval(self._FAIL_UNLESS_FINISHED, 1, self._key(job_id), *args)
        return kept or None
