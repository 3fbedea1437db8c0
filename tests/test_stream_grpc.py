"""The GPU container's gRPC stream service (functions/gpu/stream_server.py) on CPU, over
loopback: faces and the masked frame back, drops under overload counted and bounded, refusals,
and the committed protobuf modules matching stream.proto. Also the hub's bounds on their own."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

grpc = pytest.importorskip("grpc", reason="grpcio not installed: pip install -e '.[stream]'")
pytest.importorskip("aws_lambda_powertools", reason="Powertools not installed: pip install -e '.[functions]'")

from conftest import ROOT  # noqa: E402
from stream_scene import SlowEngine, face_changed, face_of, jpeg, scene_frame  # noqa: E402

from faceflow import stream, stream_pb2, stream_pb2_grpc  # noqa: E402
from faceflow.stream import FrameMessage  # noqa: E402
from faceflow.streamgrpc import frame_from_proto, frame_to_proto, reply_from_proto, reply_to_proto  # noqa: E402
from faceflow.streamhub import Outbox, StreamHub  # noqa: E402
from functions.gpu import stream_server  # noqa: E402

CALL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def face(astronaut_bgr):
    return face_of(astronaut_bgr)


@pytest.fixture(scope="module")
def service(engine):
    # Deep enough that the few frames of these tests are never dropped on a busy machine
    # (dropping is the overload tests' subject).
    server, port, svc = stream_server.serve(lambda: engine, "127.0.0.1", 0, batch=8, depth=16, streams=8)
    yield f"127.0.0.1:{port}"
    server.stop(grace=1).wait()
    svc.close()


def call(target: str, frames: list[stream_pb2.Frame], pace_s: float = 0.0) -> list[dict]:
    """Send `frames` on one stream (every `pace_s` seconds; 0: as fast as gRPC takes them) and
    return every reply, as dicts."""
    def requests():
        for frame in frames:
            yield frame
            if pace_s:
                time.sleep(pace_s)

    with grpc.insecure_channel(target) as channel:
        stub = stream_pb2_grpc.FaceStreamStub(channel)
        return [reply_from_proto(r) for r in stub.Stream(requests(), timeout=CALL_TIMEOUT_S)]


def test_generated_modules_match_the_proto(tmp_path):
    """The committed stream_pb2*.py are what stream.proto generates (the command in its header)."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools not installed: pip install -e '.[test]'")
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'shared'}",
                           f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                           str(ROOT / "shared" / "faceflow" / "stream.proto")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("stream_pb2.py", "stream_pb2_grpc.py"):
        assert (tmp_path / "faceflow" / name).read_text() == (ROOT / "shared" / "faceflow" / name).read_text(), \
            f"shared/faceflow/{name} is stale: regenerate it (see stream.proto)"


def test_messages_convert_both_ways():
    sent = FrameMessage(9, 0.36, b"\xff\xd8jpeg", return_frame=False, method="solid", quality=55, fps=30.0)
    assert frame_from_proto(stream_pb2.Frame.FromString(frame_to_proto(sent).SerializeToString())) == sent
    bare = frame_from_proto(stream_pb2.Frame(seq=3, timestamp=0.1, jpeg=b"x"))
    assert (bare.return_frame, bare.method, bare.quality, bare.fps) == (True, "blur", stream.DEFAULT_QUALITY,
                                                                         stream.DEFAULT_FPS)
    reply = {"v": 1, "type": "result", "seq": 4, "timestamp": 0.16, "status": "ok", "width": 640, "height": 360,
             "faces": [{"box": [1.5, 2.0, 30.0, 40.0], "track": 2, "source": "tracked", "score": 0.875}],
             "dropped": 3, "jpeg": b"\xff\xd8x", "quality": 80, "ms": 12.5}
    back = reply_from_proto(stream_pb2.Reply.FromString(reply_to_proto(reply).SerializeToString()))
    assert back == reply
    error = reply_from_proto(reply_to_proto({"type": "error", "seq": None, "code": "malformed", "error": "x",
                                             "dropped": 1}))
    assert error["type"] == "error" and error["seq"] is None and error["code"] == "malformed"


def test_round_trip_faces_and_the_masked_frame(service, face):
    frames = [scene_frame(face, i) for i in range(6)]
    replies = call(service, [frame_to_proto(FrameMessage(i, i / 25, jpeg(f))) for i, f in enumerate(frames)],
                   pace_s=0.05)
    assert [r["type"] for r in replies] == ["result"] * 6, replies
    assert [r["seq"] for r in replies] == list(range(6))
    for original, reply in zip(frames, replies):
        assert len(reply["faces"]) == 1 and reply["faces"][0]["source"] == "detected"
        assert (reply["width"], reply["height"]) == (640, 360) and reply["dropped"] == 0
        returned = cv2.imdecode(np.frombuffer(reply["jpeg"], np.uint8), cv2.IMREAD_COLOR)
        box = reply["faces"][0]["box"]
        assert face_changed(original, returned, box) > 0.6, "the face must come back masked"
        # ...and only the face: the background is the same but for JPEG noise
        assert np.abs(returned[:, :100].astype(int) - original[:, :100].astype(int)).max() < 24
    assert len({r["faces"][0]["track"] for r in replies}) == 1, "one face, one track across frames"


def test_faces_only_when_no_frame_is_asked_for(service, face):
    replies = call(service, [frame_to_proto(FrameMessage(0, 0.0, jpeg(scene_frame(face, 0)), return_frame=False))])
    assert len(replies) == 1 and replies[0]["type"] == "result" and "jpeg" not in replies[0]
    assert len(replies[0]["faces"]) == 1


def test_bad_frames_are_refused_and_the_stream_goes_on(service, face):
    too_large = b"\xff\xd8" + bytes(stream.MAX_JPEG_BYTES)
    frames = [stream_pb2.Frame(seq=0, timestamp=0.0, jpeg=b"not a jpeg"),
              stream_pb2.Frame(seq=1, timestamp=0.04, jpeg=too_large),
              stream_pb2.Frame(seq=2, timestamp=0.08, jpeg=jpeg(scene_frame(face, 2)), method="sparkle"),
              stream_pb2.Frame(seq=3, timestamp=0.12, jpeg=b"\xff\xd8\xff\xe0 truncated"),
              frame_to_proto(FrameMessage(4, 0.16, jpeg(scene_frame(face, 4))))]
    replies = call(service, frames, pace_s=0.05)
    by_seq = {r["seq"]: r for r in replies}
    assert [by_seq[s]["code"] for s in range(4)] == ["bad_image", "too_large", "malformed", "bad_image"], replies
    assert all(by_seq[s]["error"] for s in range(4))
    assert by_seq[4]["type"] == "result" and len(by_seq[4]["faces"]) == 1
    assert by_seq[4]["dropped"] == 4, "refused frames are counted with the drops"


def test_overload_drops_frames_counted_never_queued(engine, face):
    """Frames sent far faster than a (held back) detector takes them: the oldest waiting ones
    are dropped with reason backlog; every frame gets exactly one reply; the count adds up."""
    server, port, svc = stream_server.serve(lambda: SlowEngine(engine, 0.15), "127.0.0.1", 0, batch=4, depth=2)
    try:
        data = jpeg(scene_frame(face, 0))
        sent = 40
        replies = call(f"127.0.0.1:{port}",
                       [frame_to_proto(FrameMessage(i, i / 25, data, return_frame=False)) for i in range(sent)])
    finally:
        server.stop(grace=1).wait()
        svc.close()
    seqs = [r["seq"] for r in replies]
    assert len(seqs) == len(set(seqs)) and set(seqs) <= set(range(sent)), "at most one reply per frame"
    drops = [r for r in replies if r["type"] == "drop"]
    results = [r for r in replies if r["type"] == "result"]
    assert drops and all(r["reason"] == "backlog" for r in drops)
    # Admitted frames are at most `depth` ahead: of a burst, few frames are done.
    assert len(results) < sent / 2
    # Each frame is done or counted as dropped (a drop reply that found the outbox full is not
    # sent, but counted all the same).
    assert results[-1]["dropped"] == sent - len(results)
    assert [r["seq"] for r in results] == sorted(r["seq"] for r in results)


def test_streams_are_batched_together(engine, face):
    """Several streams at once: the detector runs on frames of more than one stream per call."""
    server, port, svc = stream_server.serve(lambda: SlowEngine(engine, 0.05), "127.0.0.1", 0, batch=8, depth=2)
    results: dict[int, list] = {}
    try:
        data = jpeg(scene_frame(face, 0))

        def one(k: int):
            results[k] = call(f"127.0.0.1:{port}",
                              [frame_to_proto(FrameMessage(i, i / 25, data, return_frame=False)) for i in range(8)],
                              pace_s=0.04)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CALL_TIMEOUT_S)
        hub = svc.hub
        assert hub.batched_frames > hub.batches, "frames of several streams share detector calls"
    finally:
        server.stop(grace=1).wait()
        svc.close()
    assert sorted(results) == [0, 1, 2, 3]
    for replies in results.values():
        assert sorted(r["seq"] for r in replies) == list(range(8))
        assert all(len(r["faces"]) == 1 for r in replies if r["type"] == "result")


def test_unavailable_while_the_engine_loads():
    server, port, svc = stream_server.serve(lambda: None, "127.0.0.1", 0)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            call(f"127.0.0.1:{port}", [stream_pb2.Frame(seq=0, jpeg=b"\xff\xd8")])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not loaded" in caught.value.details()
    finally:
        server.stop(grace=1).wait()


def test_a_client_that_does_not_read_loses_replies_not_memory(engine, face):
    """The hub itself: with no room in the outbox a result is dropped as stale and counted;
    admitted frames never exceed the depth."""
    hub = StreamHub(engine, batch=4, depth=2)
    try:
        outbox = Outbox(1)
        handle = hub.open(outbox.offer)
        data = jpeg(scene_frame(face, 0))
        for i in range(12):
            handle.submit(FrameMessage(i, i / 25, data, return_frame=False))
            assert handle.admitted <= 2
        handle.end()
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not handle.idle and time.monotonic() < deadline:
            time.sleep(0.02)
        assert handle.idle
        drops = handle.drops
        assert len(outbox) == 1  # nobody read: only what fitted is there
        assert drops.get("stale", 0) >= 1 and drops.get("backlog", 0) >= 1
        kept = outbox.take(0)
        # Every frame is done (its result the one kept) or counted as dropped.
        assert sum(drops.values()) + (kept["type"] == "result") == 12, (drops, kept["type"])
    finally:
        hub.close()


def test_start_reads_its_port_and_can_be_off(monkeypatch, engine):
    class Loaded:
        pass
    worker = Loaded()
    worker.engine = engine
    monkeypatch.setenv("FACEFLOW_GPU_GRPC_PORT", "0")
    assert stream_server.start(worker, "127.0.0.1") is None
    monkeypatch.setenv("FACEFLOW_GPU_GRPC_PORT", "nope")
    with pytest.raises(SystemExit, match="FACEFLOW_GPU_GRPC_PORT"):
        stream_server.start(worker, "127.0.0.1")


def test_a_taken_port_is_an_error_not_a_shared_port(engine):
    """gRPC would share a port another process holds (SO_REUSEPORT) and split the streams
    between them; the service refuses it instead, and the GPU worker goes on without streams."""
    server, port, svc = stream_server.serve(lambda: engine, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="cannot listen"):
            stream_server.serve(lambda: engine, "127.0.0.1", port)

        class Loaded:
            pass
        worker = Loaded()
        worker.engine = engine
        import os
        os.environ["FACEFLOW_GPU_GRPC_PORT"] = str(port)
        try:
            assert stream_server.start(worker, "127.0.0.1") is None
        finally:
            del os.environ["FACEFLOW_GPU_GRPC_PORT"]
    finally:
        server.stop(grace=1).wait()
        svc.close()


def test_the_gpu_worker_serves_streams_beside_http(model_dir, face, tmp_path):
    """`python -m functions.gpu.server serve`, as the container starts it: /ping over HTTP, and
    a stream over gRPC on FACEFLOW_GPU_GRPC_PORT once the engine is in."""
    import json
    import os
    import urllib.request

    from devstack.procs import free_port
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")]),
           "FACEFLOW_MODEL_DIR": str(model_dir), "FACEFLOW_GPU_GRPC_PORT": str(grpc_port),
           "AWS_DEFAULT_REGION": "us-east-1"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "functions.gpu.server", "serve", "--host", "127.0.0.1",
                                 "--port", str(http_port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ping", timeout=5) as reply:
                    if reply.status == 200 and json.load(reply)["status"] == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the worker did not load its engine"
            time.sleep(0.2)
        replies = call(f"127.0.0.1:{grpc_port}",
                       [frame_to_proto(FrameMessage(i, i / 25, jpeg(scene_frame(face, i)))) for i in range(3)],
                       pace_s=0.2)
        # (The engine's first run is slow: a frame may be dropped behind it.)
        results = [r for r in replies if r["type"] == "result"]
        assert results and {r["type"] for r in replies} <= {"result", "drop"}
        assert sorted(r["seq"] for r in replies) == [0, 1, 2]
        assert all(len(r["faces"]) == 1 and r["jpeg"] for r in results)
    finally:
        proc.terminate()
        proc.wait(30)
    assert "gRPC stream service listening" in log.read_text()


def test_the_gpu_image_pins_what_the_stream_service_needs():
    """functions/gpu/requirements.txt has grpcio and protobuf, at versions the committed
    generated modules accept (the pyproject `stream` extra's bounds)."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    pins = {}
    for line in (ROOT / "functions" / "gpu" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = Version(next(iter(req.specifier)).version)
    import tomllib
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["stream"]
    for spec in map(Requirement, extra):
        if spec.name in ("grpcio", "protobuf"):
            assert spec.name in pins, f"{spec.name} is not in the GPU image"
            assert spec.specifier.contains(pins[spec.name]), f"{spec.name} {pins[spec.name]} is not {spec.specifier}"


def test_a_drop_never_waits_for_the_frame_in_progress(engine, face):
    """Counting a dropped frame must not wait while the same stream's previous frame is being
    masked and encoded: serve's WebSocket route submits on its event loop, and a wait there
    held up every connection (4 streams got 2 fps each)."""
    hub = StreamHub(engine, batch=1, depth=1)
    entered, release = threading.Event(), threading.Event()
    real = hub.processor.process

    def held(*args, **kwargs):
        entered.set()
        release.wait(CALL_TIMEOUT_S)
        return real(*args, **kwargs)

    hub.processor.process = held
    try:
        outbox = Outbox(8)
        handle = hub.open(outbox.offer)
        data = jpeg(scene_frame(face, 0))
        handle.submit(FrameMessage(0, 0.0, data, return_frame=False, fps=30.0))
        assert entered.wait(CALL_TIMEOUT_S)
        submitted = threading.Event()

        def drop_one():
            handle.submit(FrameMessage(1, 0.04, data, return_frame=False))  # over the depth: dropped
            submitted.set()

        threading.Thread(target=drop_one, daemon=True).start()
        waited = not submitted.wait(5)
        release.set()
        assert not waited, "submit waited for the frame in progress"
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while handle.admitted and time.monotonic() < deadline:  # frame 0 done
            time.sleep(0.01)
        handle.submit(FrameMessage(2, 0.08, data, return_frame=False))
        handle.end()
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not handle.idle and time.monotonic() < deadline:
            time.sleep(0.02)
        replies = []
        while (reply := outbox.take(0)) is not None:
            replies.append(reply)
        by_seq = {r["seq"]: r for r in replies}
        assert by_seq[1]["type"] == "drop" and by_seq[1]["reason"] == "backlog"
        assert by_seq[0]["type"] == by_seq[2]["type"] == "result"
        assert by_seq[2]["dropped"] == 1, "the drop counted meanwhile is kept"
        assert handle.state["fps"] == 30.0, "the first frame's fps is the stream's"
    finally:
        release.set()
        hub.close()
