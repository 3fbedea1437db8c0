"""The keys each Redis script touches together share one cluster slot: ElastiCache Serverless
(which the template creates when no RedisEndpoint is given) is a clustered Redis, and refuses
a multi-key script across slots (CROSSSLOT)."""
from __future__ import annotations

import pytest

redis = pytest.importorskip("redis")
from redis.crc import key_slot  # noqa: E402

from functions.common.jobs import JobStore  # noqa: E402
from functions.common.sessions import SessionStore, VideoJobs  # noqa: E402

IDS = ["6f1d2c3b4a5e4f60718293a4b5c6d7e8", "s1", "tenant-a.cam-7", "0"]


@pytest.mark.parametrize("ident", IDS)
def test_each_scripts_keys_share_a_slot(ident):
    client = redis.Redis()  # never connects: keys() and register_script() need no server
    jobs = JobStore(client, 60)
    video = VideoJobs(client, job_prefix=jobs.prefix)
    assert len({key_slot(k.encode()) for k in video.keys(ident)}) == 1
    assert key_slot(jobs._key(ident).encode()) == key_slot(video.keys(ident)[0].encode())
    assert len({key_slot(k.encode()) for k in SessionStore(client).keys(ident)}) == 1
