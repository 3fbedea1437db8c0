"""Video files through the pipeline (`faceflow.pipeline`): a whole file, or a chunk of a
longer one with the frames around it.

    summary, tracker = process_video(engine, "in.mp4", "out.mp4", Mask(), on_frame=report)

The output is written under a temporary name and renamed; audio is copied (or re-encoded
to AAC where the container cannot hold it). Any video FFmpeg decodes is written as H.264:
4:2:0 when its size is even, 4:4:4 (same size, no padding) when its width or height is odd;
the summary says which (`pix_fmt`).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import av

from .anonymize import MaskOptions
from .face import EXEMPT, FOLLOWED, MANUAL, Face
from .images import BadInput
from .operations import Mask
from .pipeline import (AHEAD, OWN, WARMUP, Encoding, Layout, Reader, Segment, Tally, Writer,
                       open_input, run)
from .tracker import Tracker


@dataclass
class VideoOptions:
    batch: int = 1               # frames per detector call (the GPU handler raises this)
    lookahead: int = 8           # frames held back for interpolation
    max_missing_s: float = 1.5   # how long a lost face stays covered
    keep_audio: bool = True
    codec: str = "libx264"
    # superfast at crf 22 gives the PSNR of veryfast at crf 20 (44.7 dB on bench/video.py's
    # clip) for 43 % less encoder time and ~30 % more bytes: the encoder is half the CPU a frame.
    preset: str = "superfast"
    crf: int = 22
    bframes: int | None = None   # None: the encoder's default; chunks use 0 (dts == pts, joinable)
    threads: int = 0             # x264's threads (0: its own choice)


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
    pix_fmt: str | None = None

    @property
    def display_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def _info(c: av.container.InputContainer) -> VideoInfo:
    """What an open input says about its video; decodes the first frame (its rotation)."""
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
    return VideoInfo(v.codec_context.width, v.codec_context.height, fps, v.frames, duration,
                     v.codec_context.name, bool(c.streams.audio), rotation, v.codec_context.format
                     and v.codec_context.format.name)


def probe(path: Path | str) -> VideoInfo:
    with open_input(path) as c:
        return _info(c)


def count_frames(path: Path | str) -> int:
    """Video packets in a file (demuxed, not decoded): its frame count, cheaply."""
    with open_input(path) as c:
        stream = c.streams.video[0]
        try:
            return sum(1 for p in c.demux(stream) if p.size)
        except av.error.FFmpegError as exc:
            raise BadInput(f"corrupt video data in {Path(path).name}: {exc}") from None


def stream_rate(stream) -> Fraction:
    """The frame rate to encode with. Containers report rates like 519168/19667; x264 refuses
    such terms, and the exact pts are carried per frame anyway."""
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    return Fraction(rate).limit_denominator(1001)


@dataclass
class Around:
    """What surrounds a chunk of a longer video, for the frames it writes to equal one pass.

    `warmup` (the files before it, in order, `warmup_total` frames in all; counted when
    None) has its last `warmup_frames` frames detected and tracked first, not written, seen
    by `on_warmup`; `lookahead` (the file after it) has its first `options.lookahead` frames
    tracked after the chunk's own, not written. `time_offset` is added to the seconds
    reported; `rate`, `rotation` and `time_base` replace what the file says (chunks of one
    video are encoded alike)."""
    warmup: list[Path] = field(default_factory=list)
    warmup_frames: int = 0
    warmup_total: int | None = None
    on_warmup: Callable[[int, float, list[Face]], None] | None = None
    lookahead: Path | None = None
    time_offset: float = 0.0
    rate: Fraction | None = None
    rotation: int | None = None
    time_base: Fraction | None = None


def process_video(engine, src: Path | str, dst: Path | str | None, operation,
                  options: VideoOptions | None = None, *, tracker: Tracker | None = None,
                  frame_offset: int = 0,
                  on_frame: Callable[[int, float, list[Face]], None] | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  around: Around | None = None) -> tuple[dict[str, Any], Tracker]:
    """Run one video through detect → track → `operation`, writing `dst` (None: analyse only).

    `tracker` carries tracks in from a previous chunk; `frame_offset` is this video's first
    global frame index; `around`: the frames before and after a chunk (see `Around`); the
    summary then has the chunk's timeline. `on_frame(index, seconds, faces)` sees every
    written frame's faces in order. Returns a summary and the tracker after this video's
    last frame (what the next chunk starts from).
    """
    options = options or VideoOptions()
    start = time.perf_counter()
    chunk = around or Around()
    info = probe(src)  # its own opening: the first frame is decoded for the rotation
    container = open_input(src)
    has_audio = bool(container.streams.audio)
    opened = {Path(src): container}   # closed by the reader, or here if it never started
    reader = writer = None
    try:
        try:
            stream = container.streams.video[0]
            rate, time_base = chunk.rate or stream_rate(stream), chunk.time_base or stream.time_base
        except av.error.FFmpegError as exc:
            raise BadInput(f"not a readable video: {exc}") from None
        info.rotation = info.rotation if chunk.rotation is None else chunk.rotation
        layout = Layout.of(*info.display_size, info.rotation, engine.detector.max_side)
        tracker = tracker or Tracker(fps=info.fps, max_missing_s=options.max_missing_s)
        segments = []
        if chunk.warmup and chunk.warmup_frames > 0:
            total = chunk.warmup_total
            if total is None:
                total = sum(count_frames(p) for p in chunk.warmup)
            count = min(total, chunk.warmup_frames)
            segments.append(Segment([Path(p) for p in chunk.warmup], WARMUP, skip=total - count,
                                    expect=count))
        segments.append(Segment([Path(src)], OWN))
        if chunk.lookahead is not None:
            # opened now: a bad neighbour fails before any work is done
            opened[Path(chunk.lookahead)] = open_input(chunk.lookahead)
            if options.lookahead > 0:
                segments.append(Segment([Path(chunk.lookahead)], AHEAD, limit=options.lookahead))
        first = frame_offset - (segments[0].expect if segments[0].role == WARMUP else 0)
        reader = Reader(segments, layout, first_index=first, fps=info.fps, time_offset=chunk.time_offset,
                        keep_pixels=dst is not None, opened=opened)
        if dst is not None:
            audio_in = container.streams.audio[0] if options.keep_audio and container.streams.audio else None
            writer = Writer(dst, layout, Encoding(rate, time_base, options.codec, options.preset, options.crf,
                                                  options.bframes, options.threads), audio_in,
                            metadata=getattr(operation, "container_tags", None))  # a swap's mark
            if audio_in is not None:
                reader.audio_sink = writer.put
        tally = Tally(on_frame, chunk.on_warmup, progress, total=info.frames)
        run(engine, reader, tracker, operation, writer, tally, options.batch, options.lookahead)
        if tally.frames == 0:
            raise BadInput("video has no decodable frames")
        if writer is not None:
            writer.finish()
            writer = None
    except av.error.FFmpegError as exc:
        raise BadInput(f"video processing failed: {exc}") from None
    finally:
        if writer is not None:
            writer.abort()
        if reader is not None:
            reader.close()
        else:
            for c in opened.values():
                c.close()
    if tally.after_own is not None:
        tracker = Tracker.from_state(tally.after_own)
    elapsed = time.perf_counter() - start
    summary = {"source": str(src), "output": None if dst is None else str(dst),
               "width": layout.width, "height": layout.height, "fps": round(info.fps, 3),
               "pix_fmt": layout.pix_fmt if dst is not None else None,
               "frames": tally.frames, "frames_with_faces": tally.frames_with_faces,
               "faces": tally.faces, "tracks": len(tally.tracks),
               "audio": dst is not None and options.keep_audio and has_audio,
               "ms": round(elapsed * 1000, 1),
               "frames_per_s": round(tally.frames / elapsed, 2) if elapsed else None}
    if around is not None:
        summary.update(first_frame=frame_offset, start_time=round(tally.first, 6),
                       end_time=round(tally.end, 6), warmup_frames=reader.counts[WARMUP],
                       lookahead_frames=reader.counts[AHEAD])
    return summary, tracker


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


class TrackIndex:
    """Per track, what a reviewer lists: `first_frame`, `last_frame`, `frames` (covered,
    held ones too) and `thumbnail`, a reference to the frame and box of its best-scored face
    (the page cuts it from the video; no image is written). Fed `(index, seconds, faces)`."""

    def __init__(self):
        self._tracks: dict[int, dict[str, Any]] = {}
        self._scores: dict[int, float] = {}

    def __call__(self, index: int, seconds: float, faces: list[Face]) -> None:
        for f in faces:
            if f.track is None:
                continue
            t = self._tracks.get(f.track)
            if t is None:
                t = self._tracks[f.track] = {"track": f.track, "first_frame": index, "frames": 0}
                if f.source in (MANUAL, FOLLOWED):
                    t["source"] = MANUAL
            t["frames"] += 1
            t["last_frame"] = index
            if f.attributes.get(EXEMPT):
                t[EXEMPT] = True
            if f.score > self._scores.get(f.track, -1.0):
                self._scores[f.track] = f.score
                t["thumbnail"] = {"frame": index, "box": [round(float(v), 1) for v in f.box]}

    def tracks(self) -> list[dict[str, Any]]:
        return [t for _, t in sorted(self._tracks.items())]


def report_extra(summary: dict[str, Any], tracks: TrackIndex) -> dict[str, Any]:
    """What a video report adds after its frames for review: the size its boxes are in, the
    frame rate and the track list (faceflow.review reads it back)."""
    return {"width": summary["width"], "height": summary["height"], "fps": summary["fps"],
            "tracks": tracks.tracks()}


def anonymize_video(engine, src, dst, mask_options: MaskOptions | None = None,
                    report: Path | str | None = None, options: VideoOptions | None = None,
                    verify: bool = False, progress=None) -> dict[str, Any]:
    operation = Mask(mask_options or MaskOptions(), engine.detector if verify else None)
    writer = FrameReport(report, str(src)) if report else None
    tracks = TrackIndex()

    def on_frame(index: int, seconds: float, faces: list[Face]) -> None:
        tracks(index, seconds, faces)
        writer(index, seconds, faces)

    summary = None
    try:
        summary, _ = process_video(engine, src, dst, operation, options,
                                   on_frame=on_frame if writer else None, progress=progress)
    finally:
        if writer:
            writer.close(summary, summary and report_extra(summary, tracks))
    return summary


def swap_video(engine, src, dst, operation, report: Path | str | None = None,
               options: VideoOptions | None = None, progress=None) -> dict[str, Any]:
    """A video through a faceflow.swap.Swap operation; the summary adds what was swapped per
    track and the synthetic mark (container tags)."""
    writer = FrameReport(report, str(src)) if report else None
    summary = None
    try:
        summary, _ = process_video(engine, src, dst, operation, options,
                                   on_frame=writer, progress=progress)
        summary.update(operation="swap", engine=operation.engine, options=operation.options.to_dict(),
                       swapped_tracks=operation.tracks(), marking=operation.marking("video"))
    finally:
        if writer:
            writer.close(summary)
    return summary


def analyze_video(engine, src, options: VideoOptions | None = None, attributes=None) -> dict[str, Any]:
    """Faces per frame and, per track, what was seen of it; with `attributes`
    (faceflow.analysis names), a sample of each track's faces is analysed and each track
    summarised (faceflow.trackanalysis)."""
    from .trackanalysis import TrackAnalysis
    frames: list[dict] = []
    analysis = TrackAnalysis(engine.analyzer(attributes) if attributes else None, probe(src).fps)
    summary, _ = process_video(engine, src, None, analysis, options, on_frame=lambda i, t, faces: frames.append(
        {"frame": i, "time": round(t, 4), "faces": [f.to_dict() for f in faces]}))
    return {"source": str(src), "width": summary["width"], "height": summary["height"],
            "fps": summary["fps"], "frames": frames, "tracks": analysis.tracks(), "summary": summary}

