"""Video in and out with PyAV: decode → detect (batched) → track → operate → encode.

Frames stream through a short look-ahead buffer (so a face found again after a miss gets
interpolated boxes in the frames still waiting), never the whole video. Audio packets are
copied as they are demuxed. The output is written under a temporary name and renamed.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import av
import numpy as np

from .anonymize import MaskOptions
from .face import Face
from .images import BadInput
from .tracker import Tracker

# Audio codecs an MP4/MOV can hold as they are; anything else is re-encoded to AAC.
MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}


@dataclass
class VideoOptions:
    batch: int = 1               # frames per detector call (the GPU handler raises this)
    lookahead: int = 8           # frames held back for interpolation
    max_missing_s: float = 1.5   # how long a lost face stays covered
    keep_audio: bool = True
    codec: str = "libx264"
    preset: str = "veryfast"
    crf: int = 20
    bframes: int | None = None   # None: the encoder's default; chunks use 0 (dts == pts, joinable)


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int
    duration: float
    codec: str
    has_audio: bool
    rotation: int = 0  # degrees counter-clockwise that the player turns frames to show them

    @property
    def display_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


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


def probe(path: Path | str) -> VideoInfo:
    with open_input(path) as c:
        v = c.streams.video[0]
        fps = float(v.average_rate or v.guessed_rate or 25)
        duration = float(v.duration * v.time_base) if v.duration else (
            c.duration / av.time_base if c.duration else 0.0)
        rotation = 0
        try:
            first = next(c.decode(v), None)
            rotation = int(round(first.rotation)) % 360 if first is not None else 0
        except av.error.FFmpegError:
            pass  # reported when the frames are decoded for real
        return VideoInfo(v.codec_context.width, v.codec_context.height, fps, v.frames,
                         duration, v.codec_context.name, bool(c.streams.audio), rotation)


def _frames(container, stream, audio_in, audio_out, out) -> Iterator[av.VideoFrame]:
    """Decoded video frames; audio packets are muxed straight into `out` on the way."""
    streams = [stream] + ([audio_in] if audio_out is not None else [])
    try:
        for packet in container.demux(*streams):
            if packet.stream is stream:
                yield from packet.decode()
            elif packet.size:
                if audio_out.codec_context.is_encoder and audio_out.name != audio_in.codec_context.name:
                    for frame in packet.decode():
                        for p in audio_out.encode(frame):
                            out.mux(p)
                else:
                    packet.stream = audio_out
                    out.mux(packet)
    except av.error.InvalidDataError as exc:
        raise BadInput(f"corrupt video data: {exc}") from None


def _upright(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    bgr = frame.to_ndarray(format="bgr24")
    if rotation:
        bgr = np.ascontiguousarray(np.rot90(bgr, k=rotation // 90))
    return bgr


def count_frames(path: Path | str) -> int:
    """Video packets in a file (demuxed, not decoded): its frame count, cheaply."""
    with open_input(path) as c:
        stream = c.streams.video[0]
        try:
            return sum(1 for p in c.demux(stream) if p.size)
        except av.error.FFmpegError as exc:
            raise BadInput(f"corrupt video data in {Path(path).name}: {exc}") from None


def decode_frames(paths: list[Path | str], rotation: int, skip: int = 0,
                  limit: int | None = None) -> Iterator[tuple[av.VideoFrame, np.ndarray]]:
    """Upright frames of `paths` played one after the other (video only), leaving out the
    first `skip` and stopping after `limit`: the warm-up and look-ahead frames of a chunk.
    Skipped frames are decoded (they are references) but never converted."""
    n = taken = 0
    for path in paths:
        container = open_input(path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for packet in container.demux(stream):
                for frame in packet.decode():
                    n += 1
                    if n <= skip:
                        continue
                    if limit is not None and taken >= limit:
                        return
                    taken += 1
                    yield frame, _upright(frame, rotation)
        except av.error.FFmpegError as exc:
            raise BadInput(f"corrupt video data in {Path(path).name}: {exc}") from None
        finally:
            container.close()


def _seconds(frame: av.VideoFrame, index: int, fps: float) -> float:
    return float(frame.pts * frame.time_base) if frame.pts is not None else index / fps


def _frame_duration(frame: av.VideoFrame, fps: float) -> float:
    if frame.duration and frame.time_base is not None:
        return float(frame.duration * frame.time_base)
    return 1.0 / fps if fps else 0.0


def process_video(engine, src: Path | str, dst: Path | str | None,
                  operation, options: VideoOptions | None = None,
                  tracker: Tracker | None = None, frame_offset: int = 0,
                  on_frame: Callable[[int, float, list[Face]], None] | None = None,
                  progress: Callable[[int, int], None] | None = None, *,
                  warmup: list[Path | str] | None = None, warmup_frames: int = 0,
                  on_warmup: Callable[[int, float, list[Face]], None] | None = None,
                  lookahead: Path | str | None = None, time_offset: float = 0.0,
                  rate: Fraction | None = None, rotation: int | None = None,
                  time_base: Fraction | None = None, timeline: bool = False
                  ) -> tuple[dict[str, Any], Tracker]:
    """Run one video through detect → track → `operation`, writing `dst` (None: analyse only).

    `tracker` carries tracks in from a previous chunk; `frame_offset` is this video's first
    global frame index. `on_frame(index, seconds, faces)` sees every frame's faces in order.
    Returns a summary and the tracker (its state carries on to the next chunk).

    For a chunk of a longer video: `warmup` (files before this one, in order) has its last
    `warmup_frames` frames detected and tracked first, without being written (they are seen
    by `on_warmup`, numbered just before `frame_offset`); `lookahead` (the file after this one)
    has its first `options.lookahead` frames detected and tracked after this video's, so the
    last frames written get the same interpolated boxes as in one pass over the whole video.
    The tracker returned is then the one after this video's last frame, not after the
    look-ahead. `time_offset` is added to the seconds reported; `rate`, `rotation` and
    `time_base` replace what this file says (chunks of one video are encoded alike).
    `timeline` adds the first frame, the seconds covered and the warm-up/look-ahead frame
    counts to the summary.
    """
    options = options or VideoOptions()
    start = time.perf_counter()
    info = probe(src)
    if rotation is None:
        rotation = info.rotation
    info.rotation = rotation
    tracker = tracker or Tracker(fps=info.fps, max_missing_s=options.max_missing_s)
    warm_paths = [Path(p) for p in (warmup or [])] if warmup_frames > 0 else []
    warm_skip = warm_count = 0
    if warm_paths:
        total = sum(count_frames(p) for p in warm_paths)
        warm_skip = max(0, total - warmup_frames)
        warm_count = total - warm_skip
    if lookahead is not None:
        open_input(lookahead).close()  # a bad neighbour fails now, before anything is written
    container = open_input(src)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    out_tb = time_base or stream.time_base
    out = out_stream = audio_out = None
    tmp = None
    if dst is not None:
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.stem}.{uuid.uuid4().hex[:8]}.part{dst.suffix}")
    counts = {"frames": 0, "frames_with_faces": 0, "faces": 0, "tracks": set(),
              "warmup": 0, "lookahead": 0, "first": None, "end": None}
    durations: dict[int, int] = {}  # output pts -> frame duration, for the encoded packets
    snapshot: dict | None = None
    try:
        if tmp is not None:
            out = av.open(str(tmp), "w", options=_mux_options(tmp, out_tb))
            out_stream = out.add_stream(options.codec, rate=rate or _rate(stream))
            # Phone videos store frames sideways with a display rotation: work on, and write,
            # upright frames (detectors miss sideways faces; players show the same picture).
            out_stream.width, out_stream.height = info.display_size
            out_stream.pix_fmt = "yuv420p"
            # Encode in the input's time base: rounding pts to 1/fps could merge frames.
            out_stream.time_base = out_tb
            out_stream.codec_context.time_base = out_tb
            codec_opts = {"crf": str(options.crf), "preset": options.preset}
            if options.bframes is not None:
                codec_opts["bf"] = str(options.bframes)
            out_stream.options = codec_opts
            if options.keep_audio and container.streams.audio:
                audio_out = _audio_stream(container.streams.audio[0], out)
        buffer: deque = deque()

        def write(packets):
            for packet in packets:
                if not packet.duration and packet.pts is not None:
                    packet.duration = durations.pop(packet.pts, 0)
                else:
                    durations.pop(packet.pts, None)
                out.mux(packet)

        def emit(item):
            kind, frame, bgr, index, faces = item
            if kind == "ahead":
                return
            seconds = _seconds(frame, index, info.fps) + time_offset
            if kind == "warmup":
                if on_warmup:
                    on_warmup(index, seconds, faces)
                return
            if out is not None:
                operation.apply(bgr, faces)
                new = av.VideoFrame.from_ndarray(bgr, format="bgr24")
                new.pts, new.time_base = frame.pts, frame.time_base
                if frame.time_base != out_tb and frame.pts is not None:
                    new.pts = int(round(frame.pts * frame.time_base / out_tb))
                    new.time_base = out_tb
                if frame.duration and frame.pts is not None:
                    durations[new.pts] = int(round(frame.duration * frame.time_base / out_tb))
                write(out_stream.encode(new))
            counts["frames"] += 1
            counts["faces"] += len(faces)
            counts["frames_with_faces"] += bool(faces)
            counts["tracks"].update(f.track for f in faces)
            if counts["first"] is None:
                counts["first"] = seconds
            counts["end"] = seconds + _frame_duration(frame, info.fps)
            if on_frame:
                on_frame(index, seconds, faces)
            if progress:
                progress(counts["frames"], info.frames)

        index = frame_offset - warm_count
        pending: list[tuple[str, av.VideoFrame, np.ndarray]] = []

        def run_batch():
            nonlocal index, snapshot
            found = engine.detect_batch([bgr for _, _, bgr in pending])
            for (kind, frame, bgr), dets in zip(pending, found):
                if kind == "ahead" and snapshot is None:
                    # the state after this video's last frame: what the next chunk starts from
                    snapshot = json.loads(json.dumps(tracker.state()))
                faces = tracker.update(index, dets, bgr)
                buffer.append((kind, frame, bgr, index, faces))
                index += 1
                if len(buffer) > options.lookahead:
                    emit(buffer.popleft())
            pending.clear()

        def frames():
            if warm_paths:
                for frame, bgr in decode_frames(warm_paths, rotation, skip=warm_skip):
                    counts["warmup"] += 1
                    yield "warmup", frame, bgr
                if counts["warmup"] != warm_count:
                    raise BadInput(f"warm-up chunks gave {counts['warmup']} frames, not {warm_count}")
            for frame in _frames(container, stream, container.streams.audio[0] if audio_out else None,
                                 audio_out, out):
                yield "own", frame, _upright(frame, rotation)
            if lookahead is not None and options.lookahead > 0:
                for frame, bgr in decode_frames([lookahead], rotation, limit=options.lookahead):
                    counts["lookahead"] += 1
                    yield "ahead", frame, bgr

        for item in frames():
            pending.append(item)
            if len(pending) >= options.batch:
                run_batch()
        if pending:
            run_batch()
        while buffer:
            emit(buffer.popleft())
        if out is not None:
            write(out_stream.encode())
            if audio_out is not None and audio_out.codec_context.is_encoder:
                for packet in audio_out.encode():
                    out.mux(packet)
            out.close()
            out = None
            os.replace(tmp, dst)
    except av.error.FFmpegError as exc:
        raise BadInput(f"video processing failed: {exc}") from None
    finally:
        container.close()
        if out is not None:
            out.close()
        if tmp is not None and tmp.exists():
            tmp.unlink()
    if counts["frames"] == 0:
        raise BadInput("video has no decodable frames")
    if snapshot is not None:
        tracker = Tracker.from_state(snapshot)
    elapsed = time.perf_counter() - start
    summary = {"source": str(src), "output": None if dst is None else str(dst),
               "width": info.display_size[0], "height": info.display_size[1], "fps": round(info.fps, 3),
               "frames": counts["frames"], "frames_with_faces": counts["frames_with_faces"],
               "faces": counts["faces"], "tracks": len(counts["tracks"] - {None}),
               "audio": bool(audio_out is not None), "ms": round(elapsed * 1000, 1),
               "frames_per_s": round(counts["frames"] / elapsed, 2) if elapsed else None}
    if timeline:
        summary.update(first_frame=frame_offset, start_time=round(counts["first"], 6),
                       end_time=round(counts["end"], 6), warmup_frames=counts["warmup"],
                       lookahead_frames=counts["lookahead"])
    return summary, tracker


def _mux_options(path: Path, time_base: Fraction) -> dict[str, str]:
    """MP4/MOV keep a non-zero start (a chunk's original timestamps) in an edit list counted
    in the movie timescale, 1/1000 s by default: use the video's own so none is rounded."""
    if path.suffix.lower() in (".mp4", ".mov", ".m4v", ".m4a") and time_base and time_base.numerator == 1:
        return {"movie_timescale": str(time_base.denominator)}
    return {}


def _audio_stream(audio_in, out):
    name = audio_in.codec_context.name
    if out.format.name.split(",")[0] in ("mp4", "mov") and name not in MP4_AUDIO:
        stream = out.add_stream("aac", rate=audio_in.codec_context.sample_rate)
        return stream  # re-encoded: the container cannot hold `name`
    return out.add_stream_from_template(audio_in)


class FrameReport:
    """Writes `{"source": ..., "frames": [...], "summary": {...}}` as frames arrive, so a long
    video's report never sits in memory; renamed into place when complete."""

    def __init__(self, path: Path | str, source: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.part")
        self.file = open(self.tmp, "w")
        self.file.write('{"source": %s, "frames": [' % json.dumps(source))
        self.first = True

    def __call__(self, index: int, seconds: float, faces: list[Face]) -> None:
        sep = "" if self.first else ","
        self.first = False
        self.file.write(sep + "\n" + json.dumps({"frame": index, "time": round(seconds, 4),
                                                  "faces": [f.to_dict() for f in faces]}))

    def close(self, summary: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> None:
        """Complete and rename into place (`extra`: more top-level keys); None: discard."""
        if summary is None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            return
        more = "".join(", %s: %s" % (json.dumps(k), json.dumps(v)) for k, v in (extra or {}).items())
        self.file.write('\n], "summary": %s%s}\n' % (json.dumps(summary), more))
        self.file.close()
        os.replace(self.tmp, self.path)


def anonymize_video(engine, src, dst, mask_options: MaskOptions | None = None,
                    report: Path | str | None = None, options: VideoOptions | None = None,
                    verify: bool = False, progress=None) -> dict[str, Any]:
    from .engine import Mask
    operation = Mask(mask_options or MaskOptions(), engine.detector if verify else None)
    writer = FrameReport(report, str(src)) if report else None
    summary = None
    try:
        summary, _ = process_video(engine, src, dst, operation, options,
                                   on_frame=writer, progress=progress)
    finally:
        if writer:
            writer.close(summary)
    return summary


def analyze_video(engine, src, options: VideoOptions | None = None) -> dict[str, Any]:
    frames: list[dict] = []
    summary, _ = process_video(engine, src, None, None, options, on_frame=lambda i, t, faces: frames.append(
        {"frame": i, "time": round(t, 4), "faces": [f.to_dict() for f in faces]}))
    return {"source": str(src), "width": summary["width"], "height": summary["height"],
            "fps": summary["fps"], "frames": frames, "summary": summary}


def _rate(stream) -> Fraction:
    # Containers report rates like 519168/19667; x264 refuses such terms, and the exact pts
    # are carried per frame anyway.
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    return Fraction(rate).limit_denominator(1001)
