"""Video at scale on Lambda: functions/common/sessions.py and the video handlers (functions/video/) against a
real Redis server and a real moto_server (S3, SQS), from conftest's devstack fixtures. The
handlers run in-process with real-shaped events; nothing is mocked.

Skips with the reason when a server is missing (fails in CI: see conftest)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

redis = pytest.importorskip("redis", reason="redis-py not installed: pip install -e '.[functions]'")
boto3 = pytest.importorskip("boto3", reason="boto3 not installed: pip install -e '.[functions]'")

from conftest import ROOT, data_path  # noqa: E402
from devstack.procs import wait_until  # noqa: E402

from functions.common.sessions import (  # noqa: E402
    ALREADY_DONE, BUSY, COMMITTED, DUPLICATE, NOT_YET, PROCESS, SessionError,
    SessionStore, VideoJobs,
)

REGION = "us-east-1"
INPUT_BUCKET, OUTPUT_BUCKET = "ff-video-input", "ff-video-output"
# The video functions' modules, in import order (the runtime first, the handlers last).
VIDEO_MODULES = ("functions.common.videoruntime", "functions.common.videojobs", "functions.common.splitting",
                 "functions.common.streams", "functions.video.split", "functions.video.chunk_worker",
                 "functions.video.session_chunk", "functions.video.merge", "functions.video.gpu_result")
CLIP = ("video", "pyfeat_WolfgangLanger_Pexels.mp4")


@pytest.fixture()
def rdb(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture()
def fresh_rdb(rdb):
    """An empty Redis, for the tests of the Redis layer alone (the handler tests keep theirs)."""
    rdb.flushall()
    return rdb


# --- sessions: the Redis layer alone ------------------------------------------------------------

class DictCheckpoints:
    def __init__(self):
        self.records: dict[tuple[str, int], dict] = {}

    def save(self, sid, seq, record):
        self.records[sid, seq] = json.loads(json.dumps(record))

    def load(self, sid, seq):
        return self.records.get((sid, seq))

    def seqs(self, sid):
        return [seq for (s, seq) in self.records if s == sid]


def test_session_claims_in_order_only(fresh_rdb):
    rdb = fresh_rdb
    store = SessionStore(rdb, ttl_s=60)
    assert store.claim("s1", 1, 5000).status == NOT_YET  # no chunk 0 yet: never state-less
    c0 = store.claim("s1", 0, 5000)
    assert c0.status == PROCESS and c0.state is None and c0.token
    assert store.claim("s1", 0, 5000).status == BUSY      # redelivered while running
    assert store.claim("s1", 1, 5000).status == NOT_YET
    assert store.commit(c0, {"frame": 10}, {"output": "o0"}).status == COMMITTED
    dup = store.claim("s1", 0, 5000)
    assert dup.status == DUPLICATE and dup.result == {"output": "o0"}
    c1 = store.claim("s1", 1, 5000)
    assert c1.status == PROCESS and c1.state == {"frame": 10} and c1.version == 1
    assert store.commit(c1, {"frame": 20}, {"output": "o1"}).status == COMMITTED
    session = store.get("s1")
    assert session["next_seq"] == 2 and session["version"] == 2 and session["state"] == {"frame": 20}
    assert 0 < rdb.ttl("faceflow:session:{s1}") <= 60
    assert 0 < rdb.ttl("faceflow:session:{s1}:results") <= 60
    assert not rdb.exists("faceflow:session:{s1}:lock")
    with pytest.raises(ValueError):
        store.claim("../etc", 0, 5000)


def test_session_lock_expiry_and_stale_commit(fresh_rdb):
    rdb = fresh_rdb
    store = SessionStore(rdb, ttl_s=60)
    first = store.claim("s2", 0, 200)
    assert first.status == PROCESS
    time.sleep(0.3)                                  # the first worker "died": lock expired
    second = store.claim("s2", 0, 5000)
    assert second.status == PROCESS and second.token != first.token
    with pytest.raises(SessionError):                # the zombie cannot commit over the holder
        store.commit(first, {"by": "first"}, {"r": 1})
    assert store.commit(second, {"by": "second"}, {"r": 2}).status == COMMITTED
    # the zombie's late commit after the chunk was committed reports it as already done
    assert store.commit(first, {"by": "first"}, {"r": 1}).status == ALREADY_DONE
    assert store.get("s2")["state"] == {"by": "second"} and store.get("s2")["next_seq"] == 1
    # a lock that expired with nobody else holding it: the slow worker still commits
    slow = store.claim("s2", 1, 100)
    time.sleep(0.2)
    assert store.commit(slow, {"by": "slow"}, {"r": 3}).status == COMMITTED
    # release frees the lock at once for the retry
    c = store.claim("s2", 2, 60000)
    store.release(c)
    assert store.claim("s2", 2, 60000).status == PROCESS


def test_session_recovers_from_checkpoints_when_redis_forgets(fresh_rdb):
    rdb = fresh_rdb
    checkpoints = DictCheckpoints()
    store = SessionStore(rdb, ttl_s=60, checkpoints=checkpoints)
    for seq in range(3):
        claim = store.claim("s3", seq, 5000)
        store.commit(claim, {"after": seq}, {"output": f"o{seq}"})
    rdb.flushall()                                   # Redis restarted without persistence
    assert store.claim("s3", 5, 5000).status == NOT_YET  # 4 has no checkpoint: wait for it
    dup = store.claim("s3", 1, 5000)                 # an old duplicate does not rewind
    assert dup.status == DUPLICATE and dup.result == {"output": "o1"} and dup.restored
    claim = store.claim("s3", 3, 5000)
    assert claim.status == PROCESS and claim.state == {"after": 2} and claim.version == 3
    rdb.flushall()                                   # ... and again while chunk 3 runs
    done = store.commit(claim, {"after": 3}, {"output": "o3"})
    assert done.status == ALREADY_DONE and done.restored and done.next_seq == 4
    assert store.get("s3")["state"] == {"after": 3}
    # without checkpoints a lost session in progress is never restarted from nothing
    bare = SessionStore(rdb, ttl_s=60)
    rdb.flushall()
    assert bare.claim("s3", 4, 5000).status == NOT_YET


def test_video_job_counts_each_chunk_once_and_merges_once(fresh_rdb):
    rdb = fresh_rdb
    jobs = VideoJobs(rdb, ttl_s=60)
    rdb.hset("faceflow:job:{j1}", mapping={"status": "running", "owner": "me"})
    assert jobs.plan("j1", 3, "s3://b/work/j1/plan.json") == 0
    assert jobs.plan("j1", 3, "s3://b/work/j1/plan.json") == 0   # repeat: harmless
    with pytest.raises(redis.ResponseError):
        jobs.plan("j1", 4, "x")
    a = jobs.chunk_done("j1", 0, 5000)
    b = jobs.chunk_done("j1", 0, 5000)                            # duplicate completion
    assert (a.done, a.added, b.done, b.added) == (1, True, 1, False)
    assert rdb.hget("faceflow:job:{j1}", "chunks_done") == "1"
    assert json.loads(rdb.hget("faceflow:job:{j1}", "progress")) == {"chunks_done": 1, "chunks_total": 3}
    assert not jobs.chunk_done("j1", 2, 5000).merge
    last = jobs.chunk_done("j1", 1, 5000)
    assert last.merge and last.token and last.done == 3
    assert not jobs.chunk_done("j1", 1, 5000).merge               # lease held: no second merge
    jobs.merge_failed("j1", last.token)                           # the merge failed: lease freed
    again = jobs.chunk_done("j1", 2, 5000)
    assert again.merge
    jobs.merge_finished("j1", again.token)
    assert not jobs.chunk_done("j1", 0, 5000).merge and jobs.merged("j1")
    with pytest.raises(redis.ResponseError):
        jobs.chunk_done("j1", 3, 5000)
    # progress is never written into a job record that does not exist (no owner-less records)
    jobs.plan("j2", 2, "p")
    jobs.chunk_done("j2", 0, 5000)
    assert not rdb.exists("faceflow:job:{j2}")
    # lost from Redis: rebuilt from durable storage through recover()
    rdb.delete("faceflow:video:{j2}", "faceflow:video:{j2}:done")
    with pytest.raises(SessionError):
        jobs.chunk_done("j2", 1, 5000)
    rebuilt = jobs.chunk_done("j2", 1, 5000, recover=lambda: (2, "p", [0, 1]))
    assert rebuilt.restored and rebuilt.done == 2 and rebuilt.merge


# --- the handlers: environment --------------------------------------------------------------------

class Context:
    """A LambdaContext stand-in: the attributes Powertools and the handlers read."""

    def __init__(self, remaining_ms: int = 120_000, name: str = "faceflow-video"):
        import uuid
        self.function_name = name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{REGION}:123456789012:function:{name}"
        self.memory_limit_in_mb = 3008
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{name}"
        self.log_stream_name = "2026/11/23/[$LATEST]0123456789abcdef"
        self._deadline = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@pytest.fixture(scope="module")
def aws_env(moto_url, redis_server):
    """The functions' environment against this module's moto and redis, with the buckets and
    the chunk queue created."""
    env = {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
           "FACEFLOW_INPUT_BUCKET": INPUT_BUCKET, "FACEFLOW_OUTPUT_BUCKET": OUTPUT_BUCKET,
           "FACEFLOW_REDIS_URL": redis_server.url, "FACEFLOW_JOB_TTL_S": "3600",
           "FACEFLOW_CHUNK_SECONDS": "2.0", "FACEFLOW_SESSION_TTL_S": "3600",
           "POWERTOOLS_TRACE_DISABLED": "1", "POWERTOOLS_METRICS_NAMESPACE": "faceflow",
           "POWERTOOLS_LOG_LEVEL": "WARNING", "FACEFLOW_NOT_READY_DELAY_S": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        s3 = boto3.client("s3", region_name=REGION)
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        sqs = boto3.client("sqs", region_name=REGION)
        queue = sqs.create_queue(QueueName="faceflow-video-chunks",
                                 Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
        mp.setenv("FACEFLOW_CHUNK_QUEUE_URL", queue)
        # S3 → SQS → session function: the queue that S3 notifications of sessions/ go to
        session_queue = sqs.create_queue(QueueName="faceflow-session-chunks",
                                         Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
        yield {**env, "FACEFLOW_CHUNK_QUEUE_URL": queue, "session_queue": session_queue}


@pytest.fixture(scope="module")
def app(aws_env, model_dir):
    """The video functions' modules imported as Lambda would (module-level adapters, engine at
    init), as one namespace."""
    import importlib
    import types
    pytest.importorskip("faceflow.chunks", reason="faceflow.chunks (split/process/merge) not available")
    modules = [importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
               for name in VIDEO_MODULES]
    return types.SimpleNamespace(**{k: v for m in modules for k, v in vars(m).items() if not k.startswith("_")})


@pytest.fixture(scope="module")
def s3(aws_env):
    return boto3.client("s3", region_name=REGION)


@pytest.fixture(scope="module")
def clip_split(tmp_path_factory, app):
    """The Pexels clip (with audio) cut into ~2 s chunks by the core's split_video."""
    from faceflow.chunks import split_video
    src = data_path(*CLIP)
    split = split_video(src, tmp_path_factory.mktemp("clip") / "chunks", target_seconds=2.0)
    assert len(split.chunks) >= 4
    return split


def _s3_event(bucket: str, key: str, size: int, etag: str = "d41d8cd98f00b204e9800998ecf8427e") -> dict:
    from urllib.parse import quote_plus
    event = json.loads((ROOT / "events" / "session_chunk.json").read_text())
    record = event["Records"][0]
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["bucket"]["arn"] = f"arn:aws:s3:::{bucket}"
    record["s3"]["object"].update({"key": quote_plus(key, safe="/"), "size": size, "eTag": etag})
    record["s3"]["object"].pop("versionId", None)
    return event


def _sqs_event(bodies: list, queue: str = "faceflow-video-chunks") -> dict:
    """An SQS event, as Lambda's poller hands it over, of (messageId, body) pairs or of
    messages from sqs.receive_message (real receipt handles and receive counts)."""
    records = []
    for item in bodies:
        if isinstance(item, dict):
            mid, body, handle = item["MessageId"], item["Body"], item["ReceiptHandle"]
            count = item.get("Attributes", {}).get("ApproximateReceiveCount", "1")
        else:
            (mid, body), handle, count = item, f"rh-{item[0]}", "1"
        records.append({
            "messageId": mid, "receiptHandle": handle, "body": body,
            "attributes": {"ApproximateReceiveCount": count, "SentTimestamp": "1795428932480",
                           "SenderId": "AROAEXAMPLE", "ApproximateFirstReceiveTimestamp": "1795428932512"},
            "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": f"arn:aws:sqs:{REGION}:123456789012:{queue}", "awsRegion": REGION})
    return {"Records": records}


def _report(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read())


def _faces_by_frame(report: dict) -> list:
    """What must not change between runs: every frame's number and faces (box, track, source)."""
    return [(f["frame"], [(tuple(face["box"]), face.get("track"), face.get("source")) for face in f["faces"]])
            for f in report["frames"]]


def _upload_session(s3, sid: str, split, seqs=None) -> list[tuple[int, str, int]]:
    out = []
    for chunk in split.chunks:
        if seqs is not None and chunk.index not in seqs:
            continue
        path = Path(chunk.path)
        key = f"sessions/{sid}/{chunk.index}{path.suffix}"
        s3.upload_file(str(path), INPUT_BUCKET, key)
        out.append((chunk.index, key, path.stat().st_size))
    return out


def _session_reports(s3, app, sid: str, count: int) -> list[dict]:
    return [_report(s3, f"sessions/{sid}/{seq}.json") for seq in range(count)]


# --- a. stream sessions -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ordered_session(app, s3, clip_split):
    """The clip's chunks sent in order, one S3 event each: the reference run."""
    sid = "pexels-ordered"
    for seq, key, size in _upload_session(s3, sid, clip_split):
        reply = app.session_chunk_handler(_s3_event(INPUT_BUCKET, key, size), Context())
        assert [r["status"] for r in reply["results"]] == ["done"], reply
    return sid, _session_reports(s3, app, sid, len(clip_split.chunks))


@pytest.mark.slow
@pytest.mark.data
def test_stream_session_in_order(app, s3, clip_split, ordered_session, rdb):
    from faceflow.video import probe
    sid, reports = ordered_session
    total = sum(len(r["frames"]) for r in reports)
    assert total == probe(data_path(*CLIP)).frames          # every frame once
    numbers = [f["frame"] for r in reports for f in r["frames"]]
    assert numbers == list(range(total))                    # global numbering, no gap, no repeat
    assert sum(1 for r in reports for f in r["frames"] if f["faces"]) > 0.9 * total
    session = app.runtime.sessions.get(sid)
    assert session["next_seq"] == len(clip_split.chunks) and session["version"] == len(clip_split.chunks)
    for seq in range(len(clip_split.chunks)):
        for key in (f"sessions/{sid}/{seq}.mp4", f"sessions/{sid}/{seq}.state.json"):
            s3.head_object(Bucket=OUTPUT_BUCKET, Key=key)
        assert reports[seq]["source"] == f"s3://{INPUT_BUCKET}/sessions/{sid}/{seq}.mp4"  # no worker paths
    # a repeated event returns the stored result and writes nothing
    before = s3.head_object(Bucket=OUTPUT_BUCKET, Key=f"sessions/{sid}/1.mp4")["LastModified"]
    key = f"sessions/{sid}/1.mp4"
    size = Path(clip_split.chunks[1].path).stat().st_size
    reply = app.session_chunk_handler(_s3_event(INPUT_BUCKET, key, size), Context())
    assert reply["results"][0]["status"] == "duplicate"
    assert reply["results"][0]["result"]["output"] == f"s3://{OUTPUT_BUCKET}/sessions/{sid}/1.mp4"
    assert s3.head_object(Bucket=OUTPUT_BUCKET, Key=f"sessions/{sid}/1.mp4")["LastModified"] == before
    # the output bucket never triggers work
    reply = app.session_chunk_handler(_s3_event(OUTPUT_BUCKET, key, size), Context())
    assert reply["results"][0]["status"] == "ignored"


@pytest.mark.slow
@pytest.mark.data
def test_stream_session_shuffled_with_duplicate_matches_in_order(app, s3, aws_env, clip_split, ordered_session):
    """S3 notifications reach the function through a real SQS queue, out of order and one of
    them twice. A chunk that came too early fails (partial batch failure) and the handler
    makes its message visible again after FACEFLOW_NOT_READY_DELAY_S (1 s here, doubling per
    receive) instead of the queue's 60 s, so the queue hands it back without the test touching
    it; the session completes with the same faces on every frame as the in-order run."""
    sid = "pexels-shuffled"
    sqs = boto3.client("sqs", region_name=REGION)
    queue = aws_env["session_queue"]
    uploaded = _upload_session(s3, sid, clip_split)
    bodies = {seq: json.dumps(_s3_event(INPUT_BUCKET, key, size)) for seq, key, size in uploaded}
    order = list(bodies)
    random.Random(7).shuffle(order)
    if order[0] == 0:
        order.append(order.pop(0))
    order.insert(len(order) // 2, 1)                              # chunk 1 delivered twice
    for seq in order:
        sqs.send_message(QueueUrl=queue, MessageBody=bodies[seq])
    rounds = failures = 0
    deadline = time.monotonic() + 180

    def left() -> int:
        attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    while left():
        assert time.monotonic() < deadline, "the session never completed"
        got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=3, WaitTimeSeconds=1,
                                  AttributeNames=["All"]).get("Messages", [])
        if not got:
            continue
        rounds += 1
        reply = app.session_chunk_handler(_sqs_event(got, queue="faceflow-session-chunks"), Context())
        failed = {f["itemIdentifier"] for f in reply["batchItemFailures"]}
        failures += len(failed)
        for m in got:                                             # what Lambda's poller deletes
            if m["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
    assert failures > 0                                           # some chunks really came too early
    assert app.runtime.sessions.get(sid)["next_seq"] == len(clip_split.chunks)
    reports = _session_reports(s3, app, sid, len(clip_split.chunks))
    assert [_faces_by_frame(r) for r in reports] == [_faces_by_frame(r) for r in ordered_session[1]]
    # the S3 → SQS test message is acknowledged and ignored
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": INPUT_BUCKET})
    assert app.session_chunk_handler(_sqs_event([("t", test_event)]), Context()) == {"batchItemFailures": []}


# --- b. whole videos: split → chunk workers → merge ------------------------------------------------

def _drain(app, sqs, queue: str, *, batch: int = 3, after_round=None, max_rounds: int = 60) -> dict:
    """Lambda's SQS poller, emulated: receive up to `batch` messages, invoke the worker, delete
    what succeeded, make what failed visible again (its redelivery)."""
    stats = {"rounds": 0, "failed": [], "results": []}
    while True:
        got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=batch, WaitTimeSeconds=0,
                                  VisibilityTimeout=60).get("Messages", [])
        if not got:
            return stats
        stats["rounds"] += 1
        assert stats["rounds"] <= max_rounds, "the queue never drained"
        reply = app.chunk_worker_handler(_sqs_event([(m["MessageId"], m["Body"]) for m in got]), Context())
        failed = {f["itemIdentifier"] for f in reply["batchItemFailures"]}
        for m in got:
            if m["MessageId"] in failed:
                stats["failed"].append(json.loads(m["Body"]))
                sqs.change_message_visibility(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"],
                                              VisibilityTimeout=0)
            else:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
        if after_round:
            after_round(stats)


def _video_event(key: str, size: int) -> dict:
    from urllib.parse import quote_plus
    event = json.loads((ROOT / "events" / "video_upload.json").read_text())
    obj = event["Records"][0]["s3"]
    obj["bucket"].update({"name": INPUT_BUCKET, "arn": f"arn:aws:s3:::{INPUT_BUCKET}"})
    obj["object"].update({"key": quote_plus(key, safe="/"), "size": size})
    obj["object"].pop("versionId", None)
    return event


def _audio_packets(path) -> tuple[str, int]:
    import av
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        return stream.codec_context.name, sum(1 for p in c.demux(stream) if p.size)


@pytest.mark.slow
@pytest.mark.data
def test_whole_video_split_workers_merge_once(app, s3, aws_env, rdb, tmp_path, monkeypatch):
    """A job's video is split, its chunk messages (one sent twice) processed in batches, one
    chunk's object missing at first (that message fails, is redelivered and succeeds); the
    merge runs exactly once and the result keeps the source's frames, duration and audio."""
    from faceflow.video import count_frames, probe
    from functions.common.jobs import DONE, QUEUED, JobStore
    src = data_path(*CLIP)
    sqs = boto3.client("sqs", region_name=REGION)
    queue = aws_env["FACEFLOW_CHUNK_QUEUE_URL"]
    jobs = JobStore(rdb, 3600)
    job_id = "0123456789abcdef0123456789abcdef"
    jobs.put(job_id, QUEUED, owner="tester")                     # as POST /v1/jobs leaves it
    key = f"uploads/{job_id}/team offsite.mp4"
    s3.upload_file(str(src), INPUT_BUCKET, key)
    reply = app.split_handler(_video_event(key, src.stat().st_size), Context())
    total = reply["results"][0]["chunks"]
    assert reply["results"][0]["status"] == "running" and total >= 4
    job = jobs.get(job_id)
    assert job["owner"] == "tester" and job["chunks_total"] == str(total) and job["chunks_done"] == "0"
    plan = app.load_plan(job_id)
    assert [c["index"] for c in plan["chunks"]] == list(range(total)) and plan["audio"]
    assert sum(c["frames"] for c in plan["chunks"]) == probe(src).frames

    # a duplicate message, and one chunk's object missing for a while (an S3 fault)
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"job_id": job_id, "index": 1}))
    missing = plan["chunks"][total - 1]["key"]
    s3.copy_object(Bucket=OUTPUT_BUCKET, Key="stash/last", CopySource={"Bucket": OUTPUT_BUCKET, "Key": missing})
    s3.delete_object(Bucket=OUTPUT_BUCKET, Key=missing)
    merges = []
    real_merge = app.chunks.merge_chunks

    def counting_merge(*args, **kwargs):
        merges.append(job_id)
        return real_merge(*args, **kwargs)
    monkeypatch.setattr(app.chunks, "merge_chunks", counting_merge)
    seen_progress = []

    def after_round(stats):
        record = jobs.get(job_id)
        seen_progress.append((record["status"], record.get("progress")))
        if stats["failed"] and not s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=missing).get("KeyCount"):
            s3.copy_object(Bucket=OUTPUT_BUCKET, Key=missing, CopySource={"Bucket": OUTPUT_BUCKET, "Key": "stash/last"})

    stats = _drain(app, sqs, queue, after_round=after_round)
    assert stats["failed"], "the missing chunk made no message fail"
    assert {m["index"] for m in stats["failed"]} <= {total - 2, total - 1}  # its readers only
    assert len(merges) == 1
    # progress was visible in the job record while the chunks ran
    partial = [p for status, p in seen_progress if status == "running" and p and 0 < p["chunks_done"] < total]
    assert partial and all(p["chunks_total"] == total for p in partial)
    job = jobs.get(job_id)
    assert job["status"] == DONE and job["chunks_done"] == job["chunks_total"] == str(total)
    assert job["progress"] == {"chunks_done": total, "chunks_total": total}
    video_key, report_key = f"results/{job_id}/team offsite.mp4", f"results/{job_id}/team offsite.mp4.json"
    assert job["outputs"] == {"video": f"s3://{OUTPUT_BUCKET}/{video_key}", "report": f"s3://{OUTPUT_BUCKET}/{report_key}"}

    out = tmp_path / "out.mp4"
    s3.download_file(OUTPUT_BUCKET, video_key, str(out))
    src_info, out_info = probe(src), probe(out)
    assert count_frames(out) == count_frames(src) == src_info.frames
    assert abs(out_info.duration - src_info.duration) <= 1.5 / src_info.fps
    assert out_info.has_audio and _audio_packets(out) == _audio_packets(src)  # audio copied, whole
    report = _report(s3, report_key)
    assert [f["frame"] for f in report["frames"]] == list(range(src_info.frames))
    assert report["summary"]["frames_with_faces"] > 0.9 * src_info.frames
    assert report["summary"]["tracks"] <= 2                        # one person, ids joined across chunks

    # the done set as rebuilt from S3 if Redis lost it: every chunk, from the reports written
    assert app.recover_job(job_id, plan) == (total, f"s3://{OUTPUT_BUCKET}/work/{job_id}/plan.json", list(range(total)))
    # a late duplicate after the merge: counted once, no second merge, nothing rewritten
    before = s3.head_object(Bucket=OUTPUT_BUCKET, Key=video_key)["ETag"]
    reply = app.chunk_worker_handler(_sqs_event([("late", json.dumps({"job_id": job_id, "index": 0}))]), Context())
    assert reply == {"batchItemFailures": []} and len(merges) == 1
    assert s3.head_object(Bucket=OUTPUT_BUCKET, Key=video_key)["ETag"] == before
    # a repeated upload event does not start the job again
    assert app.split_handler(_video_event(key, src.stat().st_size), Context())["results"][0]["status"] == DONE
    assert not sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages")
    # the merge on its own: nothing to do once merged; forced, it rewrites the same bytes
    assert app.merge_handler({"job_id": job_id}, Context())["status"] == "merged" and len(merges) == 1
    assert app.merge_handler({"job_id": job_id, "force": True}, Context())["status"] == DONE
    assert len(merges) == 2 and s3.head_object(Bucket=OUTPUT_BUCKET, Key=video_key)["ETag"] == before
    # a malformed message is dropped, not retried forever
    reply = app.chunk_worker_handler(_sqs_event([("bad", json.dumps({"job_id": "../x", "index": 0}))]), Context())
    assert reply == {"batchItemFailures": []}


# --- c. faults ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.data
def test_stream_session_survives_redis_restart(app, s3, clip_split, ordered_session, redis_server):
    """Redis is killed and restarted empty (no persistence) between two chunks of a session:
    the session is rebuilt from its S3 checkpoints, not restarted state-less, and completes
    with every frame once and the same faces as the uninterrupted run."""
    sid, count = "pexels-restart", 3
    uploaded = _upload_session(s3, sid, clip_split, seqs=set(range(count)))
    for seq, key, size in uploaded[:2]:
        assert app.session_chunk_handler(_s3_event(INPUT_BUCKET, key, size), Context())["results"][0]["status"] == "done"
    redis_server.kill()
    redis_server.start()
    assert app.runtime.sessions.get(sid) is None               # Redis forgot everything
    seq, key, size = uploaded[2]
    assert app.session_chunk_handler(_s3_event(INPUT_BUCKET, key, size), Context())["results"][0]["status"] == "done"
    session = app.runtime.sessions.get(sid)
    assert session["next_seq"] == count and "restored" in session
    # an old chunk delivered again after the restart is a duplicate, not a rewind
    seq, key, size = uploaded[0]
    reply = app.session_chunk_handler(_s3_event(INPUT_BUCKET, key, size), Context())["results"][0]
    assert reply["status"] == "duplicate" and reply["result"]["output"].endswith(f"/{sid}/0.mp4")
    reports = _session_reports(s3, app, sid, count)
    assert [f["frame"] for r in reports for f in r["frames"]] == list(range(sum(c.frames for c in clip_split.chunks[:count])))
    assert [_faces_by_frame(r) for r in reports] == [_faces_by_frame(r) for r in ordered_session[1][:count]]


KILLED_WORKER = textwrap.dedent('''
    import json, os, sys, time
    from functions.video import session_chunk as app

    class Context:
        function_name, function_version, memory_limit_in_mb = "faceflow-video", "$LATEST", 3008
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:faceflow-video"
        aws_request_id, log_group_name, log_stream_name = "killed-worker", "/aws/lambda/x", "s"
        def get_remaining_time_in_millis(self):
            return 2000

    print("ready", flush=True)
    app.session_chunk_handler(json.loads(sys.argv[1]), Context())
    print("finished", flush=True)
''')


@pytest.mark.slow
@pytest.mark.data
def test_worker_killed_mid_chunk_is_retried_after_lock_expiry(app, s3, clip_split, ordered_session, aws_env, rdb):
    """A worker SIGKILLed while it holds a chunk (its lock: remaining time 2 s + 1 s margin):
    a retry meanwhile is BUSY (retryable), the retry after the lock expired processes the chunk."""
    sid = "pexels-killed"
    (seq, key, size), = _upload_session(s3, sid, clip_split, seqs={0})
    event = _s3_event(INPUT_BUCKET, key, size)
    env = {**os.environ, "FACEFLOW_LOCK_MARGIN_MS": "1000",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, json.dumps(event)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lock = f"faceflow:session:{{{sid}}}:lock"
    try:
        wait_until(lambda: rdb.exists(lock) or proc.poll() is not None, 120, what="the worker to take the chunk")
        time.sleep(0.3)                                        # well inside the chunk's processing
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    output = proc.stdout.read().decode()
    assert "finished" not in output
    assert app.runtime.sessions.get(sid)["next_seq"] == 0     # nothing committed
    with pytest.raises(app.ChunkNotReady, match="busy"):       # the lock still holds: retry later
        app.session_chunk_handler(event, Context())
    wait_until(lambda: not rdb.exists(lock), 10, what="the dead worker's lock to expire")
    assert app.session_chunk_handler(event, Context())["results"][0]["status"] == "done"
    assert app.runtime.sessions.get(sid)["next_seq"] == 1
    assert _faces_by_frame(_report(s3, f"sessions/{sid}/0.json")) == _faces_by_frame(ordered_session[1][0])


@pytest.mark.slow
@pytest.mark.data
def test_bad_inputs_fail_the_job_or_skip_the_chunk(app, s3, rdb, clip_split):
    """An unreadable whole video fails its job (no chunk messages); an unreadable stream chunk
    is skipped with its reason, and the session goes on from the state before it."""
    from functions.common.jobs import FAILED, JobStore
    job_id = "fedcba9876543210fedcba9876543210"
    key = f"uploads/{job_id}/broken.mp4"
    s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=b"\x00\x00\x00\x18ftypmp42 not really a video")
    reply = app.split_handler(_video_event(key, 40), Context())["results"][0]
    assert reply["status"] == FAILED and JobStore(rdb, 3600).get(job_id)["status"] == FAILED
    sid = "broken-chunk"
    good = _upload_session(s3, sid, clip_split, seqs={0, 2})
    s3.put_object(Bucket=INPUT_BUCKET, Key=f"sessions/{sid}/1.mp4", Body=b"garbage")
    events = [_s3_event(INPUT_BUCKET, good[0][1], good[0][2]), _s3_event(INPUT_BUCKET, f"sessions/{sid}/1.mp4", 7)]
    statuses = [app.session_chunk_handler(e, Context())["results"][0]["status"] for e in events]
    assert statuses == ["done", "failed"]
    assert app.runtime.sessions.get(sid)["next_seq"] == 2
    assert app.session_chunk_handler(_s3_event(INPUT_BUCKET, good[1][1], good[1][2]), Context())["results"][0]["status"] == "done"
    # keys that are not session chunks never run
    for bad in (f"sessions/{sid}/01.mp4", f"sessions/{sid}/x.mp4", "sessions/../3.mp4", f"sessions/{sid}/3.mov"):
        assert app.session_chunk_handler(_s3_event(INPUT_BUCKET, bad, 1), Context())["results"][0]["status"] == "ignored"


# --- d. routing: whole videos to the GPU endpoint, or split on Lambda ----------------------------

GPU_RULES = {
    "version": 1,
    "rules": [
        {"name": "private-stays-on-lambda", "when": {"sensitivity": ["private"]}, "target": "lambda"},
        {"name": "any-video-on-gpu", "description": "test: every video of 0 s or more",
         "when": {"media": ["video"], "duration_s": {"gte": 0}}, "target": "gpu"},
    ],
    "default": {"target": "lambda"},
}


@pytest.fixture()
def gpu_routing(tmp_path, monkeypatch, aws_env):
    """A rule table that sends every (non-private) video to the GPU endpoint, and an endpoint
    name (moto's sagemaker-runtime takes async invocations for any name)."""
    rules = tmp_path / "routing.json"
    rules.write_text(json.dumps(GPU_RULES))
    monkeypatch.setenv("FACEFLOW_ROUTING_FILE", str(rules))
    monkeypatch.setenv("FACEFLOW_GPU_ENDPOINT", "ff-gpu-test")
    sqs = boto3.client("sqs", region_name=REGION)
    _empty_queue(sqs, aws_env["FACEFLOW_CHUNK_QUEUE_URL"])
    yield sqs
    _empty_queue(sqs, aws_env["FACEFLOW_CHUNK_QUEUE_URL"])


def _empty_queue(sqs, queue: str) -> None:
    # Not purge_queue: SQS (and moto) refuse a second purge within 60 s.
    while True:
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                       VisibilityTimeout=0).get("Messages", [])
        if not messages:
            return
        for m in messages:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])


def _queued(sqs, queue: str) -> list[dict]:
    return [json.loads(m["Body"]) for m in sqs.receive_message(
        QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0).get("Messages", [])]


@pytest.mark.data
def test_video_routed_to_gpu_is_submitted_not_split(app, s3, aws_env, rdb, gpu_routing):
    from functions.common.jobs import QUEUED, RUNNING, JobStore
    src = data_path(*CLIP)
    jobs = JobStore(rdb, 3600)
    job_id = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
    jobs.put(job_id, QUEUED, owner="tester", sensitivity="normal", priority="low")   # as the API stores it
    key = f"uploads/{job_id}/keynote.mp4"
    s3.upload_file(str(src), INPUT_BUCKET, key)
    reply = app.split_handler(_video_event(key, src.stat().st_size), Context())["results"][0]
    assert reply == {"job_id": job_id, "status": RUNNING, "target": "gpu", "route": "any-video-on-gpu"}
    request = json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=f"results/_gpu/requests/{job_id}.json")["Body"].read())
    assert request == {"job_id": job_id, "operation": "anonymize", "input": f"s3://{INPUT_BUCKET}/{key}",
                       "output": f"s3://{OUTPUT_BUCKET}/results/{job_id}/keynote.mp4",
                       "report": f"s3://{OUTPUT_BUCKET}/results/{job_id}/keynote.mp4.json"}
    job = jobs.get(job_id)
    assert job["status"] == RUNNING and job["stage"] == "gpu" and job["route"] == "any-video-on-gpu"
    assert job["backend"] == "gpu" and job["gpu_endpoint"] == "ff-gpu-test" and job["owner"] == "tester"
    assert job["gpu_request"] == f"s3://{OUTPUT_BUCKET}/results/_gpu/requests/{job_id}.json"
    assert job["gpu_output_location"].startswith("s3://")
    # nothing split: no plan, no chunks, no chunk messages
    assert not s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=f"work/{job_id}/").get("KeyCount")
    assert _queued(gpu_routing, aws_env["FACEFLOW_CHUNK_QUEUE_URL"]) == []
    # a repeated upload event does not submit again
    again = app.split_handler(_video_event(key, src.stat().st_size), Context())["results"][0]
    assert again["status"] == RUNNING and again["target"] == "gpu" and jobs.get(job_id)["updated"] == job["updated"]

    # the endpoint's success notification (SNS) marks it done with the GPU worker's outputs
    event = json.loads((ROOT / "events" / "sns_gpu_result.json").read_text().replace(
        "0123456789abcdef0123456789abcd01", job_id).replace("faceflow-output-123456789012", OUTPUT_BUCKET))
    assert app.gpu_result_handler(event, Context()) == {"results": [{"job_id": job_id, "status": "done"}]}
    job = jobs.get(job_id)
    assert job["status"] == "done" and job["backend"] == "gpu" and job["owner"] == "tester"
    assert job["outputs"] == {"video": f"s3://{OUTPUT_BUCKET}/results/{job_id}/keynote.mp4",
                              "report": f"s3://{OUTPUT_BUCKET}/results/{job_id}/keynote.mp4.json"}


def test_gpu_failure_notification_fails_the_job(app, rdb, aws_env):
    from functions.common.jobs import RUNNING, JobStore
    jobs = JobStore(rdb, 3600)
    job_id = "b1b2c3d4e5f60718293a4b5c6d7e8f90"
    jobs.put(job_id, RUNNING, owner="tester", stage="gpu")
    event = json.loads((ROOT / "events" / "sns_gpu_result.json").read_text())
    note = json.loads(event["Records"][0]["Sns"]["Message"])
    note.update(inferenceId=job_id, invocationStatus="Failed",
                failureReason='ClientError: Received client error (422) from primary with message '
                              '"{"status": "failed", "error": "input is not a video"}". See logs.')
    note.pop("responseBody"), note.pop("responseParameters")
    event["Records"][0]["Sns"]["Message"] = json.dumps(note)
    bogus = {"EventSource": "aws:sns", "Sns": {"Type": "Notification", "Message": json.dumps({"hello": 1})}}
    event["Records"].append(bogus)
    reply = app.gpu_result_handler(event, Context())
    assert reply == {"results": [{"job_id": job_id, "status": "failed"}, {"status": "ignored"}]}
    job = jobs.get(job_id)
    assert job["status"] == "failed" and job["error"] == "input is not a video" and job["backend"] == "gpu"


@pytest.mark.slow
@pytest.mark.data
def test_private_video_stays_on_lambda_and_is_split(app, s3, aws_env, rdb, gpu_routing):
    from functions.common.jobs import RUNNING, JobStore
    src = data_path(*CLIP)
    jobs = JobStore(rdb, 3600)
    job_id = "c1b2c3d4e5f60718293a4b5c6d7e8f90"
    key = f"uploads/{job_id}/private.mp4"
    s3.upload_file(str(src), INPUT_BUCKET, key, ExtraArgs={"Tagging": "faceflow-sensitivity=private"})
    reply = app.split_handler(_video_event(key, src.stat().st_size), Context())["results"][0]
    assert reply["status"] == RUNNING and reply["chunks"] >= 4 and "target" not in reply
    job = jobs.get(job_id)
    assert job["stage"] == "chunks" and job["route"] == "private-stays-on-lambda" and job["route_target"] == "lambda"
    assert "gpu_request" not in job
    assert not s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=f"results/_gpu/requests/{job_id}").get("KeyCount")
    assert s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=f"work/{job_id}/chunks/")["KeyCount"] == reply["chunks"]
    assert {m["job_id"] for m in _queued(gpu_routing, aws_env["FACEFLOW_CHUNK_QUEUE_URL"])} == {job_id}


@pytest.mark.data
def test_job_facts_from_tags_and_the_job_record(app, s3, aws_env, tmp_path):
    from faceflow.video import probe
    src = data_path(*CLIP)
    key = "uploads/facts/clip.mp4"
    s3.upload_file(str(src), INPUT_BUCKET, key,
                   ExtraArgs={"Tagging": "faceflow-priority=LOW&faceflow-sensitivity=standard"})
    upload = {"bucket": INPUT_BUCKET, "key": key, "version": ""}
    size = src.stat().st_size
    facts = app.job_facts(upload, src, size, None)
    info = probe(src)
    assert facts == {"operation": "anonymize", "media": "video", "size_bytes": size, "duration_s": info.duration,
                     "width": info.width, "height": info.height, "sensitivity": "standard", "priority": "low"}
    # private in either the tag or the job record wins; the API's "normal" is routing's "standard"
    assert app.job_facts(upload, src, size, {"sensitivity": "private"})["sensitivity"] == "private"
    s3.put_object_tagging(Bucket=INPUT_BUCKET, Key=key, Tagging={"TagSet": [{"Key": "faceflow-sensitivity", "Value": "secret"}]})
    facts = app.job_facts(upload, src, size, {"sensitivity": "normal", "priority": "high"})
    assert facts["priority"] == "high" and app.routing.route(facts).rule_name == "private-stays-on-lambda"
    s3.delete_object_tagging(Bucket=INPUT_BUCKET, Key=key)
    facts = app.job_facts(upload, src, size, {"sensitivity": "normal"})
    assert facts["sensitivity"] == "standard" and "priority" not in facts
    # an unreadable file: routed without its duration (the split refuses it afterwards)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    assert "duration_s" not in app.job_facts(upload, junk, 11, None)
