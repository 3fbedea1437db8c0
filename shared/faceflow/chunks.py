"""Long video in chunks: cut at keyframes, anonymise each chunk on its own, join them.

    split = split_video("in.mp4", "work/in", target_seconds=2)     # remux: no re-encode
    # parallel (one worker per chunk): warm up on the previous chunk, look ahead into the next
    summary, _ = process_chunk(engine, chunk, "work/out/3.mp4", warmup=prev, lookahead=nxt,
                               info=split.info, report="work/out/3.json")
    # or in order (a stream uploaded chunk by chunk): the tracker state carries on, as JSON
    summary, state = process_chunk(engine, chunk, "work/out/3.mp4", state, info=split.info)
    merge_chunks(outputs, "out.mp4", audio=split.audio, info=split.info)   # remux: no re-encode
    report = merge_reports(reports)                                        # one id per face

Why the output matches one pass over the whole video, frame for frame:

* The tracker is causal: what it holds on frame i depends only on frames <= i. In stream mode
  the state after the previous chunk's last frame is handed on exactly (boxes, motion, the
  boxes held while a face is missing, the last frame's colour signature for cut detection).
  In parallel mode that state does not exist yet; the worker rebuilds it by running the
  detector and tracker over the tail of the previous chunk (`warmup`): every track alive at
  the boundary was last seen within `max_missing` frames, so a warm-up of `max_missing`
  frames plus a short settling time (the motion estimate forgets its start) gives the same
  tracks, up to their ids. `merge_reports` maps the ids back by matching the warm-up frames
  with the previous chunk's frames.
* One pass holds frames back for `lookahead` frames so that a face found again gets
  interpolated boxes on the frames still waiting. A chunk's last frames wait on the next
  chunk's first frames: `lookahead` (the next chunk) is detected and tracked after the
  chunk's own frames, never written.
* Chunks are cut at clean keyframes (no frame on one side of the cut refers to, or shows
  between, frames on the other side), so each decodes to the same pixels as in one pass.

Chunks are encoded alike (the source's rate, time base and rotation, libx264 without
B-frames: dts == pts and the same codec extradata), each starting on a keyframe, keeping the
original timestamps; `merge_chunks` copies their packets one after the other.
"""
from __future__ import annotations

import heapq
import json
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import av

from . import synthetic
from .anonymize import MaskOptions
from .face import Face, iou
from .images import BadInput, atomic_write
from .tracker import Tracker
from .operations import Mask, Operation
from .pipeline import MP4_AUDIO, audio_stream, mux_options, open_input
from .video import Around, FrameReport, TrackIndex, VideoOptions, probe, process_video, stream_rate

STATE_FORMAT = "faceflow.chunk-state"
STATE_VERSION = 1
WARMUP_SETTLE_S = 0.5   # warm-up beyond max_missing: the motion estimate forgets its start
MATCH_IOU = 0.5         # a warm-up face is the previous chunk's face when boxes overlap this much
MP4_LIKE = (".mp4", ".mov", ".m4v")


# --- plans -----------------------------------------------------------------------------------
@dataclass
class Chunk:
    """One piece of a split video: `frames` frames from `start_time` (seconds on the source's
    timeline, kept in the file) for `duration` seconds; `start_frame` is its first frame's
    index in the whole video."""
    index: int
    path: str
    start_time: float
    frames: int
    duration: float
    start_frame: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Chunk":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SplitResult:
    chunks: list[Chunk]
    audio: str | None             # the source's audio, remuxed into a file beside the chunks
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"chunks": [c.to_dict() for c in self.chunks], "audio": self.audio, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SplitResult":
        return cls([Chunk.from_dict(c) for c in d["chunks"]], d.get("audio"), dict(d.get("info") or {}))


def _as_chunk(value: Chunk | Path | str) -> tuple[Path, Chunk | None]:
    """A chunk of a plan (its frames known), or a file alone."""
    if isinstance(value, Chunk):
        return Path(value.path), value
    return Path(value), None


def _as_paths(value) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [_as_chunk(v)[0] for v in value]
    return [_as_chunk(value)[0]]


# --- split -----------------------------------------------------------------------------------
def split_video(src: Path | str, out_dir: Path | str, target_seconds: float = 2.0, *,
                min_last_seconds: float | None = None) -> SplitResult:
    """Cut `src` into chunks of about `target_seconds` (at least that, up to the next clean
    keyframe) without re-encoding: the video packets are remuxed as they are, timestamps
    included; the audio goes, also remuxed, into one file beside them. A last piece shorter
    than `min_last_seconds` (default half the target) stays with the chunk before it.
    A video with no clean keyframe after the first is one chunk."""
    if not target_seconds > 0:
        raise ValueError("target_seconds must be positive")
    min_last = target_seconds / 2 if min_last_seconds is None else min_last_seconds
    src, out_dir = Path(src), Path(out_dir)
    vinfo = probe(src)  # BadInput for what is not a video
    container = open_input(src)
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        timing = []  # (pts, duration, keyframe) in decode order
        for packet in container.demux(stream):
            if not packet.size:
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None:
                raise BadInput("cannot split: video packets without timestamps")
            timing.append((pts, packet.duration or 0, packet.is_keyframe))
        rate = stream_rate(stream)
        codec = stream.codec_context.name
        fmt = container.format.name
        audio_in = container.streams.audio[0] if container.streams.audio else None
        audio_meta = None if audio_in is None else {
            "codec": audio_in.codec_context.name, "sample_rate": audio_in.codec_context.sample_rate,
            "channels": audio_in.codec_context.layout.nb_channels, "time_base": str(audio_in.time_base)}
    except av.error.FFmpegError as exc:
        raise BadInput(f"corrupt video data: {exc}") from None
    finally:
        container.close()
    if not timing:
        raise BadInput("video has no frames")
    n = len(timing)
    pts = [t[0] for t in timing]
    frame_ticks = round(1 / (rate * tb)) if rate else 0
    end_pts = max(p + (d or frame_ticks) for p, d, _ in timing)
    suffix_min = pts[:]
    for i in range(n - 2, -1, -1):
        suffix_min[i] = min(pts[i], suffix_min[i + 1])
    starts, seen_max = [0], pts[0]
    clean = 0
    for i in range(1, n):
        # clean: a keyframe that nothing after it shows earlier, nothing before it shows later
        if timing[i][2] and seen_max < pts[i] and suffix_min[i] == pts[i]:
            clean += 1
            begun = suffix_min[starts[-1]]
            if (pts[i] - begun) * tb >= target_seconds and (end_pts - pts[i]) * tb >= min_last:
                starts.append(i)
        seen_max = max(seen_max, pts[i])
    bounds = list(zip(starts, starts[1:] + [n]))

    out_dir.mkdir(parents=True, exist_ok=True)
    ext = src.suffix.lower() if src.suffix.lower() in MP4_LIKE else ".mkv"
    tag = uuid.uuid4().hex[:6]
    chunk_paths = [out_dir / f"chunk_{k:05d}{ext}" for k in range(len(bounds))]
    audio_path = None
    if audio_meta is not None:
        audio_path = out_dir / ("audio.m4a" if audio_meta["codec"] in MP4_AUDIO else "audio.mka")
    written: list[Path] = []
    try:
        _write_split(src, chunk_paths, bounds, audio_path, tag, written)
        for path in written:
            os.replace(path, path.with_name(path.name.replace(f".{tag}.part", "")))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
            path.with_name(path.name.replace(f".{tag}.part", "")).unlink(missing_ok=True)
        raise
    chunks = []
    for k, (a, b) in enumerate(bounds):
        begin = suffix_min[a]
        end = suffix_min[b] if b < n else end_pts
        chunks.append(Chunk(k, str(chunk_paths[k]), float(begin * tb), b - a,
                            float((end - begin) * tb), start_frame=a))
    info = {"source": str(src), "container": fmt, "codec": codec,
            "width": vinfo.display_size[0], "height": vinfo.display_size[1],
            "rotation": vinfo.rotation, "fps": vinfo.fps, "rate": str(rate), "time_base": str(tb),
            "frames": n, "start_time": float(suffix_min[0] * tb), "end_time": float(end_pts * tb),
            "duration": float((end_pts - suffix_min[0]) * tb), "clean_keyframes": clean + 1,
            "target_seconds": target_seconds, "audio": audio_meta}
    return SplitResult(chunks, None if audio_path is None else str(audio_path), info)


def _write_split(src: Path, chunk_paths: list[Path], bounds, audio_path: Path | None, tag: str,
                 written: list[Path]) -> None:
    def part(path: Path) -> Path:
        tmp = path.with_name(f"{path.stem}.{tag}.part{path.suffix}")
        written.append(tmp)
        return tmp

    container = open_input(src)
    out = aout_c = None
    try:
        stream = container.streams.video[0]
        audio_in = container.streams.audio[0] if container.streams.audio and audio_path else None
        if audio_in is not None:
            tmp = part(audio_path)
            aout_c = av.open(str(tmp), "w", options=mux_options(tmp, audio_in.time_base))
            aout = aout_c.add_stream_from_template(audio_in)
        k, i, vout = -1, 0, None
        ends = [b for _, b in bounds]
        for packet in container.demux(*([stream] + ([audio_in] if audio_in is not None else []))):
            if not packet.size:
                continue
            if packet.stream is stream:
                if k < 0 or i >= ends[k]:
                    if out is not None:
                        out.close()
                    k += 1
                    tmp = part(chunk_paths[k])
                    out = av.open(str(tmp), "w", options=mux_options(tmp, stream.time_base))
                    vout = out.add_stream_from_template(stream)
                packet.stream = vout
                out.mux(packet)
                i += 1
            else:
                packet.stream = aout
                aout_c.mux(packet)
        if out is not None:
            out.close()
            out = None
        if aout_c is not None:
            aout_c.close()
            aout_c = None
    except av.error.FFmpegError as exc:
        raise BadInput(f"split failed: {exc}") from None
    finally:
        container.close()
        for c in (out, aout_c):
            if c is not None:
                c.close()


# --- one chunk -------------------------------------------------------------------------------
def warmup_frames(fps: float, options: VideoOptions | None = None) -> int:
    """Frames of warm-up that rebuild the tracker state at a chunk boundary."""
    options = options or VideoOptions()
    max_missing = max(1, int(round(options.max_missing_s * fps)))
    return max_missing + int(round(WARMUP_SETTLE_S * fps))


def _encode_params(src: Path, info: dict | None) -> dict[str, Any]:
    """How every chunk of one video is encoded (and tracked): from the split's `info` when
    given, else from this file."""
    if info:
        return {"rate": str(info["rate"]), "time_base": str(info["time_base"]),
                "rotation": int(info.get("rotation", 0)), "fps": float(info["fps"]),
                "width": int(info["width"]), "height": int(info["height"])}
    vinfo = probe(src)
    with open_input(src) as c:
        stream = c.streams.video[0]
        rate, tb = stream_rate(stream), stream.time_base
    return {"rate": str(rate), "time_base": str(tb), "rotation": vinfo.rotation, "fps": vinfo.fps,
            "width": vinfo.display_size[0], "height": vinfo.display_size[1]}


def _start_seconds(path: Path) -> float:
    with open_input(path) as c:
        stream = c.streams.video[0]
        if stream.start_time is not None:
            return float(stream.start_time * stream.time_base)
        for frame in c.decode(stream):
            return float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
    return 0.0


def check_state(state: dict[str, Any]) -> dict[str, Any]:
    """A chunk state as stored (e.g. JSON from Redis), checked; BadInput when it is not one."""
    if isinstance(state, (str, bytes)):
        state = json.loads(state)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise BadInput("not a faceflow chunk state")
    if state.get("version") != STATE_VERSION:
        raise BadInput(f"chunk state version {state.get('version')} is not {STATE_VERSION}")
    missing = {"next_frame", "time_offset", "end_time", "encode", "tracker"} - set(state)
    if missing:
        raise BadInput(f"chunk state lacks {', '.join(sorted(missing))}")
    return state


def process_chunk(engine, src_chunk, dst_chunk, state: dict | None = None, *, warmup=None,
                  mask_options: MaskOptions | None = None, video_options: VideoOptions | None = None,
                  report: Path | str | None = None, lookahead=None, frame_offset: int | None = None,
                  info: dict | None = None, verify: bool = False,
                  warmup_s: float | None = None, names: tuple[str, str] | None = None,
                  operation: Operation | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Anonymise one chunk (or apply `operation` to its faces instead of the mask: a face
    swap's); returns (summary, state for the next chunk).

    `src_chunk`: a `Chunk` of the split (its `start_frame` numbers the frames) or a path.
    `state`: what the previous chunk's process_chunk returned (stream mode; None for the
    first chunk); it is plain JSON data. `warmup` (parallel mode, no state): the previous chunk (or chunks, in
    order), whose last frames are detected and tracked first, not written. `lookahead`: the
    next chunk, whose first `video_options.lookahead` frames are tracked after this chunk's
    so its last frames get the boxes one pass would give (without it they keep the boxes
    predicted while a face is missing, which still cover it). `info`: the split's info (the
    source's fps, rate, time base, rotation), so all chunks track and encode alike; without
    it they come from `state` or this file. `report`: per-frame JSON as video.FrameReport
    writes it (global frame numbers and seconds), plus the warm-up frames and chunk details
    `merge_reports` needs. `names`: (source, output) as the report and summary name them
    (e.g. the stored objects rather than a worker's temporary files), so it is written once.
    """
    src, chunk = _as_chunk(src_chunk)
    if state is not None:
        state = check_state(state)
    options = video_options or VideoOptions()
    if options.bframes is None:
        options = replace(options, bframes=0)  # dts == pts: chunks join end to end
    warm_total = None
    if state is not None:
        try:
            enc = dict(state["encode"])
            tracker = Tracker.from_state(state["tracker"])
            first = int(state["next_frame"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"chunk state is damaged: {exc}") from None
        t0 = _start_seconds(src)
        tol = 0.5 / enc["fps"] if enc["fps"] else 0.0
        # Chunks that continue the timeline keep their times; a chunk that starts again
        # (an upload whose clock restarts at 0) is placed where the previous one ended.
        shift = float(state["time_offset"])
        if t0 + shift < float(state["end_time"]) - tol:
            shift = float(state["end_time"]) - t0
        mode, warm_paths = "state", []
    else:
        enc = _encode_params(src, info)
        tracker = Tracker(fps=enc["fps"], max_missing_s=options.max_missing_s)
        first = frame_offset if frame_offset is not None else (chunk.start_frame if chunk else 0)
        shift = 0.0
        warm = [_as_chunk(v) for v in (warmup if isinstance(warmup, (list, tuple)) else [warmup])
                if v is not None]
        warm_paths = [path for path, _ in warm]
        # the split counted their frames; paths alone are counted by the pipeline
        if warm and all(c is not None for _, c in warm):
            warm_total = sum(c.frames for _, c in warm)
        mode = "warmup" if warm_paths else "first"
    n_warm = 0
    if warm_paths:
        n_warm = (int(round(warmup_s * enc["fps"])) if warmup_s is not None
                  else warmup_frames(enc["fps"], options))
    look_paths = _as_paths(lookahead)
    carried = sorted(t.id for t in tracker.tracks)
    source_name = names[0] if names else str(src)
    writer = FrameReport(report, source_name) if report else None
    warm_seen: list[dict] = []

    def on_warmup(index, seconds, faces):
        warm_seen.append({"frame": index, "time": round(seconds, 4), "faces": [f.to_dict() for f in faces]})

    summary = None
    try:
        around = Around(warmup=warm_paths, warmup_frames=n_warm, warmup_total=warm_total,
                        on_warmup=on_warmup, lookahead=look_paths[0] if look_paths else None,
                        time_offset=shift, rate=Fraction(enc["rate"]), rotation=enc["rotation"],
                        time_base=Fraction(enc["time_base"]))
        summary, after = process_video(
            engine, src, dst_chunk,
            operation or Mask(mask_options or MaskOptions(), engine.detector if verify else None),
            options, tracker=tracker, frame_offset=first, on_frame=writer, around=around)
        if names:
            summary.update(source=names[0], output=names[1])
        summary.update(mode=mode, chunk=None if chunk is None else chunk.index, first_frame=first,
                       time_offset=shift, tracks_in=carried)
        if writer:
            extra = {"chunk": {"index": None if chunk is None else chunk.index, "mode": mode,
                               "first_frame": first, "frames": summary["frames"], "time_offset": shift,
                               "tracks_in": carried},
                     "warmup": warm_seen}
            writer.close(summary, extra)
            writer = None
    finally:
        if writer:
            writer.close(None)
    new_state = {"format": STATE_FORMAT, "version": STATE_VERSION,
                 "chunks": (int(state.get("chunks", 0)) if state else 0) + 1,
                 "next_frame": first + summary["frames"], "time_offset": shift,
                 "end_time": summary["end_time"], "encode": enc,
                 "options": {"max_missing_s": options.max_missing_s, "lookahead": options.lookahead},
                 "tracker": after.state()}
    return summary, json.loads(json.dumps(new_state))


# --- merge -----------------------------------------------------------------------------------
@dataclass
class _Piece:
    path: Path
    time_base: Fraction
    first_pts: int
    first_dts: int
    last_dts: int
    end_pts: int
    packets: int
    codec: str
    width: int
    height: int
    extradata: bytes
    audio: dict | None


def _scan(path: Path, index: int) -> _Piece:
    if not path.is_file():
        raise BadInput(f"chunk {index} is missing: {path}")
    try:
        container = open_input(path)
    except BadInput as exc:
        raise BadInput(f"chunk {index} ({path.name}): {exc}") from None
    try:
        stream = container.streams.video[0]
        cc = stream.codec_context
        first_pts = first_dts = last_dts = end_pts = None
        packets = 0
        for p in container.demux(stream):
            if not p.size:
                continue
            pts = p.pts if p.pts is not None else p.dts
            dts = p.dts if p.dts is not None else pts
            if pts is None:
                raise BadInput(f"chunk {index} ({path.name}): packets without timestamps")
            first_pts = pts if first_pts is None else min(first_pts, pts)
            first_dts = dts if first_dts is None else first_dts
            last_dts = dts
            end = pts + (p.duration or 0)
            end_pts = end if end_pts is None else max(end_pts, end)
            packets += 1
        if not packets:
            raise BadInput(f"chunk {index} ({path.name}): no video frames")
        a = container.streams.audio[0] if container.streams.audio else None
        audio = None if a is None else {"codec": a.codec_context.name,
                                        "sample_rate": a.codec_context.sample_rate}
        return _Piece(path, stream.time_base, first_pts, first_dts, last_dts, end_pts, packets,
                      cc.name, cc.width, cc.height, bytes(cc.extradata or b""), audio)
    except av.error.FFmpegError as exc:
        raise BadInput(f"chunk {index} ({path.name}): corrupt video data: {exc}") from None
    finally:
        container.close()


def _shift(packet, ticks: int) -> None:
    """Move a packet along its stream's clock by `ticks` (its time base)."""
    if ticks:
        packet.pts = None if packet.pts is None else packet.pts + ticks
        packet.dts = None if packet.dts is None else packet.dts + ticks


def merge_chunks(chunk_paths: list, dst: Path | str, *, audio: Path | str | None = None,
                 info: dict | None = None) -> dict[str, Any]:
    """Join processed chunks into `dst` without re-encoding: their packets are copied one
    after the other. Chunks keep their timestamps when these continue the previous chunk's;
    a chunk whose clock starts again is moved to where the previous one ended. `audio` (the
    split's audio file) is put back as it is; without it, audio inside the chunks is joined
    the same way. A face swap's synthetic mark (the first chunk's container tags) is kept.
    Every chunk is checked first (there, a video, encoded like the first);
    `dst` appears complete or not at all. With `info` (the split's), the chunks must cover
    the source's timeline without a gap."""
    start = time.perf_counter()
    if not chunk_paths:
        raise BadInput("no chunks to merge")
    pieces = [_scan(_as_chunk(p)[0], i) for i, p in enumerate(chunk_paths)]
    ref = pieces[0]
    for i, p in enumerate(pieces[1:], 1):
        for what in ("codec", "width", "height", "extradata"):
            if getattr(p, what) != getattr(ref, what):
                raise BadInput(f"chunk {i} ({p.path.name}) is not encoded like chunk 0 ({what} differs): "
                               "chunks must be encoded alike to be joined without re-encoding")
    frames = sum(p.packets for p in pieces)
    audio_path = Path(audio) if audio else None
    if audio_path is not None:
        if not audio_path.is_file():
            raise BadInput(f"audio file is missing: {audio_path}")
        with open_input_audio(audio_path):
            pass
    chunk_audio = audio_path is None and all(p.audio for p in pieces) and \
        len({(p.audio["codec"], p.audio["sample_rate"]) for p in pieces}) == 1

    # The timeline: shift (in each chunk's own ticks) so that pts continue and dts rise.
    shifts, prev_end, prev_dts = [], None, None
    for p in pieces:
        tb = p.time_base
        shift = Fraction(0)
        if prev_end is not None:
            half = Fraction(1, 2) / Fraction(info["fps"]) if info and info.get("fps") else 0
            if p.first_pts * tb < prev_end - half:
                shift = prev_end - p.first_pts * tb
            if (p.first_dts * tb + shift) <= prev_dts:
                shift = prev_dts - p.first_dts * tb + tb
        ticks = round(shift / tb)
        shifts.append(ticks)
        prev_end = (p.end_pts + ticks) * tb
        prev_dts = (p.last_dts + ticks) * tb
    if info and info.get("fps"):
        _check_coverage(pieces, shifts, info)

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.{uuid.uuid4().hex[:8]}.part{dst.suffix}")
    counts = {"frames": 0, "video_bytes": 0, "audio_packets": 0, "start": None, "end": None}
    out = first_in = audio_in_c = None
    try:
        first_in = open_input(ref.path)
        # a face swap's chunks carry the synthetic mark (faceflow.synthetic): so does the whole
        source_type = first_in.metadata.get(synthetic.DIGITAL_SOURCE_TYPE_TAG)
        marks = synthetic.video_tags(source_type) if source_type else {}
        out = av.open(str(tmp), "w", options=mux_options(tmp, ref.time_base, bool(marks)))
        out.metadata.update(marks)
        vout = out.add_stream_from_template(first_in.streams.video[0])
        aout = a_template = None
        if audio_path is not None:
            audio_in_c = open_input_audio(audio_path)
            a_template = audio_in_c.streams.audio[0]
        elif chunk_audio:
            a_template = first_in.streams.audio[0]
        reencode = False
        if a_template is not None:
            aout = audio_stream(a_template, out)
            reencode = aout.codec_context.is_encoder and aout.name != a_template.codec_context.name

        def video_packets() -> Iterator:
            for p, ticks in zip(pieces, shifts):
                with av.open(str(p.path)) as c:
                    s = c.streams.video[0]
                    for packet in c.demux(s):
                        if not packet.size:
                            continue
                        _shift(packet, ticks)
                        when = packet.dts if packet.dts is not None else packet.pts
                        yield float(when * packet.time_base), 0, packet

        def audio_packets() -> Iterator:
            if audio_in_c is not None:
                s = audio_in_c.streams.audio[0]
                for packet in audio_in_c.demux(s):
                    if packet.size:
                        when = packet.dts if packet.dts is not None else (packet.pts or 0)
                        yield float(when * packet.time_base), 1, packet
                return
            if not chunk_audio:
                return
            last = None
            for p, ticks in zip(pieces, shifts):
                with av.open(str(p.path)) as c:
                    s = c.streams.audio[0]
                    move = round(ticks * p.time_base / s.time_base) if ticks else 0
                    for packet in c.demux(s):
                        if not packet.size:
                            continue
                        _shift(packet, move)
                        when = packet.dts if packet.dts is not None else (packet.pts or 0)
                        at = when * packet.time_base
                        if last is not None and at <= last:
                            continue  # a piece's encoder priming overlaps the piece before
                        last = at
                        yield float(at), 1, packet

        # by time, video first on a tie; heapq.merge never compares the packets themselves
        merged = heapq.merge(video_packets(), audio_packets(), key=lambda item: (item[0], item[1]))
        for _, kind, packet in merged:
            if kind == 0:
                counts["frames"] += 1
                counts["video_bytes"] += packet.size
                begin = float(packet.pts * packet.time_base)
                finish = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                counts["start"] = begin if counts["start"] is None else min(counts["start"], begin)
                counts["end"] = finish if counts["end"] is None else max(counts["end"], finish)
                packet.stream = vout
                out.mux(packet)
            else:
                counts["audio_packets"] += 1
                if reencode:
                    for frame in packet.decode():
                        frame.pts = None
                        for p in aout.encode(frame):
                            out.mux(p)
                else:
                    packet.stream = aout
                    out.mux(packet)
        if reencode:
            for p in aout.encode():
                out.mux(p)
        out.close()
        out = None
        os.replace(tmp, dst)
    except av.error.FFmpegError as exc:
        raise BadInput(f"merge failed: {exc}") from None
    finally:
        for c in (first_in, audio_in_c, out):
            if c is not None:
                c.close()
        tmp.unlink(missing_ok=True)
    return {"output": str(dst), "chunks": len(pieces), "frames": counts["frames"],
            "start_time": counts["start"], "end_time": counts["end"],
            "duration": None if counts["end"] is None else counts["end"] - counts["start"],
            "video_bytes": counts["video_bytes"], "audio": aout is not None,
            "audio_packets": counts["audio_packets"],
            "moved": [i for i, t in enumerate(shifts) if t],
            "ms": round((time.perf_counter() - start) * 1000, 1)}


def _check_coverage(pieces: list[_Piece], shifts: list[int], info: dict) -> None:
    """With the split's info, the chunks must cover the source's timeline end to end: a
    chunk left out (or cut short) shows as a gap, whatever the frame counts say."""
    slack = 2 / float(info["fps"])  # a frame or two: durations of variable-rate frames
    spans = [(float((p.first_pts + t) * p.time_base), float((p.end_pts + t) * p.time_base))
             for p, t in zip(pieces, shifts)]
    where = [("start", info.get("start_time"), spans[0][0]), ("end", info.get("end_time"), spans[-1][1])]
    for what, want, have in where:
        if want is not None and abs(want - have) > slack:
            raise BadInput(f"the chunks {what} at {have:.3f} s, the source at {want:.3f} s: "
                           "a chunk is missing or incomplete")
    for i in range(1, len(spans)):
        if abs(spans[i][0] - spans[i - 1][1]) > slack:
            raise BadInput(f"a gap between chunk {i - 1} (ends {spans[i - 1][1]:.3f} s) and chunk {i} "
                           f"(starts {spans[i][0]:.3f} s): a chunk is missing or out of order")


def open_input_audio(path: Path):
    """An audio-only file (the split's audio), opened; BadInput when it is not one."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise BadInput(f"not a readable audio file: {path.name}: {exc}") from None
    if not container.streams.audio:
        container.close()
        raise BadInput(f"no audio stream in {path.name}")
    return container


# --- reports ---------------------------------------------------------------------------------
def _pairs(a: list[dict], b: list[dict], threshold: float) -> list[tuple[dict, dict]]:
    """Faces of one frame as seen twice, paired greedily by IoU."""
    scored = sorted(((iou(fa["box"], fb["box"]), i, j) for i, fa in enumerate(a) for j, fb in enumerate(b)),
                    reverse=True)
    used_a, used_b, out = set(), set(), []
    for score, i, j in scored:
        if score < threshold or i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        out.append((a[i], b[j]))
    return out


def _match_tracks(warm: list[dict], before: list[dict]) -> dict[int, int]:
    """Local track ids of a warm-up → the ids the previous chunk gave the same faces. The
    warm-up frames are the last frames of the chunks before."""
    seen = before[-len(warm):] if warm else []
    votes: dict[tuple[int, int], int] = {}
    for w, b in zip(warm[-len(seen):] if seen else [], seen):
        for fa, fb in _pairs(w["faces"], b["faces"], MATCH_IOU):
            if fa.get("track") is not None and fb.get("track") is not None:
                key = (fa["track"], fb["track"])
                votes[key] = votes.get(key, 0) + 1
    mapping: dict[int, int] = {}
    taken = set()
    for (local, glob), _ in sorted(votes.items(), key=lambda kv: (-kv[1], kv[0])):
        if local in mapping or glob in taken:
            continue
        mapping[local] = glob
        taken.add(glob)
    return mapping


def merge_reports(reports: list) -> dict[str, Any]:
    """Join chunk reports (dicts, or paths of JSON files) in order into one report of the
    whole video: frames numbered from 0, one track id per face across chunks. Reports from
    stream mode already share ids; in parallel mode each chunk's tracks are matched with the
    previous chunk's through the warm-up frames (the same frames, tracked by both) and
    relabelled; a track first seen in a chunk gets the next free id."""
    loaded = [json.loads(Path(r).read_text()) if not isinstance(r, dict) else r for r in reports]
    if not loaded:
        raise BadInput("no reports to merge")
    frames: list[dict] = []
    next_id = 1
    relabelled = []
    for k, rep in enumerate(loaded):
        meta = rep.get("chunk") or {}
        warm = rep.get("warmup") or []
        # ids are already global in the first chunk and where the state was carried on;
        # elsewhere they are the chunk's own: matched through the warm-up, or new
        fresh = k > 0 and meta.get("mode") != "state"
        mapping = _match_tracks(warm, frames) if fresh and warm else {}
        for entry in rep["frames"]:
            faces = []
            for face in entry["faces"]:
                face = dict(face)
                tid = face.get("track")
                if tid is not None:
                    if tid not in mapping:
                        mapping[tid] = next_id if fresh else tid
                    face["track"] = mapping[tid]
                    next_id = max(next_id, face["track"] + 1)
                faces.append(face)
            frames.append({**entry, "frame": len(frames), "faces": faces})
        relabelled.append({"chunk": meta.get("index", k), "mode": meta.get("mode"),
                           "frames": len(rep["frames"]),
                           "relabelled": {str(a): b for a, b in mapping.items() if a != b}})
    tracks = {f["track"] for e in frames for f in e["faces"] if f.get("track") is not None}
    summary = {"frames": len(frames), "frames_with_faces": sum(bool(e["faces"]) for e in frames),
               "faces": sum(len(e["faces"]) for e in frames), "tracks": len(tracks),
               "chunks": len(loaded)}
    # what a reviewer needs (faceflow.review): the size the boxes are in and the track list
    index, first = TrackIndex(), loaded[0].get("summary") or {}
    for entry in frames:
        index(entry["frame"], entry.get("time", 0.0), [Face.from_dict(f) for f in entry["faces"]])
    return {"source": loaded[0].get("source"), "frames": frames, "summary": summary,
            "chunks": relabelled, "width": first.get("width"), "height": first.get("height"),
            "fps": first.get("fps"), "tracks": index.tracks()}


# --- local driver ----------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(engine_kwargs: dict) -> None:
    from .engine import Engine
    import cv2
    cv2.setNumThreads(1)
    _worker["engine"] = Engine(**engine_kwargs)


def _run_chunk(kwargs: dict) -> dict:
    summary, _ = process_chunk(_worker["engine"], **kwargs)
    return summary


def _engine_kwargs(engine, threads: int) -> dict:
    det = engine.detector
    return {"detector": det.name, "model_dir": str(det.path.parent), "providers": "cpu",
            "threads": threads, "max_side": det.max_side, "threshold": engine.threshold}


def warmup_for(split: SplitResult, k: int, options: VideoOptions | None = None) -> list[Chunk]:
    """The chunks before chunk `k` that its warm-up needs, in order (none for the first):
    the one before, or more when that one is shorter than the warm-up (chunks shorter than
    max_missing_s + WARMUP_SETTLE_S)."""
    need = warmup_frames(split.info["fps"], options)
    out, have = [], 0
    for c in reversed(split.chunks[:k]):
        out.insert(0, c)
        have += c.frames
        if have >= need:
            break
    return out


def process_video_in_chunks(engine, src: Path | str, dst: Path | str, *, workers: int = 1,
                            target_seconds: float = 2.0, report: Path | str | None = None,
                            mode: str = "auto", mask_options: MaskOptions | None = None,
                            video_options: VideoOptions | None = None, verify: bool = False,
                            work_dir: Path | str | None = None, keep: bool = False,
                            engine_kwargs: dict | None = None) -> dict[str, Any]:
    """Split `src`, anonymise the chunks, merge: one machine doing what the Lambda workers do.

    mode "warmup": every chunk on its own (in a pool of `workers` processes, each loading the
    engine), warming up on the chunk before; "state": in order, each chunk starting from the
    state the previous one left (no warm-up to pay, no parallelism); "auto": state for one
    worker, warmup otherwise. Returns the summary with the time spent in each stage.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if mode == "auto":
        mode = "state" if workers <= 1 else "warmup"
    if mode not in ("state", "warmup"):
        raise ValueError("mode must be auto, state or warmup")
    options = video_options or VideoOptions()
    base = Path(work_dir) if work_dir else dst.parent
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".faceflow-chunks-", dir=base))
    timing: dict[str, float] = {}
    try:
        split = split_video(src, work / "in", target_seconds)
        timing["split_s"] = time.perf_counter() - t0
        chunks = split.chunks
        outs = [str(work / "out" / f"chunk_{c.index:05d}.mp4") for c in chunks]
        reps = [str(work / "out" / f"chunk_{c.index:05d}.json") for c in chunks]
        common = dict(mask_options=mask_options, video_options=options, info=split.info, verify=verify)
        t1 = time.perf_counter()
        summaries = []
        if mode == "state":
            state = None
            for k, c in enumerate(chunks):
                nxt = chunks[k + 1] if k + 1 < len(chunks) else None
                summary, state = process_chunk(engine, c, outs[k], state, lookahead=nxt,
                                               report=reps[k], **common)
                summaries.append(summary)
        else:
            tasks = [dict(src_chunk=c, dst_chunk=outs[k], report=reps[k],
                          warmup=warmup_for(split, k, options) or None,
                          lookahead=chunks[k + 1] if k + 1 < len(chunks) else None, **common)
                     for k, c in enumerate(chunks)]
            if workers <= 1 or len(chunks) == 1:
                _worker["engine"] = engine
                try:
                    summaries = [_run_chunk(t) for t in tasks]
                finally:
                    _worker.pop("engine", None)
            else:
                import multiprocessing
                threads = max(1, (os.cpu_count() or 1) // workers)
                kwargs = engine_kwargs or _engine_kwargs(engine, threads)
                with ProcessPoolExecutor(min(workers, len(chunks)), initializer=_init_worker,
                                         initargs=(kwargs,),
                                         mp_context=multiprocessing.get_context("spawn")) as pool:
                    summaries = list(pool.map(_run_chunk, tasks))
        timing["process_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        merged = merge_chunks(outs, dst, audio=split.audio, info=split.info)
        timing["merge_s"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        joined = merge_reports(reps)
        if report:
            joined["summary"]["output"] = str(dst)
            atomic_write(report, json.dumps(joined).encode())
        timing["report_s"] = time.perf_counter() - t3
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    timing["total_s"] = time.perf_counter() - t0
    s = joined["summary"]
    return {"source": str(src), "output": str(dst), "mode": mode, "workers": workers,
            "chunks": len(chunks), "frames": merged["frames"], "frames_with_faces": s["frames_with_faces"],
            "faces": s["faces"], "tracks": s["tracks"], "audio": merged["audio"],
            "duration": merged["duration"],
            "warmup_frames": sum(x.get("warmup_frames", 0) for x in summaries),
            "lookahead_frames": sum(x.get("lookahead_frames", 0) for x in summaries),
            "timing": {k: round(v, 3) for k, v in timing.items()},
            "frames_per_s": round(merged["frames"] / timing["total_s"], 2),
            "ms": round(timing["total_s"] * 1000, 1),
            "work_dir": str(work) if keep else None}
