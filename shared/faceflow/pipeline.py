"""The video pipeline: decode → detect → track → operate → encode, in one loop (`run`).

    reader = Reader(segments, layout)                    # decodes on its own thread
    writer = Writer(dst, layout, encoding, audio_in)     # encodes and muxes on its own thread
    tally = run(engine, reader, tracker, Mask(), writer, tally)

Every video path calls `run`: a whole file; a chunk of a longer one (a warm-up segment before
its own frames and a look-ahead segment after them, both tracked, never written); a stream
session (the tracker restored from the previous chunk's state); the GPU worker (a larger
detector batch). They differ in the reader's segments and the tracker they pass, nothing else.

Speed: decoding, detecting and encoding run on three threads (PyAV and onnxruntime release
the GIL, so they overlap on two cores); the queues between them are bounded, so memory stays
flat whatever the video's length. Frames stay in the encoder's YUV layout from decode to
encode: the detector gets a reduced BGR copy that swscale makes in one step (scale and
convert), and masks are drawn on the YUV planes; no full-size frame goes to BGR and back.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import av
import numpy as np

from .face import Face
from .images import BadInput
from .tracker import Tracker

OWN, WARMUP, AHEAD = "own", "warmup", "ahead"   # a frame's role: written, or only tracked
READ_AHEAD = 6      # decoded frames waiting for the detector, besides one batch
WRITE_BEHIND = 6    # finished frames waiting for the encoder
# Audio codecs an MP4/MOV can hold as they are; anything else is re-encoded to AAC.
MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}


# --- frames ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How frames look from decode to encode: the upright size, the pixel format the encoder
    takes, the rotation undone and the reduced size the detector is given."""
    width: int
    height: int
    rotation: int          # degrees the stored frames are turned (counter-clockwise) to be upright
    pix_fmt: str
    detect_width: int
    detect_height: int

    @classmethod
    def of(cls, width: int, height: int, rotation: int, detect_side: int) -> "Layout":
        """`width` x `height`: the upright size. H.264 in 4:2:0 cannot hold an odd width or
        height (its chroma is halved and its crop unit is 2 pixels): such video is written
        in 4:4:4, which keeps the size exactly; any other in 4:2:0, what every player plays."""
        pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        scale = min(1.0, detect_side / max(width, height))
        return cls(width, height, rotation, pix_fmt,
                   max(1, round(width * scale)), max(1, round(height * scale)))

    @property
    def subsampling(self) -> tuple[int, int]:
        return (2, 2) if self.pix_fmt == "yuv420p" else (1, 1)

    @property
    def detect_scale(self) -> float:
        """Full-size pixels per detector pixel."""
        return self.width / self.detect_width

    def stored(self, width: int, height: int) -> tuple[int, int]:
        """A size in the stored (not yet upright) orientation."""
        return (height, width) if self.rotation in (90, 270) else (width, height)

    def planes(self, data: np.ndarray) -> list[np.ndarray]:
        """Y, U, V views of one frame's pixels (written in place by operations)."""
        if self.pix_fmt == "yuv444p":
            return [data[0], data[1], data[2]]
        w, h = data.shape[1], data.shape[0] * 2 // 3
        # The planes lie one after the other; a chroma plane need not fill whole rows of
        # `data` (a height of 4k + 2: 270, 510), so they are cut from the flat pixels.
        flat, quarter = data.reshape(-1), (h // 2) * (w // 2)
        u = flat[h * w:h * w + quarter].reshape(h // 2, w // 2)
        v = flat[h * w + quarter:].reshape(h // 2, w // 2)
        return [data[:h], u, v]

    def pack(self, planes: list[np.ndarray]) -> np.ndarray:
        if self.pix_fmt == "yuv444p":
            return np.ascontiguousarray(np.stack(planes))
        h, w = planes[0].shape
        return np.concatenate([p.ravel() for p in planes]).reshape(h * 3 // 2, w)


@dataclass
class Frame:
    """One decoded frame on its way through the pipeline."""
    role: str
    index: int                    # in the whole video
    seconds: float                # on the video's timeline
    duration: float
    pts: int | None
    time_base: Fraction | None
    small: np.ndarray             # reduced upright BGR for the detector
    data: np.ndarray | None       # upright pixels in Layout.pix_fmt (frames to be written)
    faces: list[Face] = field(default_factory=list)


def operate(operation, frame: Frame, layout: Layout) -> None:
    """Apply `operation` to a frame's pixels in place: on the YUV planes when it can work
    there, else on a BGR copy written back."""
    if getattr(operation, "works_on_planes", False):
        operation.apply_planes(layout.planes(frame.data), layout.subsampling, frame.faces)
        return
    bgr = av.VideoFrame.from_ndarray(frame.data, format=layout.pix_fmt).to_ndarray(format="bgr24")
    operation.apply(bgr, frame.faces)
    back = av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format=layout.pix_fmt)
    frame.data[...] = back.to_ndarray()


# --- threads ---------------------------------------------------------------------------------
class _Worker:
    """A thread fed by (or feeding) a bounded queue; its exception surfaces in the caller."""
    _END = object()

    def __init__(self, target: Callable[[], None], depth: int, name: str):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(target,), name=name, daemon=True)

    def _main(self, target) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 — handed to the caller's thread
            self.error = exc
            self.stopped.set()
        finally:
            self.offer(self._END)

    def offer(self, item) -> bool:
        """Put `item`, waiting while the queue is full; False once the pipeline stops."""
        while True:
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self.stopped.is_set() and item is not self._END:
                    return False
                if self.stopped.is_set():
                    return True  # nobody reads any more: the end marker is not needed

    def take(self):
        """The next item, or the end marker once the pipeline stops (what is still queued
        then is dropped: an aborted file is deleted, so encoding it is wasted)."""
        while not self.stopped.is_set():
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                pass
        return self._END

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()


# --- reading ---------------------------------------------------------------------------------
@dataclass
class Segment:
    """Files played one after the other in one role; of their frames, `skip` are left out
    (decoded, never converted) and at most `limit` taken; `expect`: the count to check."""
    paths: list[Path]
    role: str = OWN
    skip: int = 0
    limit: int | None = None
    expect: int | None = None


def open_input(path: Path | str) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise BadInput("empty file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise BadInput(f"not a readable video: {exc}") from None
    if not container.streams.video:
        container.close()
        raise BadInput("no video stream in file")
    return container


class Reader:
    """Decodes the segments, in order, on a thread into a bounded queue of `Frame`s numbered
    from `first_index`. The own segment's audio packets go to `audio_sink` as they are
    demuxed."""

    def __init__(self, segments: list[Segment], layout: Layout, *, first_index: int = 0,
                 fps: float = 25.0, time_offset: float = 0.0, keep_pixels: bool = True,
                 depth: int = READ_AHEAD, opened: dict[Path, av.container.InputContainer] | None = None):
        self.segments, self.layout, self.fps = segments, layout, fps
        self.first_index, self.time_offset, self.keep_pixels = first_index, time_offset, keep_pixels
        self.audio_sink: Callable[[Any], None] | None = None
        # files the caller opened already (to read their streams, or to fail early): read
        # from there, not opened again; all are closed by close()
        self.opened = dict(opened or {})
        self.counts: dict[str, int] = {OWN: 0, WARMUP: 0, AHEAD: 0}
        self.worker = _Worker(self._decode, depth, "faceflow-decode")

    def __iter__(self) -> Iterator[Frame]:
        self.worker.thread.start()
        while True:
            item = self.worker.take()
            if item is _Worker._END:
                break
            yield item
        if self.worker.error is not None:
            raise self.worker.error

    def close(self) -> None:
        """Stop decoding; close the inputs (after the writer is done with their audio)."""
        self.worker.stop()
        for c in self.opened.values():
            c.close()
        self.opened = {}

    def _decode(self) -> None:
        index = self.first_index
        for seg in self.segments:
            n = taken = 0
            for path in seg.paths:
                if seg.limit is not None and taken >= seg.limit:
                    break
                container = self.opened.get(path)
                if container is None:
                    container = self.opened[path] = open_input(path)
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                audio = container.streams.audio[0] if (
                    seg.role == OWN and self.audio_sink and container.streams.audio) else None
                try:
                    for packet in container.demux(*([stream] + ([audio] if audio else []))):
                        if packet.stream is not stream:
                            if packet.size:
                                self.audio_sink(packet)
                            continue
                        for frame in packet.decode():
                            n += 1
                            if n <= seg.skip:
                                continue
                            if seg.limit is not None and taken >= seg.limit:
                                break
                            taken += 1
                            if not self.worker.offer(self._frame(frame, seg.role, index)):
                                return
                            index += 1
                        if seg.limit is not None and taken >= seg.limit:
                            break
                except av.error.InvalidDataError as exc:
                    raise BadInput(f"corrupt video data in {Path(path).name}: {exc}") from None
                except av.error.FFmpegError as exc:
                    raise BadInput(f"video decoding failed in {Path(path).name}: {exc}") from None
            if seg.expect is not None and taken != seg.expect:
                raise BadInput(f"{seg.role} files gave {taken} frames, not {seg.expect}")
            self.counts[seg.role] += taken

    def _frame(self, frame: av.VideoFrame, role: str, index: int) -> Frame:
        lay = self.layout
        k = lay.rotation // 90
        sw, sh = lay.stored(lay.detect_width, lay.detect_height)
        small = frame.reformat(width=sw, height=sh, format="bgr24", interpolation="AREA").to_ndarray()
        data = None
        if role == OWN and self.keep_pixels:
            w, h = lay.stored(lay.width, lay.height)
            data = frame.reformat(width=w, height=h, format=lay.pix_fmt).to_ndarray()
            if k:
                data = lay.pack([np.rot90(p, k) for p in lay.planes(data)])
        if k:
            small = np.ascontiguousarray(np.rot90(small, k))
        if frame.pts is not None and frame.time_base is not None:
            seconds = float(frame.pts * frame.time_base)
        else:
            seconds = index / self.fps
        if frame.duration and frame.time_base is not None:
            duration = float(frame.duration * frame.time_base)
        else:
            duration = 1.0 / self.fps if self.fps else 0.0
        return Frame(role, index, seconds + self.time_offset, duration, frame.pts, frame.time_base,
                     small, data)


# --- writing ---------------------------------------------------------------------------------
def mux_options(path: Path, time_base: Fraction, tagged: bool = False) -> dict[str, str]:
    """MP4/MOV keep a non-zero start (a chunk's original timestamps) in an edit list counted
    in the movie timescale, 1/1000 s by default: use the video's own so none is rounded.
    `tagged`: container metadata is written under its own keys (MP4/MOV drop keys they do
    not know otherwise)."""
    options = {}
    mp4 = path.suffix.lower() in (".mp4", ".mov", ".m4v", ".m4a")
    if mp4 and time_base and time_base.numerator == 1:
        options["movie_timescale"] = str(time_base.denominator)
    if mp4 and tagged:
        options["movflags"] = "use_metadata_tags"
    return options


def audio_stream(audio_in, out):
    """An output stream for `audio_in`: copied, or AAC where the container cannot hold it."""
    name = audio_in.codec_context.name
    if out.format.name.split(",")[0] in ("mp4", "mov") and name not in MP4_AUDIO:
        return out.add_stream("aac", rate=audio_in.codec_context.sample_rate)
    return out.add_stream_from_template(audio_in)


@dataclass
class Encoding:
    """How the video is encoded (the defaults are video.VideoOptions') and the timing every
    chunk of one video shares."""
    rate: Fraction
    time_base: Fraction
    codec: str
    preset: str
    crf: int
    bframes: int | None = None   # None: the encoder's default; chunks use 0 (dts == pts)
    threads: int = 0             # x264's threads; 0: its own choice


class Writer:
    """Encodes finished frames and muxes them, with the audio, into a temporary file beside
    `dst`, on its own thread; `finish()` renames it into place, `abort()` removes it.
    `metadata`: container tags (only a face swap's synthetic mark; none by default)."""

    def __init__(self, dst: Path | str, layout: Layout, encoding: Encoding, audio_in=None,
                 depth: int = WRITE_BEHIND, metadata: dict[str, str] | None = None):
        import uuid
        self.dst = Path(dst)
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dst.with_name(f".{self.dst.stem}.{uuid.uuid4().hex[:8]}.part{self.dst.suffix}")
        self.layout, self.time_base = layout, encoding.time_base
        self.durations: dict[int, int] = {}  # output pts -> frame duration, for the packets
        self.out = av.open(str(self.tmp), "w", options=mux_options(self.tmp, encoding.time_base, bool(metadata)))
        try:
            self.out.metadata.update(metadata or {})
            stream = self.out.add_stream(encoding.codec, rate=encoding.rate)
            stream.width, stream.height, stream.pix_fmt = layout.width, layout.height, layout.pix_fmt
            # Encode in the input's time base: rounding pts to 1/fps could merge frames.
            stream.time_base = stream.codec_context.time_base = encoding.time_base
            opts = {"crf": str(encoding.crf), "preset": encoding.preset}
            if encoding.bframes is not None:
                opts["bf"] = str(encoding.bframes)
            if encoding.threads:
                opts["threads"] = str(encoding.threads)
            stream.options = opts
            self.stream = stream
            self.audio_in = audio_in
            self.audio = None if audio_in is None else audio_stream(audio_in, self.out)
            self.reencode_audio = self.audio is not None and self.audio.codec_context.is_encoder \
                and self.audio.name != audio_in.codec_context.name
        except BaseException:
            self.abort()
            raise
        self.worker = _Worker(self._encode, depth, "faceflow-encode")
        self.worker.thread.start()

    def put(self, item: Frame | av.Packet) -> None:
        if self.worker.error is not None or not self.worker.offer(item):
            raise self.worker.error or BadInput("the encoder stopped")

    def finish(self) -> None:
        self.worker.offer(_Worker._END)
        self.worker.thread.join()
        if self.worker.error is not None:
            self.abort()
            raise self.worker.error
        try:
            self._mux(self.stream.encode())
            if self.reencode_audio:
                self.out.mux(self.audio.encode())
            self.out.close()
        except av.error.FFmpegError as exc:
            self.abort()
            raise BadInput(f"video encoding failed: {exc}") from None
        except BaseException:
            self.abort()
            raise
        self.out = None
        self.tmp.replace(self.dst)

    def abort(self) -> None:
        if getattr(self, "worker", None) is not None:
            self.worker.stop()
        if self.out is not None:
            try:
                self.out.close()
            except av.error.FFmpegError:
                pass  # being thrown away
            self.out = None
        self.tmp.unlink(missing_ok=True)

    def _encode(self) -> None:
        try:
            while True:
                item = self.worker.take()
                if item is _Worker._END:
                    return
                if isinstance(item, Frame):
                    self._mux(self.stream.encode(self._video_frame(item)))
                elif self.reencode_audio:
                    for frame in item.decode():
                        frame.pts = None
                        self.out.mux(self.audio.encode(frame))
                else:
                    item.stream = self.audio
                    self.out.mux(item)
        except av.error.FFmpegError as exc:
            raise BadInput(f"video encoding failed: {exc}") from None

    def _video_frame(self, frame: Frame) -> av.VideoFrame:
        new = av.VideoFrame.from_ndarray(frame.data, format=self.layout.pix_fmt)
        if frame.pts is not None:
            new.pts, new.time_base = frame.pts, frame.time_base
            if frame.time_base != self.time_base:
                new.pts = int(round(frame.pts * frame.time_base / self.time_base))
                new.time_base = self.time_base
            if frame.duration:
                self.durations[new.pts] = int(round(Fraction(frame.duration) / self.time_base))
        return new

    def _mux(self, packets) -> None:
        for packet in packets:
            if not packet.duration and packet.pts is not None:
                packet.duration = self.durations.pop(packet.pts, 0)
            else:
                self.durations.pop(packet.pts, None)
            self.out.mux(packet)


# --- the loop --------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the written frames held; callbacks see each frame's faces in order."""
    on_frame: Callable[[int, float, list[Face]], None] | None = None
    on_warmup: Callable[[int, float, list[Face]], None] | None = None
    progress: Callable[[int, int], None] | None = None
    total: int = 0
    frames: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    tracks: set = field(default_factory=set)
    first: float | None = None
    end: float | None = None
    after_own: dict | None = None   # tracker state after the last own frame

    def add(self, frame: Frame) -> None:
        if frame.role == WARMUP:
            if self.on_warmup:
                self.on_warmup(frame.index, frame.seconds, frame.faces)
            return
        self.frames += 1
        self.faces += len(frame.faces)
        self.frames_with_faces += bool(frame.faces)
        self.tracks.update(f.track for f in frame.faces if f.track is not None)
        self.first = frame.seconds if self.first is None else self.first
        self.end = frame.seconds + frame.duration
        if self.on_frame:
            self.on_frame(frame.index, frame.seconds, frame.faces)
        if self.progress:
            self.progress(self.frames, self.total)


def run(engine, reader: Reader, tracker: Tracker, operation, writer: Writer | None,
        tally: Tally, batch: int = 1, lookahead: int = 8) -> Tally:
    """decode → detect → track → operate → encode. Frames wait `lookahead` frames after
    tracking, so a face found again after a miss gets interpolated boxes on them too."""
    layout, held = reader.layout, deque()
    for group in _batches(reader, batch):                                   # decode (a thread)
        found = engine.detect_batch([frame.small for frame in group])       # detect
        for frame, faces in zip(group, found):
            if frame.role == AHEAD and tally.after_own is None:
                tally.after_own = tracker.state()  # what the next chunk starts from
            frame.faces = tracker.update(frame.index, _scaled(faces, layout.detect_scale),
                                         frame.small)                       # track
            held.append(frame)
            if len(held) > lookahead:
                _finish(held.popleft(), operation, writer, tally, layout)
    while held:
        _finish(held.popleft(), operation, writer, tally, layout)
    return tally


def _batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    group: list[Frame] = []
    for frame in frames:
        group.append(frame)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


def _finish(frame: Frame, operation, writer: Writer | None, tally: Tally, layout: Layout) -> None:
    """operate → encode (a thread) a frame that is written; count it."""
    if frame.role == AHEAD:
        return
    if frame.role == OWN and writer is not None:
        if operation is not None:
            operate(operation, frame, layout)
        writer.put(frame)
    elif frame.role == OWN and hasattr(operation, "observe"):
        operation.observe(frame, layout)  # reads frames, writes none (trackanalysis)
    tally.add(frame)


def _scaled(faces: list[Face], scale: float) -> list[Face]:
    """Faces found on the detector's reduced frame, in full-size pixels."""
    if scale == 1.0:
        return faces
    for f in faces:
        f.box = tuple(v * scale for v in f.box)
        if f.landmarks is not None:
            f.landmarks = f.landmarks * scale
    return faces
