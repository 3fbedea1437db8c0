"""`faceflow stream` (faceflow.streamclient) against `faceflow serve`'s WebSocket route
(faceflow.web.stream_route) and the gRPC service, over loopback: the video written back has every
frame, masked; backpressure drops frames on both sides instead of queueing them; refusals are
clear."""
from __future__ import annotations

import asyncio
import json
import threading

import cv2
import numpy as np
import pytest

pytest.importorskip("aiohttp", reason="aiohttp not installed: pip install -e '.[stream]'")
pytest.importorskip("websockets", reason="websockets not installed: pip install -e '.[stream]'")

from conftest import run_cli  # noqa: E402
from stream_scene import (SlowEngine, count_frames, face_changed, face_of, jpeg, scene_frame,  # noqa: E402
                          write_clip)

from faceflow import stream  # noqa: E402
from faceflow.images import BadInput  # noqa: E402
from faceflow.streamclient import encode_jpeg, play, play_async, read_frames  # noqa: E402

CLIP_FRAMES = 30


@pytest.fixture(scope="module")
def face(astronaut_bgr):
    return face_of(astronaut_bgr)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, face):
    return write_clip(tmp_path_factory.mktemp("clip") / "scene.mp4", face, CLIP_FRAMES)


class Serve:
    """serve's stream route on an aiohttp app of its own, in a thread, on a free loopback port."""

    def __init__(self, engine, depth: int = 2, guarded_by: str | None = None):
        from aiohttp import web

        from faceflow.web.stream_route import add_stream_route, handle_stream
        self.app = web.Application()
        add_stream_route(self.app, engine, depth=depth)
        if guarded_by is not None:  # /guarded: the route behind an Authorization check
            async def guarded(request):
                if request.headers.get("Authorization") != guarded_by:
                    raise web.HTTPUnauthorized()
                return await handle_stream(request)
            self.app.router.add_get("/guarded", guarded)
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(30), "the route did not start"

    def _run(self):
        from aiohttp import web
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.started.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def serve(engine):
    server = Serve(engine)
    yield server
    server.stop()


def test_encoded_frames_fit_the_protocol():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2160, 3840, 3), np.uint8)  # 4K noise: no JPEG of it is small
    frame = encode_jpeg(noise)
    assert len(frame.jpeg) <= stream.MAX_JPEG_BYTES
    assert frame.width * frame.height <= stream.MAX_FRAME_PIXELS
    assert cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (frame.height,
                                                                                          frame.width)
    small = encode_jpeg(np.full((360, 640, 3), 90, np.uint8))
    assert (small.width, small.height) == (640, 360), "a frame that fits is sent as it is"
    with pytest.raises(BadInput, match="does not fit"):
        encode_jpeg(noise[:200, :200], max_bytes=100)


def test_played_through_serve_writes_every_frame_masked(serve, clip, tmp_path, face):
    out = tmp_path / "out.mp4"
    stats = play(clip, serve.url, output=out, fps=25)
    assert stats.frames == CLIP_FRAMES and stats.unanswered == 0 and stats.refused == 0
    assert stats.done + stats.dropped == CLIP_FRAMES
    assert stats.done >= CLIP_FRAMES // 2 and len(stats.latencies_ms) == stats.done
    assert stats.faces >= stats.done, "the face is in every result"
    assert count_frames(out) == CLIP_FRAMES, "one frame written per frame played"
    assert not list(tmp_path.glob(".*part*")), "no temporary file left"
    import av
    with av.open(str(out)) as container:
        written = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    for i in (CLIP_FRAMES // 2, CLIP_FRAMES - 1):
        x = 200 + 2 * i
        box = (x + 40, 130, 100, 110)  # inside the face
        assert face_changed(scene_frame(face, i), written[i], box) > 0.5, f"frame {i} is not masked"


def test_faceflow_serve_offers_the_route(clip, tmp_path):
    """The real `faceflow serve` (a process, as a user starts it): `faceflow stream` against
    its /v1/stream writes a video with every frame; the other routes still answer."""
    pytest.importorskip("aws_lambda_powertools", reason="faceflow serve needs the serve extra")
    from serve_process import ServeProcess
    with ServeProcess(tmp_path / "serve") as server:
        out = tmp_path / "served.mp4"
        proc = run_cli("stream", clip, "--to", f"ws://127.0.0.1:{server.port}/v1/stream", "-o", out, "--json")
        assert proc.returncode == 0, proc.stderr + server.log.read_text(errors="replace")[-2000:]
        stats = json.loads(proc.stdout)
        assert stats["frames"] == CLIP_FRAMES and stats["unanswered"] == 0 and stats["refused"] == 0
        assert stats["done"] >= 1 and stats["faces"] >= stats["done"]
        assert count_frames(out) == CLIP_FRAMES
        status, _, _ = server.request("GET", "/v1/openapi.json")
        assert status == 200


def test_binary_messages_and_faces_only(serve, clip):
    stats = play(clip, serve.url, fps=25, binary=True, limit=10)
    assert stats.frames == 10 and stats.done + stats.dropped == 10 and stats.refused == 0
    assert stats.faces >= stats.done


@pytest.mark.parametrize("window, depth", [(2, 2), (4, 1)])
def test_backpressure_drops_instead_of_queueing(engine, clip, window, depth):
    """A server that cannot keep up (its detector held back), frames sent at 50 fps: with a
    window no larger than the server's depth the client keeps at most `window` frames in
    flight and drops the rest itself; with a larger one the server drops (and says so at
    once, which frees the window). Either way every frame is accounted for, none waits
    unanswered at the end, and nothing queues beyond the window."""
    slow = Serve(SlowEngine(engine, 0.2), depth=depth)
    try:
        frames = list(read_frames(clip))
        stats = asyncio.run(play_async(frames, slow.url, fps=50, window=window))
    finally:
        slow.stop()
    assert stats.frames == CLIP_FRAMES
    assert stats.sent == CLIP_FRAMES - stats.client_dropped
    assert stats.done + stats.dropped + stats.refused + stats.unanswered == CLIP_FRAMES
    assert stats.unanswered == 0 and stats.refused == 0
    assert stats.max_in_flight <= window, "never more than the window in flight"
    assert stats.done < CLIP_FRAMES / 2, "a held-back server does a few frames, not all of them late"
    if window <= depth:
        assert stats.client_dropped > 0 and stats.server_dropped == 0
    else:
        assert stats.server_dropped > 0 and set(stats.drop_reasons) == {"backlog"}


def test_frames_the_protocol_refuses_are_answered_clearly(serve, face):
    """A raw client: an oversized frame, a malformed message and a non-JPEG each get an error
    reply naming the problem; the connection stays usable."""
    import websockets

    async def run():
        async with websockets.connect(serve.url, max_size=None) as ws:
            replies = []
            good = stream.FrameMessage(3, 0.12, jpeg(scene_frame(face, 3)), return_frame=False)
            for data in (json.dumps({"v": 1, "type": "frame", "seq": 0, "timestamp": 0,
                                     "jpeg": "A" * (stream.MESSAGE_LIMIT_BYTES + 10)}),
                         "{not json",
                         stream.encode_frame(stream.FrameMessage(2, 0.08, b"GIF89a...")),
                         stream.encode_frame(good)):
                await ws.send(data)
                replies.append(stream.decode_reply(await asyncio.wait_for(ws.recv(), 30)))
            return replies

    too_large, malformed, not_jpeg, result = asyncio.run(run())
    assert (too_large["type"], too_large["code"]) == ("error", "too_large")
    assert (malformed["type"], malformed["code"]) == ("error", "malformed")
    assert (not_jpeg["type"], not_jpeg["code"]) == ("error", "bad_image")
    assert result["type"] == "result" and result["seq"] == 3 and len(result["faces"]) == 1
    assert result["dropped"] == 3


def test_played_through_grpc(engine, clip, tmp_path):
    pytest.importorskip("grpc", reason="grpcio not installed: pip install -e '.[stream]'")
    pytest.importorskip("aws_lambda_powertools", reason="Powertools not installed: pip install -e '.[functions]'")
    from functions.gpu import stream_server
    server, port, svc = stream_server.serve(lambda: engine, "127.0.0.1", 0)
    try:
        out = tmp_path / "grpc.mp4"
        stats = play(clip, f"grpc://127.0.0.1:{port}", output=out, fps=25)
    finally:
        server.stop(grace=1).wait()
        svc.close()
    assert stats.frames == CLIP_FRAMES and stats.unanswered == 0 and stats.refused == 0
    assert stats.done + stats.dropped == CLIP_FRAMES and stats.done >= CLIP_FRAMES // 2
    assert count_frames(out) == CLIP_FRAMES


def test_cli_prints_the_statistics(serve, clip, tmp_path):
    proc = run_cli("stream", clip, "--to", serve.url, "--frames", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["frames"] == 8 and stats["done"] + stats["dropped"] == 8
    assert {"p50_ms", "p95_ms", "max_ms", "fps", "dropped"} <= set(stats)
    text = run_cli("stream", clip, "--to", serve.url, "--frames", "4")
    assert text.returncode == 0 and "latency ms: p50" in text.stdout and "sustained" in text.stdout


def test_cli_refuses_bad_urls_and_inputs(clip, tmp_path):
    bad_scheme = run_cli("stream", clip, "--to", "http://127.0.0.1:1/v1/stream")
    assert bad_scheme.returncode == 2 and "ws://, wss:// or grpc://" in bad_scheme.stderr
    missing = run_cli("stream", tmp_path / "nope.mp4", "--to", "ws://127.0.0.1:1/v1/stream")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    from devstack.procs import free_port
    refused = run_cli("stream", clip, "--to", f"ws://127.0.0.1:{free_port()}/v1/stream", "-o", tmp_path / "o.mp4")
    assert refused.returncode == 1 and "cannot stream to" in refused.stderr
    assert not list(tmp_path.iterdir()), "nothing written when the stream never started"


def test_authorisation_headers_go_with_the_connect(engine, clip):
    """--token (a JWT, as the deployed API's JWT mode wants it) is sent as Authorization:
    Bearer; without it the connect is refused and the command says so."""
    server = Serve(engine, guarded_by="Bearer good-token")
    try:
        url = server.url.replace("/v1/stream", "/guarded")
        refused = run_cli("stream", clip, "--to", url, "--frames", "3")
        assert refused.returncode == 1 and "cannot stream to" in refused.stderr and "401" in refused.stderr
        ok = run_cli("stream", clip, "--to", url, "--frames", "3", "--json", env={"FACEFLOW_TOKEN": "good-token"})
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["frames"] == 3
    finally:
        server.stop()


def test_sigv4_headers_sign_for_execute_api(monkeypatch):
    pytest.importorskip("botocore", reason="botocore not installed: pip install -e '.[functions]'")
    from faceflow.streamclient import sigv4_headers
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    headers = sigv4_headers("wss://abc123.execute-api.eu-west-1.amazonaws.com/v1")
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/execute-api/aws4_request" in headers["Authorization"]
    assert "X-Amz-Date" in headers
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(BadInput, match="region"):
        sigv4_headers("ws://127.0.0.1:9/v1")


def test_played_through_the_deployed_path(clip, tmp_path, model_dir):
    """The deployed WebSocket API, locally: devstack's API Gateway stand-in (text messages,
    32 KiB frames, 128 KiB messages, replies through @connections) in front of two stream
    function processes with their state in Redis. Every frame comes back and is written."""
    from conftest import require_services
    require_services()
    import devstack
    with devstack.Stack(functions=("stream",), function_env={"FACEFLOW_MODEL_DIR": str(model_dir)}) as stack:
        out = tmp_path / "deployed.mp4"
        stats = play(clip, stack.websocket_url, output=out, fps=10,
                     headers={"Authorization": f"Bearer {devstack.make_jwt('stream-user')}"})
    assert stats.frames == CLIP_FRAMES and stats.unanswered == 0 and stats.refused == 0
    assert stats.done + stats.dropped == CLIP_FRAMES and stats.done >= CLIP_FRAMES // 2
    assert stats.faces >= stats.done
    assert count_frames(out) == CLIP_FRAMES


def test_replies_out_of_order_or_never(clip):
    """Over API Gateway two execution environments may answer out of order, and a reply can
    be lost: every result counts whatever its order, and a frame never answered stops holding
    its place in the window after the reply timeout (then counts as unanswered)."""
    from aiohttp import WSMsgType, web

    held = {}

    async def misbehaving(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = stream.parse_message(msg.data)
            reply = stream.encode_reply({"v": 1, "type": "result", "seq": frame.seq, "timestamp": frame.timestamp,
                                         "status": "ok", "faces": [], "width": 640, "height": 360, "dropped": 0})
            if frame.seq == 1:
                continue                      # lost
            if frame.seq == 2:
                held[2] = reply               # answered after frame 3
                continue
            await ws.send_str(reply)
            if frame.seq == 3:
                await ws.send_str(held.pop(2))
        return ws

    async def run():
        app = web.Application()
        app.router.add_get("/s", misbehaving)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            frames = list(read_frames(clip, limit=12))
            return await play_async(frames, f"ws://127.0.0.1:{port}/s", fps=25, window=3, reply_timeout_s=0.2,
                                    final_wait_s=2)
        finally:
            await runner.cleanup()

    stats = asyncio.run(run())
    assert stats.frames == 12 and stats.unanswered == 1, stats.to_dict()
    assert stats.done + stats.client_dropped == 11 and stats.server_dropped == 0
    assert stats.done >= 6, "the lost frame holds the window for the reply timeout only"
