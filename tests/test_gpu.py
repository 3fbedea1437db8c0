"""The GPU worker (functions/gpu/server.py) and its Lambda side (functions/common/gpu.py).

The worker runs as a real process (on CPU: there is no GPU here) against a real moto_server,
moto from conftest's devstack fixture, the worker started here on a free port; the Lambda side submits to moto's sagemaker-runtime. Provider
choice, job parsing and notification parsing are tested as pure functions, and the worker's
Dockerfile is checked without Docker (COPY sources, build context, the entrypoint imports).

Skips with the reason when moto_server is missing (fails in CI: see conftest)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3", reason="boto3 not installed: pip install -e '.[functions]'")
pytest.importorskip("aws_lambda_powertools", reason="Powertools not installed: pip install -e '.[functions]'")

from conftest import ROOT, data_path  # noqa: E402
from devstack.procs import free_port  # noqa: E402

from functions.common import gpu  # noqa: E402
from functions.gpu import server  # noqa: E402
from functions.gpu.server import CPU, CUDA, TENSORRT, JobError, choose_providers, parse_job  # noqa: E402

REGION = "us-east-1"
INPUT_BUCKET, OUTPUT_BUCKET = "ff-gpu-input", "ff-gpu-output"
BATCH = 4
GPU_DIR = ROOT / "functions" / "gpu"
DOCKERFILE = GPU_DIR / "Dockerfile"
DOCKERIGNORE = GPU_DIR / "Dockerfile.dockerignore"
REQUIREMENTS = GPU_DIR / "requirements.txt"
FUNCTION_REQUIREMENTS = ROOT / "layers" / "requirements-function.txt"


# --- provider selection (pure) ------------------------------------------------------------------

@pytest.mark.parametrize("available,tensorrt,expected,warns", [
    ([TENSORRT, CUDA, CPU], True, [TENSORRT, CUDA, CPU], False),
    ([CPU, CUDA, TENSORRT], True, [TENSORRT, CUDA, CPU], False),          # our order, not theirs
    ([TENSORRT, CUDA, CPU], False, [CUDA, CPU], False),                   # FACEFLOW_GPU_TENSORRT=0
    ([CUDA, CPU], True, [CUDA, CPU], False),
    (["AzureExecutionProvider", CUDA, CPU], True, [CUDA, CPU], False),    # never Azure
    ([TENSORRT, CPU], True, [TENSORRT, CPU], False),
    (["AzureExecutionProvider", CPU], True, [CPU], True),                 # this machine
    ([CPU], True, [CPU], True),
    (["ROCMExecutionProvider", CPU], True, [CPU], True),
    ([], True, [CPU], True),
])
def test_provider_selection(available, tensorrt, expected, warns):
    chosen, warning = choose_providers(available, tensorrt)
    assert chosen == expected
    assert (warning is not None) == warns
    if warns:
        assert "running on CPU" in warning


def test_provider_selection_names_an_unused_gpu_provider():
    _, warning = choose_providers(["ROCMExecutionProvider", CPU])
    assert "ROCMExecutionProvider" in warning


def test_config_from_environment(monkeypatch):
    for name in ("FACEFLOW_GPU_PORT", "SAGEMAKER_BIND_TO_PORT", "FACEFLOW_GPU_BATCH", "FACEFLOW_GPU_TENSORRT"):
        monkeypatch.delenv(name, raising=False)
    config = server.Config.from_env()
    assert (config.port, config.batch, config.tensorrt, config.host) == (8080, 16, True, "0.0.0.0")
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9090")
    monkeypatch.setenv("FACEFLOW_GPU_BATCH", "32")
    monkeypatch.setenv("FACEFLOW_GPU_TENSORRT", "0")
    config = server.Config.from_env()
    assert (config.port, config.batch, config.tensorrt) == (9090, 32, False)
    monkeypatch.setenv("FACEFLOW_GPU_PORT", "7070")
    assert server.Config.from_env().port == 7070
    monkeypatch.setenv("FACEFLOW_GPU_BATCH", "0")
    with pytest.raises(SystemExit, match="FACEFLOW_GPU_BATCH=0: must be at least 1"):
        server.Config.from_env()


# --- job descriptors (pure) ---------------------------------------------------------------------

def descriptor(**overrides) -> dict:
    body = {"job_id": "j1", "operation": "anonymize", "input": "s3://in-b/uploads/j1/a.jpg",
            "output": "s3://out-b/results/j1/a.jpg"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def test_parse_job_defaults_the_report_beside_the_output():
    job = parse_job(json.dumps(descriptor()).encode())
    assert (job.input, job.output, job.report) == (("in-b", "uploads/j1/a.jpg"), ("out-b", "results/j1/a.jpg"),
                                                   ("out-b", "results/j1/a.jpg.json"))
    analyze = parse_job(json.dumps(descriptor(operation="analyze", output="s3://out-b/r.json")).encode())
    assert (analyze.output, analyze.report) == (None, ("out-b", "r.json"))


@pytest.mark.parametrize("body,message", [
    (b"{not json", "request body is not valid JSON"),
    (b"\xff\xfe", "request body is not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps(descriptor(job_id=None)).encode(), "job_id must be"),
    (json.dumps(descriptor(job_id="../etc")).encode(), "job_id must be"),
    (json.dumps(descriptor(operation="swap")).encode(), "a swap needs source"),
    (json.dumps(descriptor(operation="blur")).encode(), "operation 'blur' is not supported here"),
    (json.dumps(descriptor(input="https://example.com/a.jpg")).encode(), "input 'https://example.com/a.jpg' is not an s3"),
    (json.dumps(descriptor(input=None)).encode(), "input must be an s3://bucket/key"),
    (json.dumps(descriptor(output=None)).encode(), "output is required for anonymize"),
    (json.dumps(descriptor(output="s3://in-b/uploads/j1/a.jpg")).encode(), "must not overwrite the input"),
    (json.dumps(descriptor(report="s3://out-b/results/j1/a.jpg")).encode(), "must be different objects"),
    (json.dumps(descriptor(options={"colour": "red"})).encode(), r"unknown options \['colour'\]"),
    (json.dumps(descriptor(options={"batch": 0})).encode(), "option batch must be an integer from 1 to 256"),
    (json.dumps(descriptor(options={"verify": "yes"})).encode(), "option verify must be true or false"),
    (json.dumps(descriptor(options={"method": "smudge"})).encode(), "bad options: method must be one of"),
    (json.dumps(descriptor(options={"cells": 1})).encode(), "bad options: cells must be between"),
    (json.dumps({**descriptor(), "priority": "high"}).encode(), r"unknown fields \['priority'\]"),
])
def test_parse_job_refuses_bad_descriptors(body, message):
    with pytest.raises(JobError, match=message) as info:
        parse_job(body)
    assert info.value.status == 400


# --- servers ------------------------------------------------------------------------------------

def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def aws_env(moto_url) -> dict:
    return {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}


@pytest.fixture(scope="module")
def s3(aws_env):
    client = boto3.client("s3", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name=REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
        client.create_bucket(Bucket=bucket)
    return client


@pytest.fixture(scope="module")
def runtime(aws_env):
    return boto3.client("sagemaker-runtime", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


class Worker:
    def __init__(self, url: str, log: Path, proc: subprocess.Popen):
        self.url, self.log, self.proc = url, log, proc

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, str]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=300) as reply:
                status, raw = reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode()
        return status, json.loads(text), text

    def invoke(self, body: dict | bytes) -> tuple[int, dict, str]:
        return self.request("POST", "/invocations", body if isinstance(body, bytes) else json.dumps(body).encode())

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
        return records


@pytest.fixture(scope="module")
def worker(aws_env, s3, model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("gpu") / "worker.log"
    env = {**os.environ, **aws_env,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")]),
           "FACEFLOW_MODEL_DIR": str(model_dir), "FACEFLOW_GPU_BATCH": str(BATCH),
           "FACEFLOW_GPU_WORKERS": "2", "POWERTOOLS_LOG_LEVEL": "INFO",
           "FACEFLOW_GPU_GRPC_PORT": "0"}  # no stream service here (tests/test_stream_grpc.py has it)
    env.pop("FACEFLOW_GPU_PORT", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "functions.gpu.server", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    w = Worker(f"http://127.0.0.1:{port}", log, proc)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"the GPU worker exited: {log.read_text()[-3000:]}")
        try:
            return w.request("GET", "/ping")[0] == 200
        except (OSError, ValueError):
            return False
    _wait(ready, 180, "the GPU worker's /ping")
    yield w
    _stop(proc)


def _jpeg(bgr: np.ndarray) -> bytes:
    import cv2
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return data.tobytes()


def _video(path: Path, bgr: np.ndarray, frames: int = 12, fps: int = 12) -> Path:
    """A short H.264 clip of a (slightly moving) face: astronaut at 320 px."""
    import av
    import cv2
    small = cv2.resize(bgr, (320, 320), interpolation=cv2.INTER_AREA)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 320, "yuv420p"
        for i in range(frames):
            frame = np.roll(small, i * 2, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _count_frames(path: Path) -> int:
    import av
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def _get(s3, uri: str) -> bytes:
    bucket, key = gpu.split_s3_uri(uri)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _job() -> str:
    return uuid.uuid4().hex


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text and ".py\"" not in text, text


# --- the worker over HTTP -----------------------------------------------------------------------

def test_ping_answers_200_once_the_engine_is_loaded(worker):
    status, body, _ = worker.request("GET", "/ping")
    assert status == 200 and body == {"status": "ok", "providers": [CPU]}


def test_cpu_fallback_is_logged_as_a_warning(worker):
    warnings = [r for r in worker.log_records() if r.get("level") == "WARNING" and "running on CPU" in r["message"]]
    assert warnings, worker.log.read_text()[-2000:]
    assert warnings[0]["service"] == "faceflow-gpu"
    loaded = [r for r in worker.log_records() if r.get("message") == "engine loaded"]
    assert loaded and loaded[0]["providers"] == [CPU] and loaded[0]["batch"] == BATCH


def test_anonymize_a_photo_writes_output_and_report(worker, s3, astronaut_bgr, low_engine):
    job = _job()
    s3.put_object(Bucket=INPUT_BUCKET, Key=f"uploads/{job}/astronaut.jpg", Body=_jpeg(astronaut_bgr))
    status, result, _ = worker.invoke({"job_id": job, "operation": "anonymize",
                                       "input": f"s3://{INPUT_BUCKET}/uploads/{job}/astronaut.jpg",
                                       "output": f"s3://{OUTPUT_BUCKET}/results/{job}/astronaut.jpg"})
    assert status == 200, result
    assert result["status"] == "done" and result["job_id"] == job and result["media"] == "image"
    assert result["faces"] == 1 and result["frames"] == 1 and result["ms"] > 0
    assert result["output"] == f"s3://{OUTPUT_BUCKET}/results/{job}/astronaut.jpg"
    assert result["report"] == f"s3://{OUTPUT_BUCKET}/results/{job}/astronaut.jpg.json"
    from faceflow import images
    picture = images.decode(_get(s3, result["output"]))
    assert (picture.format, picture.width, picture.height) == ("JPEG", 512, 512)
    assert low_engine.detect(images.to_bgr8(picture.pixels)) == [], "a face is still detectable in the output"
    report = json.loads(_get(s3, result["report"]))
    assert report["job_id"] == job and report["operation"] == "anonymize" and len(report["faces"]) == 1
    assert report["source"] == f"s3://{INPUT_BUCKET}/uploads/{job}/astronaut.jpg"
    assert report["output"] == result["output"]


def test_analyze_a_photo_writes_only_the_report(worker, s3, astronaut_bgr):
    job = _job()
    s3.put_object(Bucket=INPUT_BUCKET, Key=f"uploads/{job}/photo", Body=_jpeg(astronaut_bgr))  # no extension
    status, result, _ = worker.invoke({"job_id": job, "operation": "analyze",
                                       "input": f"s3://{INPUT_BUCKET}/uploads/{job}/photo",
                                       "output": f"s3://{OUTPUT_BUCKET}/results/{job}/photo.json"})
    assert status == 200, result
    assert (result["output"], result["faces"], result["media"]) == (None, 1, "image")
    report = json.loads(_get(s3, result["report"]))
    assert report["operation"] == "analyze" and report["width"] == 512 and len(report["faces"]) == 1
    listed = s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=f"results/{job}/")["Contents"]
    assert [o["Key"] for o in listed] == [f"results/{job}/photo.json"]


def test_anonymize_a_video_in_batches(worker, s3, astronaut_bgr, tmp_path):
    job = _job()
    clip = _video(tmp_path / "clip.mp4", astronaut_bgr, frames=12)
    s3.upload_file(str(clip), INPUT_BUCKET, f"uploads/{job}/clip.mp4")
    status, result, _ = worker.invoke({"job_id": job, "operation": "anonymize",
                                       "input": f"s3://{INPUT_BUCKET}/uploads/{job}/clip.mp4",
                                       "output": f"s3://{OUTPUT_BUCKET}/results/{job}/clip.mp4"})
    assert status == 200, result
    assert result["media"] == "video" and result["frames"] == 12 and result["batch"] == BATCH
    assert result["faces"] >= 12, result  # one face in every frame
    out = tmp_path / "out.mp4"
    out.write_bytes(_get(s3, result["output"]))
    assert _count_frames(out) == 12
    report = json.loads(_get(s3, result["report"]))
    assert report["source"] == f"s3://{INPUT_BUCKET}/uploads/{job}/clip.mp4"
    assert len(report["frames"]) == 12 and all(len(f["faces"]) == 1 for f in report["frames"])
    summary = report["summary"]
    assert summary["job_id"] == job and summary["output"] == result["output"] and summary["batch"] == BATCH
    assert "/tmp" not in json.dumps(report), "local staging paths leaked into the report"


def test_video_options_batch_and_analyze(worker, s3, astronaut_bgr, tmp_path):
    job = _job()
    clip = _video(tmp_path / "clip.mp4", astronaut_bgr, frames=6)
    s3.upload_file(str(clip), INPUT_BUCKET, f"uploads/{job}/clip.bin")  # content decides: a video
    status, result, _ = worker.invoke({"job_id": job, "operation": "analyze", "options": {"batch": 3},
                                       "input": f"s3://{INPUT_BUCKET}/uploads/{job}/clip.bin",
                                       "report": f"s3://{OUTPUT_BUCKET}/results/{job}/clip.json"})
    assert status == 200, result
    assert (result["media"], result["frames"], result["batch"], result["output"]) == ("video", 6, 3, None)
    assert len(json.loads(_get(s3, result["report"]))["frames"]) == 6


@pytest.mark.data
def test_anonymize_a_real_hevc_video_with_audio(worker, s3):
    src = data_path("video", "pyfeat_face_noface.mov")
    job = _job()
    s3.upload_file(str(src), INPUT_BUCKET, f"uploads/{job}/{src.name}")
    status, result, _ = worker.invoke({"job_id": job, "input": f"s3://{INPUT_BUCKET}/uploads/{job}/{src.name}",
                                       "output": f"s3://{OUTPUT_BUCKET}/results/{job}/out.mp4"})
    assert status == 200, result
    assert result["frames"] == 169 and result["faces"] > 0
    summary = json.loads(_get(s3, result["report"]))["summary"]
    assert summary["audio"] is True and summary["frames"] == 169


BAD_INPUTS = {
    # name: (object to upload or None, descriptor overrides, status, message)
    "text-named-jpg": (b"this is not a photo\n", {}, 422, "not an image"),
    "garbage-named-mp4": (b"\x00\x01garbage" * 100, {"name": "clip.mp4", "output": "clip-out.mp4"}, 422,
                          "not a readable video"),
    "empty-object": (b"", {}, 422, "is empty"),
    "missing-key": (None, {}, 404, "does not exist"),
    "missing-bucket": (None, {"bucket": "ff-gpu-no-such-bucket"}, 404, "bucket ff-gpu-no-such-bucket does not exist"),
    "video-to-jpg": ("video", {"name": "clip.mp4", "output": "clip.jpg"}, 400, "output for a video must end in"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_4xx_with_a_clear_message(worker, s3, case, astronaut_bgr, tmp_path):
    data, extra, expected_status, message = BAD_INPUTS[case]
    job = _job()
    name, bucket = extra.get("name", "photo.jpg"), extra.get("bucket", INPUT_BUCKET)
    if data == "video":
        data = _video(tmp_path / "clip.mp4", astronaut_bgr, frames=3).read_bytes()
    if data is not None:
        s3.put_object(Bucket=INPUT_BUCKET, Key=f"uploads/{job}/{name}", Body=data)
    status, body, text = worker.invoke({"job_id": job, "input": f"s3://{bucket}/uploads/{job}/{name}",
                                        "output": f"s3://{OUTPUT_BUCKET}/results/{job}/{extra.get('output', name)}"})
    assert status == expected_status, body
    assert body["status"] == "failed" and body["job_id"] == job and body["http_status"] == status
    assert message in body["error"], body
    _no_traceback(text)
    assert "Contents" not in s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=f"results/{job}/"), \
        "a failed job left output behind"


@pytest.mark.parametrize("body,status,message", [
    (b"{malformed", 400, "request body is not valid JSON"),
    (b'"just a string"', 400, "must be a JSON object"),
    (json.dumps(descriptor(operation="blur")).encode(), 400, "not supported here"),
    (json.dumps(descriptor(options={"cells": 99})).encode(), 400, "cells must be between"),
])
def test_bad_descriptors_over_http(worker, body, status, message):
    got, reply, text = worker.invoke(body)
    assert got == status and reply["status"] == "failed" and message in reply["error"], reply
    _no_traceback(text)


def test_unknown_paths_and_oversized_bodies(worker):
    status, body, _ = worker.request("GET", "/health")
    assert status == 404 and "GET /ping" in body["error"]
    status, body, _ = worker.request("POST", "/invocations", b" " * (server.MAX_BODY_BYTES + 1))
    assert status == 413 and "media stays in S3" in body["error"]
    assert worker.request("GET", "/ping")[0] == 200, "the worker must survive bad requests"


def test_failures_are_logged_without_media(worker):
    job = _job()
    assert worker.invoke(descriptor(job_id=job, input=f"s3://{INPUT_BUCKET}/uploads/{job}/none.jpg"))[0] == 404
    refused = [r for r in worker.log_records() if r.get("message") == "job refused"]
    assert any(r.get("job_id") == job and r["status"] == 404 for r in refused)
    assert refused and all(r["level"] == "WARNING" and "reason" in r for r in refused)
    assert not [r for r in worker.log_records() if r.get("level") == "ERROR"], "no job should have crashed"


# --- the Lambda side: submit and results ----------------------------------------------------------

def test_submit_writes_the_request_and_invokes_the_endpoint(s3, runtime, monkeypatch):
    monkeypatch.setenv(gpu.ENDPOINT_ENV, "ff-gpu")
    job = _job()
    sub = gpu.submit(job, f"s3://{INPUT_BUCKET}/uploads/{job}/clip.mp4",
                     f"s3://{OUTPUT_BUCKET}/results/{job}/clip.mp4", options={"batch": 8},
                     request_bucket=OUTPUT_BUCKET, s3=s3, runtime=runtime)
    assert sub.inference_id == job and sub.endpoint == "ff-gpu"
    assert sub.request == f"s3://{OUTPUT_BUCKET}/{gpu.REQUEST_PREFIX}{job}.json"
    assert sub.output_location.startswith("s3://") and sub.failure_location.startswith("s3://")
    request = json.loads(_get(s3, sub.request))
    assert request == {"job_id": job, "operation": "anonymize", "input": f"s3://{INPUT_BUCKET}/uploads/{job}/clip.mp4",
                       "output": f"s3://{OUTPUT_BUCKET}/results/{job}/clip.mp4", "options": {"batch": 8}}
    parse_job(json.dumps(request).encode())  # what the worker will accept
    fields = sub.job_fields()
    assert fields["backend"] == "gpu" and fields["gpu_inference_id"] == job
    assert fields["gpu_output_location"] == sub.output_location


def test_submit_needs_an_endpoint_and_a_valid_job(s3, runtime, monkeypatch):
    monkeypatch.delenv(gpu.ENDPOINT_ENV, raising=False)
    assert not gpu.enabled()
    with pytest.raises(gpu.GpuError, match="FACEFLOW_GPU_ENDPOINT is unset"):
        gpu.submit("j1", "s3://a-b/k.mp4", "s3://a-b/o.mp4", s3=s3, runtime=runtime)
    monkeypatch.setenv(gpu.ENDPOINT_ENV, "ff-gpu")
    assert gpu.enabled()
    with pytest.raises(gpu.GpuError, match="cannot be an InferenceId"):
        gpu.submit("x" * 65, "s3://a-b/k.mp4", "s3://a-b/o.mp4", request_bucket="a-b", s3=s3, runtime=runtime)
    with pytest.raises(gpu.GpuError, match="not one the GPU worker runs"):
        gpu.submit("j1", "s3://a-b/k.mp4", "s3://a-b/o.mp4", operation="blur", request_bucket="a-b",
                   s3=s3, runtime=runtime)
    with pytest.raises(gpu.GpuError, match="a swap, and only a swap, names a source"):
        gpu.submit("j1", "s3://a-b/k.mp4", "s3://a-b/o.mp4", operation="swap", request_bucket="a-b",
                   s3=s3, runtime=runtime)
    with pytest.raises(gpu.GpuError, match="input 'uploads/k.mp4' is not an s3"):
        gpu.submit({"id": "j1"}, "uploads/k.mp4", "s3://a-b/o.mp4", request_bucket="a-b", s3=s3, runtime=runtime)
    monkeypatch.delenv("FACEFLOW_OUTPUT_BUCKET", raising=False)
    with pytest.raises(gpu.GpuError, match="no bucket for the GPU request"):
        gpu.submit("j1", "s3://a-b/k.mp4", "s3://a-b/o.mp4", s3=s3, runtime=runtime)


def _queue_async_results(moto_url: str, *results: tuple[bool, str]) -> None:
    """moto's sagemaker-runtime answers async invocations from this queue (its documented API)."""
    body = json.dumps({"region": REGION, "results": [{"is_failure": failed, "data": data} for failed, data in results]})
    req = urllib.request.Request(f"{moto_url}/moto-api/static/sagemaker/async-endpoint-results",
                                 data=body.encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as reply:
        assert reply.status == 201


def test_round_trip_submit_worker_result(worker, s3, runtime, moto_url, astronaut_bgr, monkeypatch):
    """The request submit writes is what the worker takes; the worker's answer, stored by the
    (moto) endpoint at the OutputLocation, becomes the job update."""
    monkeypatch.setenv(gpu.ENDPOINT_ENV, "ff-gpu")
    job = _job()
    s3.put_object(Bucket=INPUT_BUCKET, Key=f"uploads/{job}/a.jpg", Body=_jpeg(astronaut_bgr))
    args = (f"s3://{INPUT_BUCKET}/uploads/{job}/a.jpg", f"s3://{OUTPUT_BUCKET}/results/{job}/a.jpg")
    status, answer, text = worker.invoke(gpu.build_request(job, *args))   # what SageMaker would post
    assert status == 200
    _queue_async_results(moto_url, (False, text))
    sub = gpu.submit(job, *args, request_bucket=OUTPUT_BUCKET, s3=s3, runtime=runtime)
    assert json.loads(_get(s3, sub.request)) == gpu.build_request(job, *args)
    update = gpu.update_from_result(gpu.read_object(s3, sub.output_location))
    assert update == {"job_id": job, "status": "done", "backend": "gpu", "media": "image",
                      "outputs": {"image": args[1], "report": args[1] + ".json"},
                      "faces": 1, "frames": 1, "ms": answer["ms"]}


def test_round_trip_of_a_failure(worker, s3, runtime, moto_url, monkeypatch):
    monkeypatch.setenv(gpu.ENDPOINT_ENV, "ff-gpu")
    job = _job()
    args = (f"s3://{INPUT_BUCKET}/uploads/{job}/gone.jpg", f"s3://{OUTPUT_BUCKET}/results/{job}/gone.jpg")
    status, _, text = worker.invoke(gpu.build_request(job, *args))
    assert status == 404
    _queue_async_results(moto_url, (True, text))
    sub = gpu.submit(job, *args, request_bucket=OUTPUT_BUCKET, s3=s3, runtime=runtime)
    update = gpu.update_from_result(gpu.read_object(s3, sub.failure_location), failed=True)
    assert update == {"job_id": job, "status": "failed", "backend": "gpu", "error_type": "not_found",
                      "error": f"input {args[0]} does not exist"}


# --- notifications (pure, and with moto S3) -------------------------------------------------------

def _notification(job: str, completed: bool, **extra) -> dict:
    note = {"awsRegion": REGION, "eventTime": "2026-01-01T00:00:01.000Z", "receivedTime": "2026-01-01T00:00:00.000Z",
            "invocationStatus": "Completed" if completed else "Failed",
            "requestParameters": {"contentType": "application/json", "endpointName": "ff-gpu",
                                  "inputLocation": f"s3://{OUTPUT_BUCKET}/{gpu.REQUEST_PREFIX}{job}.json"},
            "inferenceId": job, "eventVersion": "1.0", "eventSource": "aws:sagemaker", "eventName": "InferenceResult"}
    note.update(extra)
    return note


def _sns_event(*notes: dict) -> dict:
    return {"Records": [{"EventSource": "aws:sns", "EventVersion": "1.0",
                         "Sns": {"Type": "Notification", "MessageId": str(uuid.uuid4()),
                                 "TopicArn": f"arn:aws:sns:{REGION}:123456789012:ff-gpu-success",
                                 "Message": json.dumps(n)}} for n in notes]}


WORKER_DONE = {"job_id": "j9", "status": "done", "operation": "anonymize", "media": "video",
               "input": "s3://i-b/uploads/j9/c.mp4", "output": "s3://o-b/results/j9/c.mp4",
               "report": "s3://o-b/results/j9/c.mp4.json", "faces": 40, "frames": 20, "ms": 1234.5,
               "providers": [CUDA, CPU], "batch": 16}
WORKER_FAILED = {"job_id": "j9", "status": "failed", "error": "input s3://i-b/uploads/j9/c.mp4: not a readable video",
                 "error_type": "bad_input", "http_status": 422}


def test_success_notification_with_the_response_included():
    import base64
    note = _notification("j9", True, responseParameters={"contentType": "application/json",
                                                          "outputLocation": "s3://o-b/results/_gpu/responses/x.out"},
                         responseBody={"content": base64.b64encode(json.dumps(WORKER_DONE).encode()).decode(),
                                       "message": "", "encoding": "BASE64"})
    expected = {"job_id": "j9", "status": "done", "backend": "gpu", "media": "video",
                "outputs": {"video": "s3://o-b/results/j9/c.mp4", "report": "s3://o-b/results/j9/c.mp4.json"},
                "faces": 40, "frames": 20, "ms": 1234.5,
                "gpu_output_location": "s3://o-b/results/_gpu/responses/x.out"}
    for form in (note, json.dumps(note), {"Message": json.dumps(note)}, _sns_event(note),
                 _sns_event(note)["Records"][0]):
        assert gpu.update_from_notification(form) == expected


def test_failure_notification_quotes_the_workers_error():
    reason = ('ClientError: Received client error (422) from primary with message "' + json.dumps(WORKER_FAILED)
              + '". See https://us-east-1.console.aws.amazon.com/cloudwatch/home for more information.')
    update = gpu.update_from_notification(_notification("j9", False, failureReason=reason))
    assert update == {"job_id": "j9", "status": "failed", "backend": "gpu", "error": WORKER_FAILED["error"]}
    plain = gpu.update_from_notification(_notification("j9", False, failureReason="Inference request timed out."))
    assert plain["status"] == "failed" and plain["error"] == "Inference request timed out."
    bare = gpu.update_from_notification(_notification("j9", False))
    assert bare["status"] == "failed" and "without a reason" in bare["error"]


def test_a_failure_never_reads_as_done():
    note = _notification("j9", False, failureReason="ModelError: boom",
                         responseBody={"content": json.dumps(WORKER_DONE), "message": ""})
    assert gpu.update_from_notification(note)["status"] == "failed"


def test_success_notification_read_from_s3(s3):
    key = f"results/_gpu/responses/{uuid.uuid4().hex}.out"
    s3.put_object(Bucket=OUTPUT_BUCKET, Key=key, Body=json.dumps(WORKER_DONE).encode())
    note = _notification("j9", True, responseParameters={"contentType": "application/json",
                                                          "outputLocation": f"s3://{OUTPUT_BUCKET}/{key}"})
    update = gpu.update_from_notification(note, s3=s3)
    assert update["status"] == "done" and update["faces"] == 40 and update["outputs"]["video"] == WORKER_DONE["output"]
    assert gpu.update_from_notification(note) == {"job_id": "j9", "status": "done", "backend": "gpu",
                                                  "gpu_output_location": f"s3://{OUTPUT_BUCKET}/{key}"}
    failed_key = f"results/_gpu/failures/{uuid.uuid4().hex}.out"
    s3.put_object(Bucket=OUTPUT_BUCKET, Key=failed_key, Body=json.dumps(WORKER_FAILED).encode())
    note = _notification("j9", False, failureReason="ClientError: 422",
                         responseParameters={"failureLocation": f"s3://{OUTPUT_BUCKET}/{failed_key}"})
    update = gpu.update_from_notification(note, s3=s3)
    assert update["status"] == "failed" and update["error"] == WORKER_FAILED["error"]
    assert update["error_type"] == "bad_input"


def test_many_records_and_bad_notifications():
    updates = gpu.updates_from_sns_event(_sns_event(_notification("a", False, failureReason="x"),
                                                    _notification("b", False, failureReason="y")))
    assert [(u["job_id"], u["error"]) for u in updates] == [("a", "x"), ("b", "y")]
    with pytest.raises(gpu.GpuError, match="expected one SNS record"):
        gpu.update_from_notification(_sns_event(_notification("a", True), _notification("b", True)))
    with pytest.raises(gpu.GpuError, match="not a SageMaker async inference notification"):
        gpu.update_from_notification({"hello": "world"})
    with pytest.raises(gpu.GpuError, match="not a JSON object"):
        gpu.update_from_notification("not json")


def test_update_from_result_handles_odd_answers():
    assert gpu.update_from_result(b"<html>502</html>", "j1")["error"].startswith(
        "the GPU worker answered something that is not its JSON result")
    assert gpu.update_from_result("Inference failed", "j1", failed=True) == {
        "job_id": "j1", "status": "failed", "backend": "gpu", "error": "Inference failed"}


def test_job_update_statuses_are_the_job_stores():
    jobs = pytest.importorskip("functions.common.jobs")
    assert (gpu.DONE, gpu.FAILED) == (jobs.DONE, jobs.FAILED)


# --- the image (no Docker here) -------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current = f"{current} {stripped.rstrip(chr(92)).strip()}" if current else stripped.rstrip(chr(92)).strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def stages(path: Path = DOCKERFILE) -> list[dict]:
    result, args = [], {}
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and not result:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), parts[0])
            result.append({"base": base, "name": parts[2] if len(parts) == 3 else None, "steps": []})
        else:
            result[-1]["steps"].append((word, rest))
    return result


def _ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def ignored(rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or a parent folder decides."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in _ignore_patterns():
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def _copies() -> list[tuple[list[str], str]]:
    out = []
    for stage in stages():
        for word, rest in stage["steps"]:
            if word in ("COPY", "ADD") and "--from=" not in rest:
                parts = [p for p in rest.split() if not p.startswith("--")]
                out.append((parts[:-1], parts[-1]))
    return out


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    copies = _copies()
    assert copies
    for sources, _ in copies:
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            assert not ignored(source), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            sent = [f for f in files if not ignored(f.relative_to(ROOT).as_posix())]
            assert sent, f"COPY {source}: nothing of it reaches the build context"
            if source.endswith(".py") or source.endswith(".txt") or source.endswith(".json"):
                assert sent == files, source
    for rel in ("functions/gpu/server.py", "functions/gpu/requirements.txt", "shared/faceflow/engine.py"):
        assert not ignored(rel), rel
    for rel in ("tests/test_gpu.py", ".git/config", "functions/stills/app.py", "functions/common/aws.py",
                ".venv/bin/python", "shared/faceflow/__pycache__/x.pyc", "functions/gpu/Dockerfile"):
        assert ignored(rel), f"{rel} would be sent to the GPU image build"


def test_dockerfile_stages_cuda_base_models_baked_and_entrypoint():
    all_stages = stages()
    names = [s["name"] for s in all_stages]
    assert names == ["models", "runtime", "worker"]
    runtime_stage, final = all_stages[1], all_stages[2]
    assert re.match(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+$", runtime_stage["base"]), runtime_stage["base"]
    assert final["base"] == "runtime"
    # The model folder has one definition, layers/Dockerfile's models stage: this image copies
    # it from the function image rather than fetching it again.
    assert all_stages[0]["base"] == "faceflow-function" and not all_stages[0]["steps"], all_stages[0]
    text = "\n".join(f"{w} {a}" for w, a in final["steps"])
    assert "FACEFLOW_MODEL_DIR=/opt/faceflow/models" in text
    from_copies = [a for w, a in final["steps"] if w == "COPY" and "--from=" in a]
    assert from_copies == ["--from=models /opt/faceflow/models /opt/faceflow/models"]
    entry = [a for w, a in final["steps"] if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["python", "-m", "functions.gpu.server"]
    assert json.loads([a for w, a in final["steps"] if w == "CMD"][-1]) == ["serve"]
    assert "EXPOSE 8080" in text
    runtime_text = " ".join(a for w, a in runtime_stage["steps"])
    assert "functions/gpu/requirements.txt" in runtime_text and "--only-binary=:all:" in runtime_text


def _pins(path: Path) -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}: not pinned with ==: {line}"
            pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def test_gpu_requirements_are_pinned_gpu_onnxruntime_and_match_the_functions():
    pins = _pins(REQUIREMENTS)
    assert "onnxruntime-gpu" in pins and "onnxruntime" not in pins, "the CPU wheel would shadow the GPU one"
    assert "opencv-python" not in pins and "opencv-python-headless" in pins
    assert "onnx" not in pins and "redis" not in pins
    functions = _pins(FUNCTION_REQUIREMENTS)
    # the core's own imports (faceflow.images reads HEIC through pillow-heif) must be in both images
    for name in ("numpy", "opencv-python-headless", "av", "pillow", "pillow-heif", "boto3", "botocore",
                 "aws-lambda-powertools"):
        assert pins[name] == functions[name], f"{name}: {pins[name]} here, {functions[name]} in the function image"


@pytest.mark.slow
def test_gpu_requirements_resolve_to_wheels_for_the_image(tmp_path):
    """The runtime stage installs with --only-binary=:all: on the CUDA image (Ubuntu 24.04:
    glibc 2.39, Python 3.12): every pin and dependency must exist as such a wheel on the package
    index, or the image does not build."""
    platforms = [arg for minor in range(39, 16, -1) for arg in ("--platform", f"manylinux_2_{minor}_x86_64")]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
           "--ignore-installed", "--target", str(tmp_path / "site-packages"), "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", *platforms, "--platform", "manylinux2014_x86_64",
           "--only-binary=:all:", "-r", str(REQUIREMENTS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"pip cannot resolve {REQUIREMENTS.name} to wheels:\n{proc.stderr[-3000:]}"


def test_the_image_layout_imports_the_entrypoint(tmp_path, model_dir):
    """Lay the code out as the worker stage's COPYs do (and nothing else of the repository), then
    import the entrypoint module there and load its engine on CPU, as the image's build check does."""
    program = tmp_path / "opt" / "program"
    final = stages()[-1]
    for word, rest in final["steps"]:
        if word != "COPY" or "--from=" in rest:
            continue
        source, dest = rest.split()
        dest_path = tmp_path / dest.lstrip("/")
        src = ROOT / source
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest_path, ignore=shutil.ignore_patterns("__pycache__", "Dockerfile*", "*.md"))
        else:
            shutil.copy2(src, dest_path)
    assert (program / "functions" / "gpu" / "server.py").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(program), FACEFLOW_MODEL_DIR=str(model_dir), PYTHONNOUSERSITE="1")
    child = ("import sys; sys.path = [p for p in sys.path if p not in ('', %r, %r)]; "
             "import functions.gpu.server as s; assert s.__file__.startswith(%r), s.__file__; "
             "import faceflow; assert faceflow.__file__.startswith(%r), faceflow.__file__; "
             "w = s.Worker(s.Config(), s3=object()); w.load(); assert w.ready, w.load_error; "
             "assert 'functions.common' not in ' '.join(sys.modules), 'the worker must not need the Lambda code'; "
             "assert 'redis' not in sys.modules") % (str(ROOT), str(ROOT / "shared"), str(program), str(program))
    proc = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
