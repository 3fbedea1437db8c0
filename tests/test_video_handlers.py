"""The video functions' shape: which handler loads a model, the S3 key layout, chunk messages,
a chunk's neighbours, and the routing facts of an uploaded video. No AWS and no Redis are
reached (settings point at addresses nothing listens on); tests/test_video_functions.py runs
the handlers end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT

pytest.importorskip("aws_lambda_powertools", reason="the functions' dependencies: pip install -e '.[functions]'")

SETTINGS = {"FACEFLOW_INPUT_BUCKET": "input", "FACEFLOW_OUTPUT_BUCKET": "output",
            "FACEFLOW_REDIS_URL": "redis://127.0.0.1:1/0", "AWS_DEFAULT_REGION": "us-east-1",
            "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_METRICS_NAMESPACE": "faceflow"}
HANDLERS = {"split": "split_handler", "chunk_worker": "chunk_worker_handler",
            "session_chunk": "session_chunk_handler", "merge": "merge_handler", "gpu_result": "gpu_result_handler"}
DETECTING = {"chunk_worker", "session_chunk"}


@pytest.fixture()
def videojobs(monkeypatch):
    for name, value in SETTINGS.items():
        monkeypatch.setenv(name, value)
    import importlib
    return importlib.import_module("functions.common.videojobs")


@pytest.mark.parametrize("module", sorted(HANDLERS))
def test_only_the_handlers_that_detect_load_a_model(module, model_dir):
    """Imported as awslambdaric imports it: split, merge and GPU results never load the
    detector (nor onnxruntime); the chunk and session workers load it at init."""
    probe = ("import importlib, json, sys; m = importlib.import_module(sys.argv[1]); "
             "print(json.dumps({'handler': callable(getattr(m, sys.argv[2])), "
             "'onnxruntime': 'onnxruntime' in sys.modules, 'engine': type(getattr(m, 'engine', None)).__name__}))")
    env = {**os.environ, **SETTINGS, "FACEFLOW_MODEL_DIR": str(model_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")])}
    done = subprocess.run([sys.executable, "-c", probe, f"functions.video.{module}", HANDLERS[module]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["handler"]
    if module in DETECTING:
        assert seen["onnxruntime"] and seen["engine"] == "Engine"
    else:
        assert not seen["onnxruntime"] and seen["engine"] == "NoneType"


def test_chunk_messages_that_can_never_succeed_are_recognised(videojobs):
    job = "0123456789abcdef0123456789abcdef"
    assert videojobs.chunk_message(json.dumps({"job_id": job, "index": 3})) == (job, 3)
    for body in ("not json", "[1, 2]", "null", json.dumps({"job_id": "../x", "index": 0}),
                 json.dumps({"job_id": job, "index": -1}), json.dumps({"job_id": job, "index": "1"}),
                 json.dumps({"job_id": job, "index": True}), json.dumps({"job_id": job})):
        assert videojobs.chunk_message(body) is None, body


CHUNK_WORKER_RUN = """
import json, sys
from functions.video.chunk_worker import chunk_worker_handler

class Context:
    function_name, function_version, memory_limit_in_mb = "faceflow-chunk-worker", "$LATEST", 3008
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:faceflow-chunk-worker"
    aws_request_id, log_group_name, log_stream_name = "malformed", "/aws/lambda/x", "s"

    def get_remaining_time_in_millis(self):
        return 60_000

print(json.dumps(chunk_worker_handler(json.loads(sys.argv[1]), Context())))
"""


def test_a_chunk_message_that_is_not_json_is_dropped_not_retried(model_dir):
    """A body that is not a JSON object can never succeed: dropped (no batch item failure),
    not redelivered until it reaches the dead-letter queue. Nothing is read or written."""
    event = json.loads((ROOT / "events" / "video_chunk_sqs.json").read_text())
    record = event["Records"][0]
    event["Records"] = [{**record, "messageId": name, "body": body}
                        for name, body in (("text", "not json"), ("list", "[1, 2]"))]
    env = {**os.environ, **SETTINGS, "FACEFLOW_MODEL_DIR": str(model_dir), "POWERTOOLS_LOG_LEVEL": "CRITICAL",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")])}
    done = subprocess.run([sys.executable, "-c", CHUNK_WORKER_RUN, json.dumps(event)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"batchItemFailures": []}


def _old_neighbours(plan: dict, index: int, need: int) -> tuple[list[int], int | None]:
    """What functions/video/app.py computed itself before it used chunks.warmup_for."""
    before, have = [], 0
    for k in range(index - 1, -1, -1):
        before.insert(0, k)
        have += int(plan["chunks"][k]["frames"])
        if have >= need:
            break
    return before, index + 1 if index + 1 < len(plan["chunks"]) else None


@pytest.mark.parametrize("frames", [[60, 60, 60, 60], [60, 5, 3, 60, 2], [1, 1, 1, 1, 1, 1, 1, 1], [200]])
def test_a_chunks_neighbours_follow_the_warmup_it_needs(videojobs, frames):
    from faceflow.chunks import warmup_frames
    fps = 30.0
    start = [sum(frames[:i]) for i in range(len(frames))]
    plan = {"info": {"fps": fps}, "audio": None,
            "chunks": [{"index": i, "key": f"work/j/chunks/{i:05d}.mp4", "path": None, "start_time": s / fps,
                        "frames": n, "duration": n / fps, "start_frame": s}
                       for i, (n, s) in enumerate(zip(frames, start))]}
    for index in range(len(frames)):
        before, after = videojobs.neighbours(plan, index)
        assert (before, after) == _old_neighbours(plan, index, warmup_frames(fps))
        assert sum(frames[k] for k in before) >= warmup_frames(fps) or before == list(range(index))


def test_the_key_layout_round_trips(videojobs):
    from functions.common import layout
    job = "0123456789abcdef0123456789abcdef"
    video, report = layout.out_keys(job, 12, ".mp4")
    assert (video, report) == (f"work/{job}/out/00012.mp4", f"work/{job}/out/00012.json")
    assert layout.out_index(job, report) == 12
    assert layout.out_index(job, video) is None and layout.out_index(job, f"work/{job}/plan.json") is None
    assert layout.out_index("f" * 32, report) is None
    assert layout.chunk_key(job, 3, ".ts") == f"work/{job}/chunks/00003.ts"
    assert layout.session_keys("cam-1", 7, ".ts") == ("sessions/cam-1/7.ts", "sessions/cam-1/7.json")
    assert layout.SESSION_KEY.match("sessions/cam-1/7.ts")["seq"] == "7"
    for bad in ("sessions/cam-1/07.ts", "sessions/../7.ts", "sessions/cam-1/7.mov", "uploads/cam-1/7.ts"):
        assert layout.SESSION_KEY.match(bad) is None, bad


INFO = SimpleNamespace(duration=42.5, width=1920, height=1080)


def test_video_facts_from_probe_tags_and_job_record():
    from faceflow import routing
    facts = routing.video_facts(1000, INFO, {routing.PRIORITY_TAG: "LOW"}, None)
    assert facts == {"operation": "anonymize", "media": "video", "size_bytes": 1000, "duration_s": 42.5,
                     "width": 1920, "height": 1080, "priority": "low"}
    assert routing.video_facts(1000, None) == {"operation": "anonymize", "media": "video", "size_bytes": 1000}
    # private in either the tag or the job record wins; the API's "normal" is routing's "standard"
    assert routing.video_facts(1, INFO, {routing.SENSITIVITY_TAG: "public"}, {"sensitivity": "private"})[
        "sensitivity"] == "private"
    assert routing.video_facts(1, INFO, None, {"sensitivity": "normal"})["sensitivity"] == "standard"
    # an unknown value fails closed to private; an unknown priority is ignored
    facts = routing.video_facts(1, INFO, {routing.SENSITIVITY_TAG: "secret"}, {"priority": "urgent"})
    assert facts["sensitivity"] == "private" and "priority" not in facts
    table = routing.parse_rules({"version": 1, "rules": [
        {"name": "private-stays", "when": {"sensitivity": ["private"]}, "target": "lambda"},
        {"name": "video-on-gpu", "when": {"media": ["video"]}, "target": "gpu"}], "default": {"target": "lambda"}})
    assert table.route(facts).rule_name == "private-stays"
    assert table.route(routing.video_facts(1, INFO, None, {"sensitivity": "normal"})).target == "gpu"
