"""The whole local stack as `python -m devstack` runs it: every function of template.yaml
under awslambdaric, fed the way AWS feeds them (S3 → stills and split asynchronously with
retries and the on-failure destination, SQS event source mappings with dead-letter queues,
the failure function), against moto_server and a real Redis server. Nothing is mocked.

A second, smaller stack gives the split function a 50 ms timeout, so that a real timeout on
every attempt can be watched reaching the job record.
Skips with the reason when a service is missing (fails in CI: see conftest)."""
from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from conftest import require_services

require_services()

import av  # noqa: E402

from devstack import Stack  # noqa: E402
from stack_client import create_job, job_record, panning_clip, wait_for_job  # noqa: E402

FPS, FRAMES, SIDE = 12, 36, 384   # 3 s at one keyframe a second: 3 chunks of 1 s
SPLIT_TIMEOUT_S = 0.05


# Low-priority videos go to the GPU endpoint (here: functions/gpu/server.py on CPU behind
# devstack's SageMaker stand-in); the others stay on Lambda, in chunks.
ROUTING = {"version": 1, "rules": [
    {"name": "low-priority-video-on-gpu", "when": {"media": ["video"], "priority": ["low"]}, "target": "gpu"}],
    "default": {"target": "lambda"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    rules = tmp_path_factory.mktemp("routing") / "routing.json"
    rules.write_text(json.dumps(ROUTING))
    env = {"FACEFLOW_MODEL_DIR": str(model_dir), "FACEFLOW_CHUNK_SECONDS": "1", "FACEFLOW_ROUTING_FILE": str(rules)}
    with Stack(function_env=env, workdir=tmp_path_factory.mktemp("whole-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr) -> bytes:
    """A public-domain face (skimage's astronaut) panning across 3 s of H.264."""
    return panning_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", astronaut_bgr, SIDE, FPS, FRAMES, 3, gop=FPS)


def frame_count(data: bytes, tmp_path) -> int:
    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_every_template_function_runs_with_its_deliveries(stack):
    assert set(stack.functions) == set(stack.template.lambdas) >= {
        "stills", "api", "split", "chunk-worker", "session-chunk", "failures", "gpu-result"}
    assert {"stills:s3", "split:s3", "chunk-worker:ChunkQueue", "session-chunk:SessionChunkQueue",
            "failures:StillsFailureQueue", "failures:ChunkDeadLetterQueue",
            "gpu-result:GpuSuccessTopic", "gpu-result:GpuErrorTopic"} <= set(stack.pollers)
    assert all(function.pid for function in stack.functions.values())
    assert stack.gpu_worker is not None and stack.sagemaker is not None


def test_video_job_routed_to_the_gpu_endpoint_is_done_and_downloadable(stack, clip, tmp_path):
    """Routing → InvokeEndpointAsync (the stand-in) → the GPU worker → the answer in S3 and on
    the success topic → the GPU result function → the job record."""
    job_id = create_job(stack, "gpu.mp4", clip, priority="low")
    job = wait_for_job(stack, job_id)
    assert job["status"] == "done", job
    assert job["route"] == "low-priority-video-on-gpu" and job["stage"] == "gpu"
    assert [i["status"] for i in stack.sagemaker.invocations if i["inferenceId"] == job_id] == [200]
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200, body
    with urllib.request.urlopen(json.loads(body)["video_url"], timeout=30) as response:
        assert frame_count(response.read(), tmp_path) == FRAMES


def test_video_job_through_the_api_is_done_and_downloadable(stack, clip, tmp_path, low_engine):
    job_id = create_job(stack, "clip.mp4", clip)
    job = wait_for_job(stack, job_id)
    assert job["status"] == "done", job
    assert job["progress"]["chunks_done"] == job["progress"]["chunks_total"] == FRAMES // FPS
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200, body
    links = json.loads(body)
    with urllib.request.urlopen(links["video_url"], timeout=30) as response:
        video = response.read()
    with urllib.request.urlopen(links["report_url"], timeout=30) as response:
        report = json.loads(response.read())
    assert frame_count(video, tmp_path) == FRAMES
    assert report["summary"]["frames"] == FRAMES and report["summary"]["faces"] >= FRAMES
    # the face was found on the input and is gone from the output
    path = tmp_path / "out.mp4"
    with av.open(str(path)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="bgr24")
    assert not low_engine.detect(first)


def test_a_video_timing_out_on_every_attempt_fails_its_job_with_the_reason(tmp_path, model_dir, clip):
    """S3 invokes the split function asynchronously; with a timeout too short for any video,
    every attempt is killed, Lambda's two retries are spent, the on-failure destination feeds
    the failure function, and the job says why (it stayed `running` before)."""
    env = {"FACEFLOW_MODEL_DIR": str(model_dir)}
    with Stack(functions=("api", "split", "failures"), timeouts={"split": SPLIT_TIMEOUT_S}, function_env=env,
               workdir=tmp_path / "stack") as stack:
        job_id = create_job(stack, "slow.mp4", clip)
        job = wait_for_job(stack, job_id, timeout=180)
        assert job["status"] == "failed", job
        assert job["error"].startswith(f"processing failed after 3 attempts: timed out after {SPLIT_TIMEOUT_S:g} s")
        assert "shorter video" in job["error"] and "raise the function timeout" in job["error"]
        status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
        assert status == 410 and "timed out" in json.loads(body)["message"]
        attempts = [d for d in stack.pollers["split:s3"].deliveries if d.event]
        assert [d.outcome for d in attempts] == ["error"] * 3 and attempts[-1].gave_up
        assert all(d.result.error_type == "Sandbox.Timedout" for d in attempts)
        assert stack.functions["split"].restarts >= 3  # each timeout ended its environment


def test_a_chunk_failing_on_every_receive_fails_the_video_job(stack, clip):
    """Chunk 2's object is gone, so the workers of chunks 1-3 (which read it as the chunk, its
    look-ahead or its warm-up) fail on every receive until the queue's redrive policy
    dead-letters their messages; the failure function fails the job, naming the first chunk
    that was dead-lettered, and keeps that reason."""
    worker = stack.pollers["chunk-worker:ChunkQueue"]
    worker.pause()
    try:
        job_id = create_job(stack, "lost-chunk.mp4", clip)
        wait_for_job(stack, job_id, timeout=180, until=("running",))
        deadline = time.monotonic() + 120
        while job_record(stack, job_id).get("stage") != "chunks":
            assert time.monotonic() < deadline, "the video was not split"
            time.sleep(0.5)
        chunk = stack.s3.list_objects_v2(Bucket=stack.output_bucket, Prefix=f"work/{job_id}/chunks/00001")
        stack.s3.delete_object(Bucket=stack.output_bucket, Key=chunk["Contents"][0]["Key"])
    finally:
        worker.resume()
    job = wait_for_job(stack, job_id, timeout=240, until=("failed", "done"))
    assert job["status"] == "failed", job
    named = re.match(r"^chunk ([123]) of 3 failed on every attempt", job["error"])
    assert named and "shorter video" in job["error"], job["error"]
    receives = [d for d in worker.deliveries if isinstance(d.body, dict) and d.body.get("job_id") == job_id
                and d.body.get("index") == int(named[1]) - 1]
    # received until the redrive policy's maxReceiveCount (5), failing each time (a receive made
    # while the delivery was paused is handed back unseen, so the first may not be recorded)
    assert receives and receives[-1].receive_count == 5 and all(d.outcome == "error" for d in receives)
    assert [d.receive_count for d in receives] == list(range(receives[0].receive_count, 6))
    time.sleep(3 * stack.visibility_timeout)  # the other dead-lettered chunks do not overwrite it
    assert job_record(stack, job_id)["error"] == job["error"]
