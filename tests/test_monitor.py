"""`faceflow monitor` against a real `faceflow serve` on loopback: the CSV, the plot and the
summary, sampling the server from its /metrics or, with --pid, with psutil."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

pytest.importorskip("aiohttp", reason="the serve extra is not installed: pip install -e '.[serve]'")

from conftest import data_path  # noqa: E402
from serve_process import ServeProcess  # noqa: E402


@pytest.fixture(scope="module")
def serve(tmp_path_factory, model_dir):
    with ServeProcess(tmp_path_factory.mktemp("serve"), "--workers", "2",
                      env={"FACEFLOW_MODEL_DIR": str(model_dir)}) as server:
        yield server


def monitor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faceflow.cli", "monitor", *args], capture_output=True, text=True,
                          timeout=300)


def rows(path) -> list[dict]:
    with open(path, newline="") as table:
        return list(csv.DictReader(table))


@pytest.mark.parametrize("sampling", ["metrics", "pid"])
def test_monitor_writes_the_csv_plot_and_summary(serve, tmp_path, sampling):
    images = data_path("images")
    extra = ["--pid", str(serve.process.pid)] if sampling == "pid" else []
    done = monitor(serve.url, "--requests", "12", "--concurrency", "3", "--warmup", "--images", str(images),
                   "--interval", "0.2", "--out", str(tmp_path), *extra)
    assert done.returncode == 0, done.stderr
    table = rows(tmp_path / "monitor.csv")
    assert list(table[0]) == ["timestamp", "request_id", "latency_ms", "cpu_percent", "memory_mb", "status"]
    assert sorted(int(r["request_id"]) for r in table) == list(range(12))
    assert all(r["status"] == "200" and float(r["latency_ms"]) > 0 for r in table)
    timestamps = [float(r["timestamp"]) for r in table]
    assert timestamps == sorted(timestamps)
    # the server process holds the engine: tens of MB at least; it worked, so it used CPU
    assert all(float(r["memory_mb"]) > 50 for r in table)
    assert max(float(r["cpu_percent"]) for r in table) > 0
    png = (tmp_path / "monitor.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    for word in ("mean", "std", "p50", "p95", "max/min"):
        assert word in done.stdout, done.stdout
    # the served counts agree: the warm-up requests came on top
    metrics = serve.request("GET", "/metrics")[2].decode()
    assert 'faceflow_http_requests_total{method="POST",route="/v1/anonymize",status="200"}' in metrics


def test_monitor_without_photos_or_server_says_why(tmp_path, serve):
    done = monitor(serve.url, "--images", str(tmp_path), "--out", str(tmp_path))
    assert done.returncode == 2 and "no photos" in done.stderr
    images = data_path("images")
    done = monitor("http://127.0.0.1:9", "--images", str(images), "--out", str(tmp_path))
    assert done.returncode == 2 and "/metrics" in done.stderr
    assert not (tmp_path / "monitor.csv").exists()


def test_summary_figures():
    from faceflow.web.monitor import summary
    figures = summary([10.0, 20.0, 30.0, 40.0, 100.0])
    assert figures["mean"] == 40.0 and figures["p50"] == 30.0 and figures["p95"] == 100.0
    assert figures["max_min_ratio"] == 10.0 and round(figures["std"], 3) == 31.623  # population std
