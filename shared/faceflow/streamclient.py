"""`faceflow stream`: play a video file as a live source to a stream server and measure it.

    stats = play("clip.mp4", "ws://127.0.0.1:8080/v1/stream", output="out.mp4")
    print(stats.summary())

The file is decoded (PyAV) and each frame JPEG-encoded within the protocol's limits
(faceflow.stream: at most MAX_JPEG_BYTES, at most 1080p; the quality is lowered, then the
frame reduced, until it fits), then sent at the frame rate, as a camera would: frame i leaves at
i / fps seconds. Transports, by the URL's scheme:

* `ws://` / `wss://`: a WebSocket, `faceflow serve`'s /v1/stream or the deployed API. Text
  messages by default, cut into WebSocket frames of at most 32 KiB (what API Gateway takes);
  `binary=True` sends the binary form (serve only: API Gateway refuses binary frames).
* `grpc://HOST:PORT`: the GPU container's gRPC service (shared/faceflow/stream.proto).

Backpressure, on the client's side: at most `window` frames are in flight (sent, not yet
answered). A frame whose time comes while the window is full is not sent: it is dropped and
counted, as a camera drops frames, so the delay cannot grow; the server drops too when its own
queue is full and says so (a "drop" reply), and both counts are reported.

What comes back is written (with `output`) as a video at the source's rate, one frame per frame
played: a frame with no result (dropped, refused) repeats the last anonymised one, or is black
before the first, so no frame of the source is ever written unmasked. The file appears only
when complete.

Reported: per-frame latency (send to reply) p50, p95 and max; frames done, dropped (client and
server) and refused; the sustained rate (results per second from the first send to the last
reply).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

import cv2
import numpy as np

from . import stream
from .images import BadInput

DEFAULT_WINDOW = 4          # frames in flight at most
FINAL_WAIT_S = 10.0         # how long the replies to the last frames are waited for
MIN_SIDE = 64               # a frame is never reduced below this to fit the JPEG limit
PREPARED_AHEAD = 8          # frames decoded and encoded ahead of their time
# A frame sent and not answered within this many seconds no longer holds its place in the
# window (a server may drop a frame without a reply when the client reads too slowly; over
# API Gateway a reply can be lost): it counts as unanswered, and a reply after that is ignored.
REPLY_TIMEOUT_S = 5.0


@dataclass
class SourceFrame:
    jpeg: bytes
    width: int
    height: int


# --- the source -------------------------------------------------------------------------------
def encode_jpeg(bgr: np.ndarray, quality: int = stream.DEFAULT_QUALITY,
                max_bytes: int = stream.MAX_JPEG_BYTES, max_pixels: int = stream.MAX_FRAME_PIXELS) -> SourceFrame:
    """A frame as a JPEG the protocol takes: reduced to at most `max_pixels`, then the quality
    lowered (to stream.MIN_QUALITY) and the frame reduced further until it is at most
    `max_bytes`."""
    height, width = bgr.shape[:2]
    if width * height > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        bgr = cv2.resize(bgr, (max(1, int(width * scale)), max(1, int(height * scale))), interpolation=cv2.INTER_AREA)
    while True:
        q = quality
        while True:
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, q])
            if not ok:
                raise BadInput("a frame could not be encoded as JPEG")
            if buf.size <= max_bytes:
                return SourceFrame(buf.tobytes(), bgr.shape[1], bgr.shape[0])
            if q <= stream.MIN_QUALITY:
                break
            q = max(stream.MIN_QUALITY, q - 10)
        height, width = bgr.shape[:2]
        if min(width, height) * 0.8 < MIN_SIDE:
            raise BadInput(f"a {width}x{height} frame does not fit in {max_bytes} bytes of JPEG")
        bgr = cv2.resize(bgr, (int(width * 0.8), int(height * 0.8)), interpolation=cv2.INTER_AREA)


def source_rate(src: Path | str) -> float:
    """The video's frame rate (its average), for playing it at its own pace."""
    from .pipeline import open_input
    with open_input(src) as container:
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
        return float(rate) if rate else stream.DEFAULT_FPS


def read_frames(src: Path | str, quality: int = stream.DEFAULT_QUALITY, max_bytes: int = stream.MAX_JPEG_BYTES,
                limit: int | None = None) -> Iterator[SourceFrame]:
    """The video's frames, upright, as JPEGs within the limits (decoded lazily)."""
    from .pipeline import open_input
    container = open_input(src)
    try:
        video = container.streams.video[0]
        video.thread_type = "AUTO"
        n = 0
        try:
            for frame in container.decode(video):
                if limit is not None and n >= limit:
                    return
                bgr = frame.to_ndarray(format="bgr24")
                turns = int(round(getattr(frame, "rotation", 0) or 0)) % 360 // 90
                if turns:  # stored turned: sent as seen
                    bgr = np.ascontiguousarray(np.rot90(bgr, turns))
                yield encode_jpeg(bgr, quality, max_bytes)
                n += 1
        except Exception as exc:
            import av
            if isinstance(exc, av.error.FFmpegError):
                raise BadInput(f"video decoding failed: {exc}") from None
            raise
    finally:
        container.close()


class _Prepared:
    """`frames` made on a thread, a few ahead of their time (a bounded queue)."""
    _END = object()

    def __init__(self, frames: Iterable[SourceFrame]):
        self._queue: queue.Queue = queue.Queue(maxsize=PREPARED_AHEAD)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(frames,), daemon=True, name="faceflow-stream-source")
        self._thread.start()

    def _run(self, frames) -> None:
        try:
            for frame in frames:
                while not self._stop.is_set():
                    try:
                        self._queue.put(frame, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if self._stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - raised in the caller
            self.error = exc
        finally:
            while not self._stop.is_set():
                try:
                    self._queue.put(self._END, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def next(self, timeout: float = 0.5):
        """The next frame, None at the end; raises what the reading thread raised."""
        while True:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return None
            return item

    def close(self) -> None:
        """Stop and wait for the reading thread: one left running in OpenCV or FFmpeg as the
        interpreter exits aborts the process."""
        self._stop.set()
        self._thread.join(timeout=10)


# --- transports -----------------------------------------------------------------------------
def sigv4_headers(url: str, region: str | None = None) -> dict[str, str]:
    """Headers that sign a WebSocket connect to `url` with the AWS credentials botocore finds
    (the deployed API's $connect with AuthMode IAM): SigV4 for execute-api, the region from
    the host name (ID.execute-api.REGION.amazonaws.com) or AWS_REGION."""
    import os
    try:
        import botocore.session
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
    except ImportError:
        raise BadInput("signing needs botocore (pip install 'faceflow[functions]')") from None
    parts = urlsplit(url)
    host = parts.hostname or ""
    labels = host.split(".")
    region = region or (labels[2] if len(labels) > 3 and labels[1] == "execute-api" else None) \
        or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise BadInput(f"{url}: cannot tell the AWS region to sign for (set AWS_REGION)")
    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise BadInput("no AWS credentials found to sign the connect")
    request = AWSRequest(method="GET", url=parts._replace(scheme="https" if parts.scheme == "wss" else "http").geturl())
    SigV4Auth(credentials, "execute-api", region).add_auth(request)
    return {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-amz-date",
                                                                      "x-amz-security-token")}


class _WebSocketLink:
    def __init__(self, url: str, binary: bool, headers: dict[str, str] | None = None):
        self.url, self.binary, self.headers, self.ws = url, binary, headers or {}, None

    async def connect(self) -> None:
        import websockets
        # Replies carry the frame: room for a whole message of the protocol and more. No
        # per-message deflate: JPEG does not compress (and API Gateway offers none).
        try:
            self.ws = await websockets.connect(self.url, max_size=4 * stream.MESSAGE_LIMIT_BYTES,
                                               open_timeout=10, ping_interval=None, compression=None,
                                               additional_headers=self.headers or None)
        except websockets.exceptions.InvalidHandshake as exc:  # e.g. 401/403: not authorised
            raise ConnectionError(f"the server refused the WebSocket connection: {exc}") from None

    async def send(self, message: stream.FrameMessage) -> None:
        data = stream.encode_frame(message, binary=self.binary)
        if self.binary:
            await self.ws.send(data)
        else:
            # API Gateway takes WebSocket frames of at most 32 KiB: one message, fragmented.
            parts = stream.fragments(data)
            await self.ws.send(parts[0] if len(parts) == 1 else iter(parts))

    async def recv(self) -> dict[str, Any] | None:
        import websockets
        try:
            return stream.decode_reply(await self.ws.recv())
        except websockets.ConnectionClosed:
            return None

    async def done_sending(self) -> None:
        pass  # a WebSocket has no half-close: the client closes once its replies are in

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class _GrpcLink:
    def __init__(self, target: str):
        self.target, self.channel, self.call = target, None, None

    async def connect(self) -> None:
        import grpc

        from . import stream_pb2_grpc
        limit = 4 * stream.MESSAGE_LIMIT_BYTES
        self.channel = grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout=10)
        except asyncio.TimeoutError:
            raise ConnectionError(f"no gRPC server answered at {self.target} within 10 s") from None
        self.call = stream_pb2_grpc.FaceStreamStub(self.channel).Stream()

    async def send(self, message: stream.FrameMessage) -> None:
        from .streamgrpc import frame_to_proto
        await self.call.write(frame_to_proto(message))

    async def recv(self) -> dict[str, Any] | None:
        import grpc

        from .streamgrpc import reply_from_proto
        try:
            reply = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise ConnectionError(f"gRPC stream failed: {exc.code().name}: {exc.details()}") from None
        return None if reply is grpc.aio.EOF else reply_from_proto(reply)

    async def done_sending(self) -> None:
        await self.call.done_writing()

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close()


def link_for(url: str, binary: bool = False, headers: dict[str, str] | None = None):
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss"):
        return _WebSocketLink(url, binary, headers)
    if parts.scheme == "grpc":
        if not parts.hostname or not parts.port:
            raise BadInput(f"{url}: a gRPC URL is grpc://HOST:PORT")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return _GrpcLink(f"{host}:{parts.port}")
    raise BadInput(f"{url}: the stream URL must be ws://, wss:// or grpc://")


# --- statistics -----------------------------------------------------------------------------
@dataclass
class Stats:
    frames: int = 0                 # frames of the source played
    sent: int = 0
    done: int = 0                   # results received
    client_dropped: int = 0         # not sent: the window was full
    server_dropped: int = 0         # "drop" replies
    server_drop_total: int = 0      # the server's own count (the latest reply's `dropped`)
    refused: int = 0                # "error" replies
    unanswered: int = 0             # sent, no reply within REPLY_TIMEOUT_S or by the end
    max_in_flight: int = 0          # the most frames sent and not yet answered at once
    faces: int = 0                  # faces in the results
    latencies_ms: list[float] = field(default_factory=list)
    drop_reasons: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_send: float | None = None
    last_reply: float | None = None

    def percentile(self, p: float) -> float | None:
        return float(np.percentile(self.latencies_ms, p)) if self.latencies_ms else None

    @property
    def dropped(self) -> int:
        return self.client_dropped + self.server_dropped

    @property
    def sustained_fps(self) -> float:
        if not self.done or self.first_send is None or self.last_reply is None:
            return 0.0
        return self.done / max(1e-6, self.last_reply - self.first_send)

    def to_dict(self) -> dict[str, Any]:
        def r(v):
            return None if v is None else round(v, 1)
        return {"frames": self.frames, "sent": self.sent, "done": self.done, "dropped": self.dropped,
                "client_dropped": self.client_dropped, "server_dropped": self.server_dropped,
                "server_drop_total": self.server_drop_total, "refused": self.refused,
                "unanswered": self.unanswered, "faces": self.faces, "drop_reasons": self.drop_reasons,
                "errors": self.errors, "p50_ms": r(self.percentile(50)), "p95_ms": r(self.percentile(95)),
                "max_ms": r(max(self.latencies_ms) if self.latencies_ms else None),
                "fps": round(self.sustained_fps, 2)}

    def summary(self) -> str:
        d = self.to_dict()
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.drop_reasons.items()))
        lines = [f"frames {d['frames']}: {d['done']} done, {d['dropped']} dropped "
                 f"(client {d['client_dropped']}, server {d['server_dropped']}{': ' + reasons if reasons else ''}), "
                 f"{d['refused']} refused, {d['unanswered']} unanswered",
                 "latency ms: " + ("p50 {p50_ms}  p95 {p95_ms}  max {max_ms}".format(**d) if self.latencies_ms
                                   else "no results"),
                 f"sustained {d['fps']} fps"]
        if self.errors:
            lines.append("refused: " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())))
        return "\n".join(lines)


# --- the output -----------------------------------------------------------------------------
class _VideoOut:
    """The returned frames, in order, as an H.264 video (PyAV) written beside `dst` under a
    temporary name and renamed into place by `finish`."""
    _END = object()

    def __init__(self, dst: Path, fps: float):
        self.dst, self.fps = Path(dst), fps
        self.tmp = self.dst.with_name(f".{self.dst.stem}.{uuid.uuid4().hex[:8]}.part{self.dst.suffix}")
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="faceflow-stream-write")
        self.thread.start()

    def put(self, jpeg: bytes | None, size: tuple[int, int]) -> None:
        """The next frame: a returned JPEG, or None (repeat the last one; black before it)."""
        if self.error is not None:
            raise self.error
        self.queue.put((jpeg, size))

    def _run(self) -> None:
        import av
        out = stream_out = None
        last = None
        try:
            while True:
                item = self.queue.get()
                if item is self._END:
                    break
                jpeg, (width, height) = item
                bgr = None if jpeg is None else cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                if bgr is None:
                    bgr = last if last is not None else np.zeros((height, width, 3), np.uint8)
                if out is None:
                    self.dst.parent.mkdir(parents=True, exist_ok=True)
                    out = av.open(str(self.tmp), "w")
                    stream_out = out.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
                    stream_out.width, stream_out.height = bgr.shape[1], bgr.shape[0]
                    stream_out.pix_fmt = "yuv420p" if bgr.shape[1] % 2 == 0 and bgr.shape[0] % 2 == 0 else "yuv444p"
                    stream_out.options = {"crf": "20", "preset": "veryfast"}
                if bgr.shape[:2] != (stream_out.height, stream_out.width):
                    bgr = cv2.resize(bgr, (stream_out.width, stream_out.height), interpolation=cv2.INTER_AREA)
                last = bgr
                frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
                for packet in stream_out.encode(frame):
                    out.mux(packet)
                self.written += 1
            if out is not None:
                for packet in stream_out.encode():
                    out.mux(packet)
                out.close()
                out = None
        except BaseException as exc:  # noqa: BLE001 - raised by finish()
            self.error = exc
            while True:  # unblock the producer
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
        finally:
            if out is not None:
                try:
                    out.close()
                except Exception:  # noqa: BLE001 - being thrown away
                    pass

    def finish(self) -> None:
        self.queue.put(self._END)
        self.thread.join()
        if self.error is not None:
            self.abort()
            raise self.error
        if self.written:
            self.tmp.replace(self.dst)

    def abort(self) -> None:
        if self.thread.is_alive():
            try:
                self.queue.put_nowait(self._END)
            except queue.Full:
                pass
            self.thread.join(timeout=5)
        self.tmp.unlink(missing_ok=True)


# --- playing ----------------------------------------------------------------------------------
async def play_async(frames: Iterable[SourceFrame], url: str, *, fps: float = stream.DEFAULT_FPS,
                     output: Path | str | None = None, return_frames: bool = False, window: int = DEFAULT_WINDOW,
                     binary: bool = False, method: str = "blur", quality: int = stream.DEFAULT_QUALITY,
                     final_wait_s: float = FINAL_WAIT_S, headers: dict[str, str] | None = None,
                     reply_timeout_s: float = REPLY_TIMEOUT_S) -> Stats:
    """Send `frames` to `url` at `fps` and gather the replies; see the module's docstring."""
    if window < 1:
        raise ValueError("window must be at least 1")
    if not 0 < fps <= stream.MAX_FPS:
        raise BadInput(f"fps must be above 0 and at most {stream.MAX_FPS:g}")
    return_frames = return_frames or output is not None
    link = link_for(url, binary, headers)
    stats = Stats()
    in_flight: dict[int, float] = {}      # seq -> when it was sent
    settled: dict[int, bytes | None] = {}  # seq -> the returned JPEG (None: none) until written
    sizes: dict[int, tuple[int, int]] = {}
    writer = _VideoOut(Path(output), fps) if output is not None else None
    next_write = 0
    sending_done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def settle(seq: int, jpeg: bytes | None) -> None:
        nonlocal next_write
        if writer is None:
            return
        settled[seq] = jpeg
        while next_write in settled:
            writer.put(settled.pop(next_write), sizes.pop(next_write))
            next_write += 1

    async def receive() -> None:
        while True:
            reply = await link.recv()
            if reply is None:
                return
            now = loop.time()
            seq = reply.get("seq")
            sent_at = in_flight.pop(seq, None) if isinstance(seq, int) else None
            stats.server_drop_total = max(stats.server_drop_total, int(reply.get("dropped") or 0))
            kind = reply.get("type")
            if sent_at is None:
                continue  # a frame given up on (REPLY_TIMEOUT_S), or a second answer to one
            if kind == stream.RESULT:
                stats.done += 1
                stats.faces += len(reply.get("faces", ()))
                stats.latencies_ms.append((now - sent_at) * 1000)
                stats.last_reply = now
                settle(seq, reply.get("jpeg"))
            elif kind == stream.DROP:
                stats.server_dropped += 1
                reason = str(reply.get("reason"))
                stats.drop_reasons[reason] = stats.drop_reasons.get(reason, 0) + 1
                settle(seq, None)
            else:
                stats.refused += 1
                code = str(reply.get("code"))
                stats.errors[code] = stats.errors.get(code, 0) + 1
                settle(seq, None)
            if sending_done.is_set() and not in_flight:
                return

    source = receiver = None
    try:
        await link.connect()
        source = _Prepared(frames)  # decoding starts once the server is there
        receiver = asyncio.create_task(receive())
        start = loop.time()
        seq = 0
        while True:
            frame = await asyncio.to_thread(source.next)
            if frame is None:
                break
            due = start + seq / fps
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiver.done():
                receiver.result()  # raises what ended it
                raise ConnectionError("the server closed the stream")
            stats.frames += 1
            for old in [s for s, sent in in_flight.items() if loop.time() - sent > reply_timeout_s]:
                del in_flight[old]
                stats.unanswered += 1
                settle(old, None)
            if writer is not None:
                sizes[seq] = (frame.width, frame.height)
            if len(in_flight) >= window:
                stats.client_dropped += 1
                settle(seq, None)
            else:
                now = loop.time()
                in_flight[seq] = now
                stats.max_in_flight = max(stats.max_in_flight, len(in_flight))
                stats.first_send = now if stats.first_send is None else stats.first_send
                await link.send(stream.FrameMessage(seq, seq / fps, frame.jpeg, return_frames, method, quality, fps))
                stats.sent += 1
            seq += 1
        sending_done.set()
        await link.done_sending()
        if in_flight:
            try:
                await asyncio.wait_for(asyncio.shield(receiver), timeout=final_wait_s)
            except asyncio.TimeoutError:
                pass
        stats.unanswered += len(in_flight)
        for left in sorted(in_flight):
            settle(left, None)
        in_flight.clear()
        if writer is not None:
            for left in sorted(sizes):  # anything not yet settled (nothing, normally)
                settle(left, None)
            await asyncio.to_thread(writer.finish)
            writer = None
        return stats
    finally:
        if receiver is not None:
            receiver.cancel()
        await link.close()
        if source is not None:
            await asyncio.to_thread(source.close)
        if writer is not None:
            writer.abort()


def play(src: Path | str, url: str, *, output: Path | str | None = None, fps: float | None = None,
         return_frames: bool = False, limit: int | None = None, window: int = DEFAULT_WINDOW,
         binary: bool = False, quality: int = stream.DEFAULT_QUALITY,
         headers: dict[str, str] | None = None) -> Stats:
    """Play the video file `src` to `url` (see the module's docstring); `headers` go with a
    WebSocket connect (the deployed API's authorisation: a JWT as `Authorization: Bearer`, or
    `sigv4_headers(url)`)."""
    src = Path(src)
    rate = fps or source_rate(src)
    if output is not None and Path(output).resolve() == src.resolve():
        raise BadInput("output would overwrite the input")
    frames = read_frames(src, quality=quality, limit=limit)
    return asyncio.run(play_async(frames, url, fps=rate, output=output, return_frames=return_frames,
                                  window=window, binary=binary, quality=quality, headers=headers))
