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


def process_video(engine, src: Path | str, dst: Path | str | None,
                  operation, options: VideoOptions | None = None,
                  tracker: Tracker | None = None, frame_offset: int = 0,
                  on_frame: Callable[[int, float, list[Face]], None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Any], Tracker]:
    """Run one video through detect → track → `operation`, writing `dst` (None: analyse only).

    `tracker` carries tracks in from a previous chunk; `frame_offset` is this video's first
    global frame index. `on_frame(index, seconds, faces)` sees every frame's faces in order.
    Returns a summary and the tracker (its state carries on to the next chunk).
    """
    options = options or VideoOptions()
    start = time.perf_counter()
    info = probe(src)
    tracker = tracker or Tracker(fps=info.fps, max_missing_s=options.max_missing_s)
    container = open_input(src)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    out = out_stream = audio_out = None
    tmp = None
    if dst is not None:
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.stem}.{uuid.uuid4().hex[:8]}.part{dst.suffix}")
    counts = {"frames": 0, "frames_with_faces": 0, "faces": 0, "tracks": set()}
    try:
        if tmp is not None:
            out = av.open(str(tmp), "w")
            out_stream = out.add_stream(options.codec, rate=_rate(stream))
            # Phone videos store frames sideways with a display rotation: work on, and write,
            # upright frames (detectors miss sideways faces; players show the same picture).
            out_stream.width, out_stream.height = info.display_size
            out_stream.pix_fmt = "yuv420p"
            # Encode in the input's time base: rounding pts to 1/fps could merge frames.
            out_stream.time_base = stream.time_base
            out_stream.codec_context.time_base = stream.time_base
            out_stream.options = {"crf": str(options.crf), "preset": options.preset}
            if options.keep_audio and container.streams.audio:
                audio_out = _audio_stream(container.streams.audio[0], out)
        buffer: deque = deque()

        def emit(item):
            frame, bgr, index, faces = item
            if out is not None:
                operation.apply(bgr, faces)
                new = av.VideoFrame.from_ndarray(bgr, format="bgr24")
                new.pts, new.time_base = frame.pts, frame.time_base
                for packet in out_stream.encode(new):
                    out.mux(packet)
            counts["frames"] += 1
            counts["faces"] += len(faces)
            counts["frames_with_faces"] += bool(faces)
            counts["tracks"].update(f.track for f in faces)
            if on_frame:
                seconds = float(frame.pts * frame.time_base) if frame.pts is not None else index / info.fps
                on_frame(index, seconds, faces)
            if progress:
                progress(counts["frames"], info.frames)

        index = frame_offset
        pending: list[tuple[av.VideoFrame, np.ndarray]] = []

        def run_batch():
            nonlocal index
            found = engine.detect_batch([bgr for _, bgr in pending])
            for (frame, bgr), dets in zip(pending, found):
                faces = tracker.update(index, dets, bgr)
                buffer.append((frame, bgr, index, faces))
                index += 1
                if len(buffer) > options.lookahead:
                    emit(buffer.popleft())
            pending.clear()

        for frame in _frames(container, stream, container.streams.audio[0] if audio_out else None,
                             audio_out, out):
            bgr = frame.to_ndarray(format="bgr24")
            if info.rotation:
                bgr = np.ascontiguousarray(np.rot90(bgr, k=info.rotation // 90))
            pending.append((frame, bgr))
            if len(pending) >= options.batch:
                run_batch()
        if pending:
            run_batch()
        while buffer:
            emit(buffer.popleft())
        if out is not None:
            for packet in out_stream.encode():
                out.mux(packet)
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
    elapsed = time.perf_counter() - start
    summary = {"source": str(src), "output": None if dst is None else str(dst),
               "width": info.display_size[0], "height": info.display_size[1], "fps": round(info.fps, 3),
               "frames": counts["frames"], "frames_with_faces": counts["frames_with_faces"],
               "faces": counts["faces"], "tracks": len(counts["tracks"] - {None}),
               "audio": bool(audio_out is not None), "ms": round(elapsed * 1000, 1),
               "frames_per_s": round(counts["frames"] / elapsed, 2) if elapsed else None}
    return summary, tracker


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

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            return
        self.file.write('\n], "summary": %s}\n' % json.dumps(summary))
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
