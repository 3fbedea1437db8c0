"""Prometheus /metrics of `faceflow serve` and of the GPU worker, scraped over HTTP and parsed
with prometheus_client's own parser: the series, their values after known requests, and
Prometheus' naming conventions."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the serve extra is not installed: pip install -e '.[serve]'")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import data_path  # noqa: E402
from serve_process import ServeProcess, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACEFLOW_FAMILIES = {"faceflow_http_requests", "faceflow_http_request_failures", "faceflow_http_request_duration_seconds",
                     "faceflow_faces_found", "faceflow_frames_processed", "faceflow_queue_depth",
                     "faceflow_model_load_seconds"}


def parse(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels) -> float:
    family_name = next(name for name in families if sample_name.startswith(name))
    found = [s.value for s in families[family_name].samples
             if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample_name, labels, families[family_name].samples)
    return found[0]


def assert_conventions(families: dict) -> None:
    """faceflow_ prefix, base units in the name, counters' samples with _total."""
    for name, family in families.items():
        assert name.startswith(("faceflow_", "process_", "python_")), name
        assert not any(unit in name for unit in ("_ms", "_milliseconds", "_megabytes", "_mb")), name
        if family.type == "counter":
            assert any(s.name == f"{name}_total" for s in family.samples) or not family.samples, name
        assert family.documentation, f"{name} has no help text"


def test_serve_metrics_count_what_it_answered(tmp_path, model_dir):
    photo = data_path("images", "pyfeat_multi_face.jpg").read_bytes()
    with ServeProcess(tmp_path, env={"FACEFLOW_MODEL_DIR": str(model_dir)}) as serve:
        for _ in range(3):
            status, headers, _ = serve.request("POST", "/v1/anonymize", photo, {"Content-Type": "image/jpeg"})
            assert status == 200
        faces = int(headers["x-faceflow-faces"])
        assert serve.request("POST", "/v1/analyze", b"junk", {"Content-Type": "image/jpeg"})[0] == 400
        assert serve.request("GET", f"/v1/jobs/{'a' * 32}")[0] == 404
        status, headers, body = serve.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    families = parse(body.decode())
    assert FACEFLOW_FAMILIES <= set(families), sorted(families)
    assert_conventions(families)
    assert value(families, "faceflow_http_requests_total", route="/v1/anonymize", method="POST", status="200") == 3
    assert value(families, "faceflow_http_requests_total", route="/v1/analyze", method="POST", status="400") == 1
    # routes are the templates, not the paths asked for (one series per route)
    assert value(families, "faceflow_http_requests_total", route="/v1/jobs/{job_id}", method="GET", status="404") == 1
    assert value(families, "faceflow_http_request_duration_seconds_count", route="/v1/anonymize") == 3
    assert value(families, "faceflow_http_request_duration_seconds_bucket", route="/v1/anonymize", le="+Inf") == 3
    assert value(families, "faceflow_http_request_duration_seconds_sum", route="/v1/anonymize") > 0
    assert not [s for s in families["faceflow_http_request_failures"].samples if s.name.endswith("_total")]
    assert value(families, "faceflow_faces_found_total") == 3 * faces
    assert value(families, "faceflow_model_load_seconds", model="detector") > 0
    assert value(families, "faceflow_queue_depth", queue="requests") == 0
    assert value(families, "process_resident_memory_bytes") > 50e6
    assert value(families, "process_cpu_seconds_total") > 0


def test_the_gpu_worker_has_metrics(tmp_path, model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")]),
           "FACEFLOW_MODEL_DIR": str(model_dir), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # no S3 is reached: no job gets that far
    env.pop("FACEFLOW_GPU_PORT", None)
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "functions.gpu.server", "serve", "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (OSError, urllib.error.HTTPError):
                pass
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.2)
        request = urllib.request.Request(url + "/invocations", data=b"{not json", method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=")
            families = parse(reply.read().decode())
    finally:
        worker.terminate()
        worker.wait(timeout=20)
    assert FACEFLOW_FAMILIES <= set(families), sorted(families)
    assert_conventions(families)
    assert value(families, "faceflow_http_requests_total", route="/invocations", method="POST", status="400") == 1
    assert value(families, "faceflow_http_request_duration_seconds_count", route="/invocations") == 1
    assert value(families, "faceflow_model_load_seconds", model="detector") > 0
    assert value(families, "faceflow_queue_depth", queue="jobs") == 0
    assert value(families, "process_resident_memory_bytes") > 0
