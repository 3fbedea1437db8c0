"""Failed work becomes a failed job with a reason a client can act on
(functions/common/failures.py, functions/failures/app.py, JobStore.fail_unless_finished).

The reasons are pure functions of the records Lambda and SQS deliver (events/*.json are real
shaped samples); the handler runs in-process against a real Redis server (conftest's devstack
fixture). The whole path through the local stack is in tests/test_stack.py."""
from __future__ import annotations

import copy
import json
import sys

import pytest

pytest.importorskip("aws_lambda_powertools", reason="Powertools not installed: pip install -e '.[functions]'")

from conftest import ROOT  # noqa: E402

from functions.common import failures  # noqa: E402
from functions.common.jobs import DONE, FAILED, RUNNING, JobStore  # noqa: E402

EVENTS = ROOT / "events"
JOB = "4f9c2a7e1b3d4c5a8e6f7a9b0c1d2e3f"  # the job id in events/video_upload.json's key


def destination_record(**error) -> dict:
    sample = json.loads((EVENTS / "failure_destination_sqs.json").read_text())
    record = json.loads(sample["Records"][0]["body"])
    if error:
        record["responsePayload"] = error
    return record


@pytest.mark.parametrize("error,expected", [
    ({"errorType": "Sandbox.Timedout", "errorMessage": "2026-11-23T10:17:39.101Z id Task timed out after 900.00 seconds"},
     "timed out after 900 s; retry with a smaller photo or a shorter video, or raise the function timeout"),
    ({"errorMessage": "2026-11-23T10:17:39.101Z id Task timed out after 2.50 seconds"}, "timed out after 2.5 s"),
    ({"errorType": "Runtime.ExitError", "errorMessage": "RequestId: x Error: Runtime exited with error: signal: killed"},
     "ran out of memory (the function was stopped); retry with a smaller photo or a shorter video, or raise the "
     "function memory"),
    ({"errorType": "Runtime.ExitError", "errorMessage": "Runtime exited with error: exit status 3"},
     "the function crashed (Runtime exited with error: exit status 3); upload it again later"),
    ({"errorType": "ConnectionError", "errorMessage": "Error 111 connecting to redis:6379"},
     "internal error (ConnectionError: Error 111 connecting to redis:6379); upload it again later; if it fails "
     "again, report the job id"),
    (None, "internal error (no error reported)"),
])
def test_the_last_error_becomes_an_actionable_reason(error, expected):
    assert expected in failures.cause(error)


def test_a_destination_record_fails_the_job_of_its_upload():
    record = destination_record()
    assert failures.classify(record) == "async"
    found, = failures.from_destination_record(record)
    assert found.job_id == JOB and found.kind == "async"
    assert found.reason == ("processing failed after 3 attempts: timed out after 900 s; retry with a smaller photo "
                            "or a shorter video, or raise the function timeout")
    assert found.detail == {"function": "faceflow-split"}
    expired = copy.deepcopy(record)
    expired["requestContext"]["condition"] = "EventAgeExceeded"
    assert "event expired" in failures.from_destination_record(expired)[0].reason


def test_an_upload_without_an_api_job_gets_the_id_the_function_gave_it():
    from functions.common.aws import job_for_key, object_identity
    record = destination_record()
    obj = record["requestPayload"]["Records"][0]["s3"]["object"]
    obj["key"] = "uploads/dropped/a+b.mp4"
    upload = object_identity("b", obj["key"], obj.get("versionId"), obj.get("eTag"))
    record["requestPayload"]["Records"][0]["s3"]["bucket"]["name"] = "b"
    assert failures.from_destination_record(record)[0].job_id == job_for_key("b", "uploads/dropped/a b.mp4",
                                                                             upload["version"])[0]


def test_a_dead_lettered_chunk_names_the_chunk_or_the_merge():
    message = json.loads(json.loads((EVENTS / "chunk_dead_letter_sqs.json").read_text())["Records"][0]["body"])
    assert failures.classify(message) == "chunk"
    chunk = failures.from_chunk_message(message, {"chunks_total": 7, "chunks_done": 2, "merged": False})
    assert (chunk.kind, chunk.job_id) == ("chunk", JOB)
    assert chunk.reason.startswith("chunk 4 of 7 failed on every attempt") and "shorter video" in chunk.reason
    merge = failures.from_chunk_message(message, {"chunks_total": 7, "chunks_done": 7, "merged": False})
    assert merge.kind == "merge" and merge.reason.startswith("merging the processed chunks failed on every attempt")
    unknown = failures.from_chunk_message(message, None)  # Redis forgot the job: still named
    assert unknown.reason.startswith("chunk 4 failed on every attempt")


def test_records_that_are_not_ours_are_recognised():
    for body in (None, "text", [], {}, {"job_id": "../x", "index": 1}, {"job_id": JOB, "index": -1},
                 {"Records": []}):
        assert failures.classify(body) == ""
    session = json.loads((EVENTS / "session_chunk.json").read_text())
    assert failures.classify(session) == "session-chunk"
    skipped, = failures.from_session_chunk(session)
    assert skipped.job_id is None and skipped.detail == {"session_id": "cam-entrance-01", "seq": 3}
    session["Records"][0]["s3"]["object"]["key"] = "sessions/../3.mp4"
    assert failures.from_session_chunk(session) == []


@pytest.fixture()
def jobs(redis_server):
    import redis
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield JobStore(client, ttl_s=60)
    client.close()


def test_a_failure_never_overwrites_a_result_or_the_jobs_own_refusal(jobs):
    jobs.put("a" * 32, RUNNING, stage="chunks")
    assert jobs.fail_unless_finished("a" * 32, "chunk 2 failed", stage="chunk") is None
    failed = jobs.get("a" * 32)
    assert (failed["status"], failed["error"], failed["stage"]) == (FAILED, "chunk 2 failed", "chunk")
    assert 0 < jobs.client.ttl(jobs._key("a" * 32)) <= 60
    assert jobs.fail_unless_finished("a" * 32, "a later chunk failed") == FAILED
    assert jobs.get("a" * 32)["error"] == "chunk 2 failed"
    jobs.put("b" * 32, DONE, outputs={"video": "s3://o/results/b.mp4"})
    assert jobs.fail_unless_finished("b" * 32, "late duplicate failed") == DONE
    assert jobs.get("b" * 32)["status"] == DONE and "error" not in jobs.get("b" * 32)
    assert jobs.fail_unless_finished("c" * 32, "split failed") is None  # no record yet: one is made
    assert jobs.get("c" * 32)["status"] == FAILED and jobs.get("c" * 32)["created"] > 0


def test_the_handler_marks_jobs_and_reports_unrecordable_records(redis_server, monkeypatch):
    """The handler as Lambda runs it, with the sample events, against a real Redis."""
    import importlib

    import redis
    for name, value in {"FACEFLOW_INPUT_BUCKET": "faceflow-input-123456789012",
                        "FACEFLOW_OUTPUT_BUCKET": "faceflow-output", "FACEFLOW_REDIS_URL": redis_server.url,
                        "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_METRICS_NAMESPACE": "faceflow",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop("functions.failures.app", None)
    app = importlib.import_module("functions.failures.app")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    store = JobStore(client, ttl_s=60)
    store.put(JOB, RUNNING, stage="split")

    class Context:
        function_name, memory_limit_in_mb, aws_request_id = "faceflow-failures", 512, "req-1"
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:faceflow-failures"

    event = json.loads((EVENTS / "failure_destination_sqs.json").read_text())
    garbage = {**event["Records"][0], "messageId": "garbage", "body": "{\"not\": \"ours\"}"}
    event["Records"].append(garbage)
    assert app.handler(event, Context()) == {"batchItemFailures": []}  # garbage is dropped, not retried
    job = store.get(JOB)
    assert job["status"] == FAILED and job["error"].startswith("processing failed after 3 attempts: timed out")
    redis_server.stop()  # the job cannot be recorded: the record comes back later
    try:
        reply = app.handler(json.loads((EVENTS / "chunk_dead_letter_sqs.json").read_text()), Context())
        assert reply == {"batchItemFailures": [{"itemIdentifier": "c4a7e2b9-1d3f-4e5a-8b6c-7d8e9f0a1b2c"}]}
    finally:
        redis_server.start()
    client.close()


def _sqs_event(body: dict, message_id: str = "m-1") -> dict:
    return {"Records": [{"messageId": message_id, "receiptHandle": "r", "body": json.dumps(body),
                         "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
                         "md5OfBody": "", "eventSource": "aws:sqs", "awsRegion": "us-east-1",
                         "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:faceflow-session-chunk-dlq"}]}


def _session_note(key: str) -> dict:
    note = json.loads((EVENTS / "session_chunk.json").read_text())
    note["Records"][0]["s3"]["object"]["key"] = key
    return note


def test_a_dead_lettered_session_chunk_is_skipped_so_the_session_goes_on(redis_server, moto_url, monkeypatch):
    """Before, a session chunk that failed on every receive left the session waiting for it
    forever (every later chunk NOT_YET). Now the failure function commits it as failed, with
    the state before it, and the next chunk runs from that state."""
    import importlib

    import boto3
    import redis

    from functions.common.sessions import DUPLICATE, NOT_YET, PROCESS, S3Checkpoints, SessionStore
    env = {"FACEFLOW_INPUT_BUCKET": "in", "FACEFLOW_OUTPUT_BUCKET": "out", "FACEFLOW_REDIS_URL": redis_server.url,
           "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_METRICS_NAMESPACE": "faceflow",
           "AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="out")
    sys.modules.pop("functions.failures.app", None)
    app = importlib.import_module("functions.failures.app")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    store = SessionStore(client, 3600, S3Checkpoints(s3, "out"))
    first = store.claim("cam-1", 0, 5000)
    store.commit(first, {"frame": 10}, {"status": "done"})
    assert store.claim("cam-1", 2, 5000).status == NOT_YET     # waits for chunk 1

    class Context:
        function_name, memory_limit_in_mb, aws_request_id = "faceflow-failures", 512, "req-2"
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:faceflow-failures"

    dead = _sqs_event(_session_note("sessions/cam-1/1.mp4"))
    assert app.handler(dead, Context()) == {"batchItemFailures": []}
    skipped = store.claim("cam-1", 1, 5000)
    assert skipped.status == DUPLICATE and skipped.result["status"] == "failed"
    assert "skipped" in skipped.result["error"] and (skipped.result["session_id"], skipped.result["seq"]) == ("cam-1", 1)
    after = store.claim("cam-1", 2, 5000)
    assert after.status == PROCESS and after.state == {"frame": 10}  # the state before the skipped chunk
    store.release(after)
    assert S3Checkpoints(s3, "out").load("cam-1", 1)["result"]["status"] == "failed"
    # the same record again changes nothing; a chunk whose predecessors are not settled yet comes
    # back later (dropped, its seq would be missing when the session reaches it)
    assert app.handler(dead, Context()) == {"batchItemFailures": []}
    early = app.handler(_sqs_event(_session_note("sessions/cam-1/7.mp4"), "m-early"), Context())
    assert early == {"batchItemFailures": [{"itemIdentifier": "m-early"}]}
    assert store.get("cam-1")["next_seq"] == 2
    # a chunk a worker holds right now: the record comes back later
    held = store.claim("cam-1", 2, 60_000)
    busy = app.handler(_sqs_event(_session_note("sessions/cam-1/2.mp4"), "m-busy"), Context())
    assert busy == {"batchItemFailures": [{"itemIdentifier": "m-busy"}]}
    store.release(held)
    client.close()
