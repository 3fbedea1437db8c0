"""The real handlers (functions/stills, functions/api) under awslambdaric, through devstack's
Stack: moto_server (S3, SQS), redis-server, the Runtime API stand-ins, the S3 → SQS → stills
poller and the HTTP API stand-in are real processes; nothing is mocked. One stack for the
module (processes start once); the tests run in file order and the Redis outage test comes
last but one (it empties Redis), the log audit last (it reads everything the others logged).

Skips with the reason when moto, a Redis server or awslambdaric is missing (fails in CI).
"""
from __future__ import annotations

import json
import re
import time
import urllib.request
from urllib.parse import quote

import numpy as np
import pytest

from conftest import data_path, require_services, run_cli

require_services()

import cv2  # noqa: E402

import devstack  # noqa: E402
from devstack import Stack  # noqa: E402
from stack_client import job_record as get_job, wait_for_job  # noqa: E402

MAX_UPLOAD = 400_000  # FACEFLOW_MAX_UPLOAD_BYTES of the stack's functions: small, to test the limit
JOB_KEYS = "faceflow:job:*"


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    env = {"FACEFLOW_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "FACEFLOW_MODEL_DIR": str(model_dir)}
    with Stack(functions=("stills", "api"), function_env=env,
               workdir=tmp_path_factory.mktemp("functions-stack")) as running:
        # Versions count the writes: a repeated delivery must not add one.
        running.s3.put_bucket_versioning(Bucket=running.output_bucket,
                                         VersioningConfiguration={"Status": "Enabled"})
        yield running


@pytest.fixture(scope="module")
def redis_client(stack):
    import redis
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(scope="module")
def jpeg(astronaut_bgr) -> bytes:
    ok, buf = cv2.imencode(".jpg", astronaut_bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


# -- helpers --------------------------------------------------------------------------------------

def upload(stack, key: str, body: bytes, content_type: str = "image/jpeg") -> None:
    stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=body, ContentType=content_type)


def delivered(stack, key: str, outcome: str | None = "ok", count: int = 1, timeout: float = 60.0):
    """The poller's deliveries of `key` (waiting for `count` with `outcome`)."""
    return stack.wait_for_deliveries(count, key=key, outcome=outcome, timeout=timeout)


def only_result(delivery) -> dict:
    assert delivery.result.ok, delivery.result.error
    results = delivery.result.payload["results"]
    assert len(results) == 1, results
    return results[0]


def output_versions(stack, prefix: str) -> dict[str, int]:
    """Versions per key under `prefix` in the (versioned) output bucket: writes per key."""
    listing = stack.s3.list_object_versions(Bucket=stack.output_bucket, Prefix=prefix)
    counts: dict[str, int] = {}
    for version in listing.get("Versions", []):
        counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def output_keys(stack, prefix: str = "") -> list[str]:
    listing = stack.s3.list_objects_v2(Bucket=stack.output_bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def wait_job(stack, job_id: str, statuses=("done", "failed"), timeout: float = 60.0) -> dict:
    return wait_for_job(stack, job_id, timeout=timeout, until=statuses)


def metric_total(stack, function: str, name: str) -> float:
    return sum(sum(doc[name]) if isinstance(doc[name], list) else doc[name]
               for doc in stack.metrics(function) if name in doc)


def log_lines(stack, function: str, **match) -> list[dict]:
    return [r for r in stack.log_json(function) if "_aws" not in r
            and all(r.get(k) == v for k, v in match.items())]


def http(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read()


def decode(data: bytes) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert pixels is not None, "does not decode"
    return pixels


def face_diff(original: np.ndarray, anonymised: np.ndarray, boxes: list) -> tuple[float, float]:
    """Mean absolute difference inside the face boxes, and away from them (outside the boxes
    grown 2x about their centres, which the masks' margins stay within)."""
    inside = np.zeros(original.shape[:2], bool)
    near = np.zeros(original.shape[:2], bool)
    for x, y, w, h in boxes:
        inside[int(y):int(y + h), int(x):int(x + w)] = True
        near[max(0, int(y - h / 2)):int(y + 1.5 * h), max(0, int(x - w / 2)):int(x + 1.5 * w)] = True
    diff = np.abs(original.astype(np.int16) - anonymised.astype(np.int16)).mean(axis=2)
    return float(diff[inside].mean()), float(diff[~near].mean())


# -- 1. end to end ---------------------------------------------------------------------------------

def test_s3_upload_is_anonymised_into_the_output_bucket(stack, jpeg, astronaut_bgr):
    # '+' and ' ' in the name: S3 events URL-encode keys ('%2B', '+'), decoded exactly once
    key = "uploads/tenant-a/party 2026+1.jpg"
    upload(stack, key, jpeg)
    delivery = delivered(stack, key)[0]
    result = only_result(delivery)
    assert result["status"] == "done", result
    job_id = result["job_id"]
    prefix = f"results/{job_id}/"
    assert output_keys(stack, prefix) == [prefix + "party 2026+1.jpg", prefix + "party 2026+1.jpg.json"]
    assert result["outputs"] == {"image": f"s3://{stack.output_bucket}/{prefix}party 2026+1.jpg",
                                 "report": f"s3://{stack.output_bucket}/{prefix}party 2026+1.jpg.json"}

    image = stack.s3.get_object(Bucket=stack.output_bucket, Key=prefix + "party 2026+1.jpg")
    assert image["ContentType"] == "image/jpeg"
    out = decode(image["Body"].read())
    assert out.shape == astronaut_bgr.shape

    report = json.loads(stack.s3.get_object(Bucket=stack.output_bucket, Key=prefix + "party 2026+1.jpg.json")
                        ["Body"].read())
    assert report["job_id"] == job_id and report["format"] == "JPEG"
    assert (report["width"], report["height"]) == (512, 512)
    assert len(report["faces"]) == 1, report["faces"]  # the astronaut
    face = report["faces"][0]
    x, y, w, h = face["box"]
    assert 150 <= x + w / 2 <= 260 and 50 <= y + h / 2 <= 170 and 60 <= w <= 200, face
    assert face["score"] > 0.5

    inside, outside = face_diff(decode(jpeg), out, [face["box"]])
    assert inside > 15, f"face barely changed (mean |diff| {inside:.1f})"
    assert outside < 2, f"outside the face the image changed too much (mean |diff| {outside:.1f})"

    job = get_job(stack, job_id)
    assert job["status"] == "done" and job["faces"] == 1 and job["error"] is None
    assert job["outputs"] == result["outputs"]

    # its log line carries S3's request id of the upload (the event's x-amz-request-id)
    lines = log_lines(stack, "stills", message="job done", job_id=job_id)
    assert [line["correlation_id"] for line in lines] == [
        delivery.event["Records"][0]["responseElements"]["x-amz-request-id"]]


# -- 2. at-least-once delivery -------------------------------------------------------------------

def test_the_same_event_twice_writes_once_and_returns_the_first_result(stack, jpeg, redis_client):
    jobs_before = set(redis_client.keys(JOB_KEYS))
    key = "uploads/tenant-a/twice.jpg"
    upload(stack, key, jpeg)
    first = delivered(stack, key)[0]
    result = only_result(first)
    job_id = result["job_id"]
    prefix = f"results/{job_id}/"
    writes = output_versions(stack, prefix)
    assert writes == {prefix + "twice.jpg": 1, prefix + "twice.jpg.json": 1}
    head = stack.s3.head_object(Bucket=stack.output_bucket, Key=prefix + "twice.jpg")

    again = stack.invoke_stills(first.event)  # S3 delivers the same event again
    assert again.ok, again.error
    assert again.payload == first.result.payload  # Powertools idempotency: the first result

    assert output_versions(stack, prefix) == writes  # no second write
    later = stack.s3.head_object(Bucket=stack.output_bucket, Key=prefix + "twice.jpg")
    assert (later["VersionId"], later["LastModified"]) == (head["VersionId"], head["LastModified"])
    assert set(redis_client.keys(JOB_KEYS)) - jobs_before == {f"faceflow:job:{{{job_id}}}"}  # one job
    assert len(log_lines(stack, "stills", message="job done", job_id=job_id)) == 1  # processed once


def test_output_bucket_and_other_prefixes_trigger_nothing(stack, jpeg):
    before = len(stack.deliveries)
    versions_before = output_versions(stack, "results/")
    stack.s3.put_object(Bucket=stack.output_bucket, Key="results/by-hand/loop.jpg", Body=jpeg,
                        ContentType="image/jpeg")
    upload(stack, "elsewhere/not-uploads.jpg", jpeg)      # input bucket, outside uploads/
    upload(stack, "uploads/tenant-a/notes.txt", b"hello", "text/plain")  # not an image suffix
    time.sleep(3)  # longer than a poll, a visibility timeout and a function run
    assert stack.deliveries[before:] == []
    assert stack.queue_depth() == 0

    # Should the output bucket ever be wired to the function, the handler refuses its events.
    result = stack.invoke_stills(stack.s3_event("results/by-hand/loop.jpg", bucket=stack.output_bucket))
    assert result.ok and result.payload == {"results": [{"status": "ignored"}]}
    assert output_versions(stack, "results/") == {**versions_before, "results/by-hand/loop.jpg": 1}


# -- 3. through the HTTP API -----------------------------------------------------------------------

def test_api_job_with_presigned_upload_and_download(stack, jpeg, astronaut_bgr):
    status, headers, body = stack.request("POST", "/v1/jobs", body={"filename": "team photo.jpg"})
    assert status == 201, body
    created = json.loads(body)
    job_id, up = created["job_id"], created["upload"]
    assert re.fullmatch(r"[0-9a-f]{32}", job_id) and created["status"] == "queued"
    assert up["method"] == "PUT" and up["headers"] == {"Content-Type": "image/jpeg"}
    assert get_job(stack, job_id)["status"] == "queued"

    # a plain HTTP client, as a browser or curl would upload
    status, _ = http("PUT", up["url"], data=jpeg, headers=up["headers"])
    assert status == 200
    job = wait_job(stack, job_id)
    assert job["status"] == "done", job
    assert job["faces"] == 1

    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200, body
    links = json.loads(body)
    status, image = http("GET", links["image_url"])
    assert status == 200
    out = decode(image)
    assert out.shape == astronaut_bgr.shape
    status, report = http("GET", links["report_url"])
    report = json.loads(report)
    assert report["job_id"] == job_id and report["source"] == "team photo.jpg"
    assert len(report["faces"]) == 1
    inside, _ = face_diff(decode(jpeg), out, [report["faces"][0]["box"]])
    assert inside > 15

    # unknown and malformed ids are 404s; a result before it is done is a 409
    assert stack.request("GET", "/v1/jobs/" + "0" * 32)[0] == 404
    assert stack.request("GET", "/v1/jobs/..%2Fx")[0] == 404
    pending = json.loads(stack.request("POST", "/v1/jobs", body={"filename": "later.png"})[2])
    assert pending["upload"]["headers"] == {"Content-Type": "image/png"}
    assert stack.request("GET", f"/v1/jobs/{pending['job_id']}/result")[0] == 409


@pytest.mark.parametrize("picture", ["astronaut", "faces_gt"])
def test_sync_analyze_matches_the_cli(stack, jpeg, picture, tmp_path):
    if picture == "astronaut":
        path = tmp_path / "astronaut.jpg"
        path.write_bytes(jpeg)
    else:
        path = data_path("faces_gt", "2007_007763.jpg")  # 7 faces
    status, headers, body = stack.request("POST", "/v1/analyze", body=path.read_bytes(),
                                          headers={"Content-Type": "image/jpeg"})
    assert status == 200, body
    api_faces = json.loads(body)["faces"]

    cli = run_cli("analyze", path)
    assert cli.returncode == 0, cli.stderr
    lines = [json.loads(line) for line in cli.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    cli_faces = lines[0]["faces"]

    assert len(api_faces) == len(cli_faces) >= 1
    for a, c in zip(sorted(api_faces, key=lambda f: f["box"]), sorted(cli_faces, key=lambda f: f["box"])):
        assert np.allclose(a["box"], c["box"], atol=1.0), (a["box"], c["box"])


def test_upload_content_types_agree_with_the_engine_and_the_trigger(stack):
    from faceflow.images import EXTENSION_FORMAT
    from functions.common.settings import UPLOAD_CONTENT_TYPES
    assert set(UPLOAD_CONTENT_TYPES) == set(EXTENSION_FORMAT)
    assert all(t == f"image/{EXTENSION_FORMAT[s].lower()}" for s, t in UPLOAD_CONTENT_TYPES.items() if s != ".heic")
    assert UPLOAD_CONTENT_TYPES[".heic"] == "image/heic"
    suffixes = {f.get("suffix") for f in stack.s3_filters}
    assert suffixes == set(UPLOAD_CONTENT_TYPES) | {s.upper() for s in UPLOAD_CONTENT_TYPES}


def test_tracing_is_on_in_lambda_and_skips_the_xray_import_when_disabled():
    """make_tracer: the X-Ray Tracer in Lambda (Tracing: Active); with POWERTOOLS_TRACE_DISABLED
    (devstack) a no-op provider, and aws_xray_sdk.core (about 170 ms of init) is not imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from functions.common.aws import make_tracer; t = make_tracer('faceflow-x');\n"
            "@t.capture_method\ndef f(): return 1\n"
            "print(type(t.provider).__name__, t.disabled, 'aws_xray_sdk.core' in sys.modules, f())")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POWERTOOLS_", "AWS_", "LAMBDA_"))}
    base["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "shared")])

    def run(**env) -> str:
        done = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    in_lambda = {"LAMBDA_TASK_ROOT": str(root), "AWS_LAMBDA_FUNCTION_NAME": "faceflow-x",
                 "AWS_REGION": "us-east-1", "AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR"}
    assert run(**in_lambda) == ["AsyncAWSXRayRecorder", "False", "True", "1"]
    assert run(**in_lambda, POWERTOOLS_TRACE_DISABLED="true") == ["_NoTracing", "True", "False", "1"]


# -- 4. bad uploads --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, expected", [("truncated", "truncated JPEG"), ("text", "not an image")])
def test_corrupt_upload_fails_the_job_with_a_metric_and_no_output(stack, jpeg, kind, expected):
    body = jpeg[: len(jpeg) // 2] if kind == "truncated" else b"this is a text file, not a photo\n" * 20
    key = f"uploads/tenant-a/{kind}.jpg"
    failed_before = metric_total(stack, "stills", "JobsFailed")
    upload(stack, key, body)
    result = only_result(delivered(stack, key)[0])  # the invocation succeeds: no retry for bad input
    assert result["status"] == "failed" and expected in result["error"], result
    job = get_job(stack, result["job_id"])
    assert job["status"] == "failed" and expected in job["error"], job
    assert metric_total(stack, "stills", "JobsFailed") == failed_before + 1
    assert output_keys(stack, f"results/{result['job_id']}/") == []
    refused = log_lines(stack, "stills", message="upload refused", job_id=result["job_id"])
    assert len(refused) == 1 and refused[0]["level"] == "WARNING"


def moto_requests(stack, method: str, key: str) -> list[str]:
    """moto's access-log lines for `method` on the input bucket's `key`."""
    path = f"/{stack.input_bucket}/{quote(key)}"
    return [line for line in stack.log_text("moto").splitlines() if f'"{method} {path}' in line]


def big_jpeg() -> bytes:
    noise = np.random.default_rng(7).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    assert len(data) > MAX_UPLOAD
    return data


def test_oversized_upload_is_refused_before_it_is_read(stack):
    data = big_jpeg()
    key = "uploads/tenant-a/huge.jpg"
    upload(stack, key, data)
    result = only_result(delivered(stack, key)[0])
    message = f"upload too large: {len(data)} bytes (limit {MAX_UPLOAD})"
    assert result == {"job_id": result["job_id"], "status": "failed", "error": message}
    assert get_job(stack, result["job_id"])["error"] == message
    assert output_keys(stack, f"results/{result['job_id']}/") == []
    # refused on the event's size: the object was never fetched
    assert moto_requests(stack, "PUT", key) and not moto_requests(stack, "GET", key)

    # An event without a size (hand-made, or a future event type): a HEAD, still no GET.
    key = "uploads/tenant-a/huge-unsized.jpg"
    stack.pause_poller()
    try:
        etag = stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=data, ContentType="image/jpeg")["ETag"]
        event = devstack.s3_event(stack.input_bucket, key, size=len(data), etag=etag)
        del event["Records"][0]["s3"]["object"]["size"]
        assert not moto_requests(stack, "HEAD", key)
        invoked = stack.invoke_stills(event)
    finally:
        stack.resume_poller()
    assert invoked.ok, invoked.error
    assert invoked.payload["results"][0]["error"] == message
    assert len(moto_requests(stack, "HEAD", key)) == 1 and not moto_requests(stack, "GET", key)
    # the queued notification of that upload is the same upload: answered from the record
    assert only_result(delivered(stack, key)[0]) == invoked.payload["results"][0]
    assert not moto_requests(stack, "GET", key)


# -- 5. Redis down ---------------------------------------------------------------------------------

def test_redis_down_fails_the_invocation_and_the_retry_succeeds(stack, jpeg):
    key = "uploads/tenant-a/while-redis-is-down.jpg"
    before = output_keys(stack)
    stack.kill_redis()
    try:
        upload(stack, key, jpeg)
        failed = delivered(stack, key, outcome="error", timeout=30)[0]
    finally:
        stack.start_redis()
    assert not failed.result.ok
    assert "Idempotency" in failed.result.error_type, failed.result.error  # loud: Lambda retries
    errors = log_lines(stack, "stills", level="ERROR", function_request_id=failed.result.request_id)
    assert len(errors) == 1 and "IdempotencyPersistenceLayerError" in errors[0]["exception"]
    assert errors[0]["correlation_id"] == failed.event["Records"][0]["responseElements"]["x-amz-request-id"]
    assert output_keys(stack) == before  # nothing written without the idempotency record

    retried = delivered(stack, key, outcome="ok", timeout=30)[0]  # the queue's redelivery
    assert retried.receive_count >= 2
    result = only_result(retried)
    assert result["status"] == "done"
    assert len(output_keys(stack, f"results/{result['job_id']}/")) == 2
    assert get_job(stack, result["job_id"])["status"] == "done"
    assert stack.queue_depth(dlq=True) == 0


# -- 6. logs ----------------------------------------------------------------------------------------

BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{120,}")


def test_logs_hold_no_pixels_faces_or_object_keys_and_carry_a_correlation_id(stack):
    stills = stack.log_text("stills")
    records = log_lines(stack, "stills")
    assert records, "the stills function logged nothing"
    for text in (stills, stack.log_text("api")):
        assert not BASE64_RUN.search(text), "a long base64 run in the logs"
        assert "uploads/" not in text and "results/" not in text, "object keys in the logs"
        assert "tenant-a" not in text and "party 2026" not in text
        assert '"box"' not in text and '"landmarks"' not in text, "face boxes in the logs"
    for record in records:
        faces = record.get("faces")
        assert faces is None or isinstance(faces, int), record  # counts only
    done = [r for r in records if r["message"] == "job done"]
    refused = [r for r in records if r["message"] == "upload refused"]
    assert done and refused
    for record in done + refused:
        assert re.fullmatch(r"[0-9A-F]{16}", record.get("correlation_id") or ""), record
        assert re.fullmatch(r"[0-9a-f]{32}", record["job_id"]), record
        assert record["function_request_id"]


# -- videos through the API --------------------------------------------------------------------------

def counts(progress: dict) -> dict:
    """A job's progress without the frame counts a chunked job leaves null (faceflow serve's
    one-chunk jobs fill them)."""
    return {k: v for k, v in progress.items() if v is not None}


def test_api_video_job_progress_route_and_recorded_outputs(stack, redis_client):
    """POST /v1/jobs takes a video (and the routing's sensitivity and priority); GET shows the
    video handlers' stage, route and chunk progress; the result links come from the record's
    outputs (a video's result is named apart from its upload)."""
    status, _, body = stack.request("POST", "/v1/jobs", body={"filename": "keynote.mp4", "sensitivity": "private",
                                                              "priority": "low"})
    assert status == 201, body
    created = json.loads(body)
    job_id, up = created["job_id"], created["upload"]
    assert up["headers"] == {"Content-Type": "video/mp4"} and up["url"].startswith("http")
    assert f"uploads/{job_id}/keynote.mp4" in urllib.parse.unquote(up["url"])
    key = f"faceflow:job:{{{job_id}}}"
    record = redis_client.hgetall(key)
    assert record["sensitivity"] == "private" and record["priority"] == "low" and record["media"] == "video"
    assert stack.request("POST", "/v1/jobs", body={"filename": "x.mp4", "sensitivity": "secret"})[0] == 400

    # as the split function and the chunk workers leave it (functions/common/sessions.py)
    redis_client.hset(key, mapping={"status": "running", "stage": "chunks", "route": "default",
                                    "chunks_done": "3", "chunks_total": "7",
                                    "progress": json.dumps({"chunks_done": 3, "chunks_total": 7})})
    job = get_job(stack, job_id)
    assert job["status"] == "running" and job["stage"] == "chunks" and job["route"] == "default"
    assert counts(job["progress"]) == {"chunks_done": 3, "chunks_total": 7}
    redis_client.hdel(key, "progress")                  # the counters alone are enough
    assert counts(get_job(stack, job_id)["progress"]) == {"chunks_done": 3, "chunks_total": 7}

    out = f"results/{job_id}/keynote.mp4"
    stack.s3.put_object(Bucket=stack.output_bucket, Key=out, Body=b"video bytes")
    stack.s3.put_object(Bucket=stack.output_bucket, Key=out + ".json", Body=b"{}")
    outputs = {"video": f"s3://{stack.output_bucket}/{out}", "report": f"s3://{stack.output_bucket}/{out}.json"}
    redis_client.hset(key, mapping={"status": "done", "stage": "merged", "outputs": json.dumps(outputs)})
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200, body
    links = json.loads(body)
    assert links.get("image_url") is None
    assert http("GET", links["video_url"]) == (200, b"video bytes")
    assert http("GET", links["report_url"]) == (200, b"{}")
