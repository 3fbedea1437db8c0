"""Rendering an edited report: exactly the faces a reviewer kept, added or exempted, masked
without running the detector again (except to follow a box drawn by hand on a video).

    report = review.load(Path("edited.json").read_text())
    result = review.render_photo(photo_bytes, report)                  # bytes, format, report
    summary = review.render_video(engine, "in.mp4", "out.mp4", report, report_out="out.json")

The edited report is what `faceflow anonymize --report` or `faceflow analyze` wrote, changed:

- photos: `faces`; a face may carry `"exempt": true` (left unmasked); a removed face is simply
  absent; a face drawn by hand has `"source": "manual"` (only `box` is required). An animated
  GIF's report may give `frames` (`[{"frame": i, "faces": [...]}]`, one per frame), else
  `faces` apply to every frame.
- videos: `frames` as written (faces per frame, each with its `track`); a face may be removed or
  exempted on one frame; `tracks: [{"track": id, "exempt": true | "dropped": true}]` exempts a
  whole track or drops it (not a face); `manual: [{"frame": N, "box": [x, y, w, h]}]` starts a
  new track on frame N that is followed through the frames after it (and up to
  BACKWARD_S seconds before it) as long as it holds; optional `first_frame`/`last_frame` bound it.

Both need `width` and `height`, the upright size the boxes are in: a report of another image
is refused. Every refusal is a ReportError (a ValueError) naming the field.
"""
from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import cv2
import numpy as np

from . import images
from .anonymize import MaskOptions
from .face import EXEMPT, FOLLOWED, MANUAL, Face, iou
from .images import BadInput
from .operations import Mask

DROPPED = "dropped"   # a track's key in an edited report: not a face, neither masked nor reported
# How far a box drawn by hand is followed back from its frame: the frames before it are kept
# (at the detector's size) in a buffer of this length.
BACKWARD_S = 2.0
# Following a hand-drawn box: the detector looks at this lower threshold (the face was
# missed at the normal one) and a detection that overlaps the followed box by at least
# SNAP_IOU replaces it and re-seeds the tracker.
FOLLOW_THRESHOLD = 0.3
SNAP_IOU = 0.3
# The followed box stops when less than this share of it is inside the frame.
MIN_INSIDE = 0.3
# Frames are followed at most this large (the detectors' default input) when no engine says.
FOLLOW_SIDE = 640


# landmarks pass through as given (Face.to_dict writes them from the attributes then)
_FACE_KEYS = {"box", "score", "track", "source", EXEMPT}


class ReportError(BadInput):
    """An edited report that cannot be rendered; the message names the field."""


# --- reading -----------------------------------------------------------------------------------
def load(source: dict | str | bytes | Path) -> dict[str, Any]:
    """An edited report: a dict, JSON text or bytes, or a file path."""
    if isinstance(source, Path):
        try:
            source = source.read_bytes()
        except OSError as exc:
            raise ReportError(f"report: cannot read {source}: {exc.strerror}") from None
    if isinstance(source, (str, bytes, bytearray)):
        try:
            source = json.loads(source)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ReportError(f"report: not JSON ({exc})") from None
    if not isinstance(source, dict):
        raise ReportError("report: expected a JSON object")
    return source


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReportError(f"{name}: expected a whole number, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _list(report: dict, key: str, name: str, required: bool = False) -> list:
    value = report.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise ReportError(f"{name}: expected a list, got {_show(value)}")
    return value


def _flag(entry: dict, key: str, name: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise ReportError(f"{name}.{key}: expected true or false, got {_show(value)}")
    return value


def check_size(report: dict, width: int, height: int) -> None:
    """The report's `width` and `height` must be the image's (upright)."""
    for key, actual in (("width", width), ("height", height)):
        if key not in report:
            raise ReportError(f"{key}: missing (the report must give the image size its boxes are in)")
        if not _number(report[key]) or report[key] != actual:
            raise ReportError(f"{key}: the report says {_show(report[key])}, the image is {width}x{height}: "
                              "a report of another image")


def parse_box(value: Any, name: str, width: int, height: int) -> tuple[float, float, float, float]:
    """[x, y, w, h] of four finite numbers, w and h positive, overlapping the image."""
    if not isinstance(value, list) or len(value) != 4 or not all(_number(v) for v in value):
        raise ReportError(f"{name}: expected [x, y, w, h], four numbers, got {_show(value)}")
    x, y, w, h = (float(v) for v in value)
    if w <= 0 or h <= 0:
        raise ReportError(f"{name}: width and height must be positive, got {_show(value)}")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise ReportError(f"{name}: {_show(value)} lies outside the {width}x{height} image")
    return x, y, w, h


def parse_face(entry: Any, name: str, width: int, height: int) -> Face:
    """A face record of a report: `box` required; `score`, `track`, `source`, `exempt` kept."""
    if not isinstance(entry, dict):
        raise ReportError(f"{name}: expected a face object, got {_show(entry)}")
    if "box" not in entry:
        raise ReportError(f"{name}.box: missing")
    box = parse_box(entry["box"], f"{name}.box", width, height)
    score = entry.get("score", 1.0)
    if not _number(score):
        raise ReportError(f"{name}.score: expected a number, got {_show(score)}")
    track = entry.get("track")
    if track is not None:
        _integer(track, f"{name}.track")
    source = entry.get("source", MANUAL if track is None and "score" not in entry else None)
    if source is not None and not isinstance(source, str):
        raise ReportError(f"{name}.source: expected a string, got {_show(source)}")
    face = Face(box=box, score=float(score), track=track)
    if source is not None:
        face.source = source
        if track is None:
            face.attributes["source"] = source  # to_dict writes a source only for tracked faces
    if _flag(entry, EXEMPT, name):
        face.attributes[EXEMPT] = True
    # what else the record carried (age, gender, ...) stays in the rendered report
    face.attributes.update({k: v for k, v in entry.items() if k not in _FACE_KEYS})
    return face


def masked(faces: list[Face]) -> list[Face]:
    """The faces to mask: all but the exempt ones."""
    return [f for f in faces if not f.attributes.get(EXEMPT)]


class ReviewMask(Mask):
    """Masking as `anonymize` does it, of every face but the exempt ones, without the
    detector's check (the reviewer's faces are the answer; the detector is not asked)."""

    def apply(self, pixels: np.ndarray, faces: list[Face]) -> np.ndarray:
        return super().apply(pixels, masked(faces))

    def apply_planes(self, planes, subsampling, faces) -> None:
        super().apply_planes(planes, subsampling, masked(faces))


# --- photos ------------------------------------------------------------------------------------
def photo_faces(report: dict, width: int, height: int, frames: int = 1) -> list[list[Face]]:
    """The faces of each frame of a still (one, or each frame of an animated GIF)."""
    check_size(report, width, height)
    per_frame = _list(report, "frames", "frames") if frames > 1 else []
    if per_frame:
        if len(per_frame) != frames:
            raise ReportError(f"frames: {len(per_frame)} given, the image has {frames}")
        out = []
        for i, entry in enumerate(per_frame):
            if not isinstance(entry, dict):
                raise ReportError(f"frames[{i}]: expected an object, got {_show(entry)}")
            out.append([parse_face(f, f"frames[{i}].faces[{k}]", width, height)
                        for k, f in enumerate(_list(entry, "faces", f"frames[{i}].faces", True))])
        return out
    faces = [parse_face(f, f"faces[{k}]", width, height)
             for k, f in enumerate(_list(report, "faces", "faces", True))]
    return [faces] + [[Face(f.box, f.score, track=f.track, source=f.source, attributes=dict(f.attributes))
                       for f in faces] for _ in range(frames - 1)]


def render_photo(data: bytes, report: dict | str | bytes | Path, options: MaskOptions | None = None,
                 out_format: str | None = None, source: str = "", memory_bytes: int | None = None):
    """Mask the faces of an edited report on a still; an engine.Result (bytes, format, and
    the report of what was rendered, re-editable). No detector runs."""
    from .engine import Result
    start = time.perf_counter()
    report = load(report)
    fmt = (out_format or images.header(data).format).upper()
    if not images.can_write(fmt):
        fmt = "JPEG"
    picture = images.decode(data, memory_bytes=memory_bytes, out_format=fmt)
    frames = picture.frames if picture.frames else [picture.pixels]
    found = photo_faces(report, picture.width, picture.height, len(frames))
    operation = ReviewMask(options or MaskOptions())
    for pixels, faces in zip(frames, found):
        operation.apply(pixels, faces)
    out = images.encode(picture, fmt)
    rendered = {"source": source, "width": picture.width, "height": picture.height, "format": fmt,
                "faces": [f.to_dict() for f in found[0]], "masked": len(masked(found[0])),
                "ms": round((time.perf_counter() - start) * 1000, 1)}
    if len(found) > 1:
        rendered["frames"] = [{"frame": i, "faces": [f.to_dict() for f in faces]}
                              for i, faces in enumerate(found)]
    return Result(out, fmt, rendered)


def render_photo_file(src: Path | str, dst: Path | str, report, options: MaskOptions | None = None
                      ) -> dict[str, Any]:
    src, dst = Path(src), Path(dst)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {src}: {exc.strerror}") from None
    result = render_photo(data, report, options, images.format_for(dst, images.sniff(data)[0]), str(src))
    images.atomic_write(dst, result.data)
    result.report["output"] = str(dst)
    return result.report


def follows(report: dict) -> bool:
    """Whether rendering `report` follows boxes drawn by hand (the only use of a detector)."""
    return bool(report.get("manual"))


# --- videos ------------------------------------------------------------------------------------
@dataclass
class Seed:
    """A box drawn by hand on one frame: the start of a track that is followed."""
    frame: int
    box: tuple[float, float, float, float]
    track: int
    first_frame: int
    last_frame: int


@dataclass
class VideoEdit:
    """An edited video report, checked: faces per frame (exempt ones flagged; dropped tracks
    gone) and the hand-drawn boxes to follow."""
    width: int
    height: int
    frames: dict[int, list[Face]]
    seeds: list[Seed]
    followed: dict[int, int] = field(default_factory=dict)  # seed track → frames it covers


def video_edit(report: dict, width: int, height: int, frame_count: int) -> VideoEdit:
    """Check an edited video report against the video (its upright size and frame count)."""
    check_size(report, width, height)

    def frame_number(value, name):
        n = _integer(value, name)
        if not 0 <= n < frame_count:
            raise ReportError(f"{name}: {n} is out of range (the video has {frame_count} frames, 0-{frame_count - 1})")
        return n

    frames: dict[int, list[Face]] = {}
    for i, entry in enumerate(_list(report, "frames", "frames", True)):
        if not isinstance(entry, dict):
            raise ReportError(f"frames[{i}]: expected an object, got {_show(entry)}")
        n = frame_number(entry.get("frame"), f"frames[{i}].frame")
        if n in frames:
            raise ReportError(f"frames[{i}].frame: frame {n} is given twice")
        frames[n] = [parse_face(f, f"frames[{i}].faces[{k}]", width, height)
                     for k, f in enumerate(_list(entry, "faces", f"frames[{i}].faces", True))]
    known = {f.track for faces in frames.values() for f in faces if f.track is not None}
    exempt, dropped = set(), set()
    for i, entry in enumerate(_list(report, "tracks", "tracks")):
        if not isinstance(entry, dict):
            raise ReportError(f"tracks[{i}]: expected an object, got {_show(entry)}")
        track = _integer(entry.get("track"), f"tracks[{i}].track")
        if track not in known:
            raise ReportError(f"tracks[{i}].track: no face of the report's frames is on track {track}")
        if _flag(entry, EXEMPT, f"tracks[{i}]"):
            exempt.add(track)
        if _flag(entry, DROPPED, f"tracks[{i}]"):
            dropped.add(track)
    for n, faces in frames.items():
        faces[:] = [f for f in faces if f.track not in dropped]
        for f in faces:
            if f.track in exempt:
                f.attributes[EXEMPT] = True
    seeds = []
    next_track = max(known, default=0) + 1
    for i, entry in enumerate(_list(report, "manual", "manual")):
        name = f"manual[{i}]"
        if not isinstance(entry, dict):
            raise ReportError(f"{name}: expected {{\"frame\": N, \"box\": [x, y, w, h]}}, got {_show(entry)}")
        n = frame_number(entry.get("frame"), f"{name}.frame")
        if "box" not in entry:
            raise ReportError(f"{name}.box: missing")
        box = parse_box(entry["box"], f"{name}.box", width, height)
        first = frame_number(entry.get("first_frame", 0), f"{name}.first_frame")
        last = frame_number(entry.get("last_frame", frame_count - 1), f"{name}.last_frame")
        if not first <= n <= last:
            raise ReportError(f"{name}: frame {n} must lie within first_frame {first} and last_frame {last}")
        seeds.append(Seed(n, box, next_track, first, last))
        frames.setdefault(n, []).append(Face(box, 1.0, track=next_track, source=MANUAL))
        next_track += 1
    return VideoEdit(width, height, frames, seeds)


class BoxFollower:
    """Follows one box from frame to frame: OpenCV's MIL tracker (the one opencv-python-headless
    has) on the detector-size frames, snapped to a detection at FOLLOW_THRESHOLD that overlaps
    it (then re-seeded there), stopped at a scene cut, when MIL loses it or when it leaves the
    frame. Boxes are in the frames' own pixels."""

    def __init__(self, bgr: np.ndarray, box, detect: Callable[[np.ndarray], list[Face]] | None):
        from .tracker import Tracker
        self.detect = detect
        self.cuts = Tracker()  # its scene-cut test, one definition
        self.cuts.is_cut(bgr)
        self._seed(bgr, box)
        self.box = tuple(box)

    def _seed(self, bgr, box) -> None:
        # MIL takes a box inside the frame (it fails to allocate for one across an edge)
        h, w = bgr.shape[:2]
        x, y, bw, bh = box
        x1, y1 = max(0, int(round(x))), max(0, int(round(y)))
        x2, y2 = min(w, int(round(x + bw))), min(h, int(round(y + bh)))
        self.mil = cv2.TrackerMIL_create()
        self.mil.init(bgr, (x1, y1, max(2, x2 - x1), max(2, y2 - y1)))

    def step(self, bgr: np.ndarray) -> tuple[float, float, float, float] | None:
        """The box on the next frame, or None once it is lost."""
        if self.cuts.is_cut(bgr):
            return None
        ok, found = self.mil.update(bgr)
        if not ok:
            return None
        box = tuple(float(v) for v in found)
        if self.detect is not None:
            best = max(((iou(box, d.box), d) for d in self.detect(bgr)), key=lambda p: p[0], default=None)
            if best is not None and best[0] >= SNAP_IOU:
                box = tuple(float(v) for v in best[1].box)
                self._seed(bgr, box)
        h, w = bgr.shape[:2]
        x, y, bw, bh = box
        inside = max(0.0, min(x + bw, w) - max(x, 0.0)) * max(0.0, min(y + bh, h) - max(y, 0.0))
        if inside < MIN_INSIDE * bw * bh:
            return None
        self.box = box
        return box


def follow_seeds(engine, src: Path | str, edit: VideoEdit, backward_s: float = BACKWARD_S) -> None:
    """Add to `edit.frames` the boxes each hand-drawn box is followed to: one decoding pass at
    the detector's size, forward from each seed's frame and back over the frames kept
    before it. `engine`: its detector snaps the followed box to faces it finds at
    FOLLOW_THRESHOLD (None: MIL alone)."""
    from .pipeline import Layout, Reader, Segment, open_input
    from .video import probe
    if not edit.seeds:
        return
    info = probe(src)
    side = engine.detector.max_side if engine is not None else FOLLOW_SIDE
    layout = Layout.of(*info.display_size, info.rotation, side)
    scale = layout.detect_scale
    detect = (lambda bgr: engine.detect(bgr, FOLLOW_THRESHOLD)) if engine is not None else None
    by_frame: dict[int, list[Seed]] = {}
    for seed in edit.seeds:
        by_frame.setdefault(seed.frame, []).append(seed)
    last_needed = max(s.last_frame for s in edit.seeds)
    kept: deque = deque(maxlen=max(1, int(round(backward_s * info.fps))))
    active: list[tuple[Seed, BoxFollower]] = []

    def add(seed: Seed, index: int, small_box) -> None:
        box = tuple(v * scale for v in small_box)
        edit.frames.setdefault(index, []).append(Face(box, 0.0, track=seed.track, source=FOLLOWED))
        edit.followed[seed.track] = edit.followed.get(seed.track, 1) + 1

    reader = Reader([Segment([Path(src)])], layout, fps=info.fps, keep_pixels=False,
                    opened={Path(src): open_input(src)})
    try:
        for frame in reader:
            still = []
            for seed, follower in active:
                box = follower.step(frame.small) if frame.index <= seed.last_frame else None
                if box is not None:
                    add(seed, frame.index, box)
                    still.append((seed, follower))
            active = still
            for seed in by_frame.get(frame.index, []):
                small_box = tuple(v / scale for v in seed.box)
                back = BoxFollower(frame.small, small_box, detect)
                for index, small in reversed(kept):
                    if index < seed.first_frame:
                        break
                    box = back.step(small)
                    if box is None:
                        break
                    add(seed, index, box)
                active.append((seed, BoxFollower(frame.small, small_box, detect)))
            kept.append((frame.index, frame.small))
            if frame.index >= last_needed or (not active and frame.index >= max(by_frame)):
                break
    finally:
        reader.close()


class _NoDetector:
    """Stands in for the engine in the render pass: the faces come from the report."""

    def __init__(self, max_side: int):
        self.detector = SimpleNamespace(max_side=max_side)

    def detect_batch(self, frames: list, threshold=None) -> list[list[Face]]:
        return [[] for _ in frames]


class _ReportFaces:
    """Stands in for the tracker in the render pass: each frame's faces are the report's."""

    def __init__(self, frames: dict[int, list[Face]]):
        self.frames = frames

    def update(self, frame: int, detections, bgr=None) -> list[Face]:
        return self.frames.pop(frame, [])


def render_video(engine, src: Path | str, dst: Path | str, report, options: MaskOptions | None = None,
                 video_options=None, report_out: Path | str | None = None, progress=None) -> dict[str, Any]:
    """Mask the faces of an edited video report: the report's faces per frame, hand-drawn
    boxes followed (`engine`'s detector helps there and only there; None: MIL alone). Output
    as `anonymize` writes it (H.264, audio copied, same frames and timestamps, under a
    temporary name); `report_out`: the rendered faces per frame with `tracks`, re-editable."""
    from .video import FrameReport, TrackIndex, count_frames, probe, process_video, report_extra
    report = load(report)
    info = probe(src)
    width, height = info.display_size
    edit = video_edit(report, width, height, count_frames(src))
    follow_seeds(engine, src, edit)
    tracks, counts = TrackIndex(), {"masked": 0}
    writer = FrameReport(report_out, str(src)) if report_out else None

    def on_frame(index: int, seconds: float, faces: list[Face]) -> None:
        tracks(index, seconds, faces)
        counts["masked"] += len(masked(faces))
        if writer:
            writer(index, seconds, faces)

    summary = None
    try:
        # The render pass decodes the detector's copy at a token size: nothing looks at it.
        summary, _ = process_video(_NoDetector(64), src, dst, ReviewMask(options or MaskOptions()),
                                   video_options, tracker=_ReportFaces(edit.frames),
                                   on_frame=on_frame, progress=progress)
        summary.update(masked=counts["masked"], followed={str(k): v for k, v in sorted(edit.followed.items())})
    finally:
        if writer:
            writer.close(summary, summary and report_extra(summary, tracks))
    return summary
