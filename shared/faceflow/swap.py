"""Face swap: the source face (from a photo) pasted onto faces of a photo or a video.

    options = SwapOptions(engine="landmark", largest=True)
    operation = engine.swap_operation(source_jpeg_bytes, options)   # a faceflow Operation
    operation.apply(bgr, faces)                                       # photos; video: pipeline.run

Two engines: "landmark" (faceflow.landmarkswap, the shipped face mesh only) and "inswapper"
(faceflow.inswapper: insightface's INSwapper on an operator's own weights). Which target faces:
all (default), the largest, or the tracks named (video; ids from an `analyze` report).

On video the landmark engine smooths each track's mesh (a One Euro filter, faceflow.smoothing)
so the pasted face does not jitter, and fades a face out over FADE_FRAMES frames once the
detector loses it (the tracker still follows it: a hand in front of it) or once the face is
judged covered while still detected (OcclusionCue: the detector finds a face with a hand over
its mouth at full score), instead of pasting over whatever covers it; it fades back in when the
face is found again, uncovered.

Every output is marked as synthetic (faceflow.synthetic) with the engine's IPTC digital source
type; `Swap.marking` says how, for the report. A swap runs only when asked for by name: nothing
else in faceflow builds a Swap.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from . import images, synthetic
from .face import DETECTED, Face
from .images import BadInput
from .smoothing import OneEuroFilter

ENGINES = ("landmark", "inswapper")
DEFAULT_ENGINE = "landmark"
# A source photo is decoded reduced down to this longer side at most (a 12-megapixel phone photo
# by half): its face keeps far more pixels than any target face needs, in a quarter the memory.
SOURCE_MIN_SIDE = 1600
# Frames over which a lost face's paste fades out, and a found one's fades back in.
FADE_FRAMES = 5
# Occlusion of a detected face, from the mesh model's face-presence logit (OcclusionCue): a face
# counts as covered once the logit falls more than OCCLUSION_ENTER_DROP of the track's reference
# (and at least OCCLUSION_MIN_DROP) below it, and uncovered again once it is back within
# OCCLUSION_LEAVE_DROP. The reference is the median of the track's uncovered frames among the
# last OCCLUSION_WINDOW. Measured on the Pexels clip (README, Face swap): uncovered frames lie
# within 0.16 of their median, frames with a hand over the mouth 0.13-0.7 below it.
OCCLUSION_ENTER_DROP = 0.2
OCCLUSION_LEAVE_DROP = 0.05
OCCLUSION_MIN_DROP = 5.0
OCCLUSION_WINDOW = 120


@dataclass
class SwapOptions:
    """What to swap: `engine` (ENGINES); the source photo's face (`face_index`, counted left
    to right, else the largest); the target faces: all, the `largest`, or `tracks` (video)."""
    engine: str = DEFAULT_ENGINE
    face_index: int | None = None
    largest: bool = False
    tracks: set[int] | None = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise BadInput(f"unknown swap engine {self.engine!r}; choose {' or '.join(ENGINES)}")
        if self.largest and self.tracks:
            raise BadInput("choose either the largest face or tracks, not both")
        if self.face_index is not None and self.face_index < 0:
            raise BadInput("the source face index counts from 0")
        if self.tracks is not None:
            self.tracks = {int(t) for t in self.tracks}

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "face_index": self.face_index, "largest": self.largest,
                "tracks": None if self.tracks is None else sorted(self.tracks)}


def pick_source_face(faces: list[Face], face_index: int | None = None) -> Face:
    """The source photo's face: `face_index` counted left to right, else the largest; a
    clear error when there is none."""
    if not faces:
        raise BadInput("no face found in the source photo: give a photo with one clear face")
    if face_index is not None:
        ordered = sorted(faces, key=lambda f: f.box[0])
        if face_index >= len(ordered):
            raise BadInput(f"source face index {face_index} is out of range: the source photo "
                           f"has {len(ordered)} face(s)")
        return ordered[face_index]
    return max(faces, key=lambda f: f.box[2] * f.box[3])


class OcclusionCue:
    """Whether a tracked face is covered (a hand in front of it) though the detector still
    finds it, from the mesh's face-presence logit frame after frame (see OCCLUSION_*). The
    logit of a clear face differs from face to face (3-65 on faceflow's test photos), so the
    cue compares each face with its own earlier, uncovered frames: the first frames of a track
    are its reference (a face covered from its first frame is not recognised as covered)."""

    def __init__(self):
        self.reference_values: deque[float] = deque(maxlen=OCCLUSION_WINDOW)
        self.covered = False

    def update(self, presence: float | None) -> bool:
        """Take this frame's logit (None: no cue, the state stays) and say whether the face is
        covered."""
        if presence is None:
            return self.covered
        if self.reference_values:
            reference = float(np.median(self.reference_values))
            drop = reference - presence
            if self.covered:
                self.covered = drop > max(OCCLUSION_LEAVE_DROP * abs(reference), OCCLUSION_MIN_DROP / 2)
            else:
                self.covered = drop > max(OCCLUSION_ENTER_DROP * abs(reference), OCCLUSION_MIN_DROP)
        if not self.covered:
            self.reference_values.append(presence)
        return self.covered


@dataclass
class _Track:
    """A video track's swap state: its smoothing filter, the points last pasted and the
    box they were pasted in, its opacity and the frame it was last seen detected."""
    filter: OneEuroFilter
    occlusion: OcclusionCue = field(default_factory=OcclusionCue)
    points: np.ndarray | None = None
    centre: tuple[float, float] | None = None
    opacity: float = 0.0
    frame: int = -1
    frames: int = 0          # frames it was pasted on
    faded: int = 0           # of those, at reduced opacity
    skipped: int = 0         # frames with the face not detected and nothing pasted
    covered: int = 0         # frames detected but judged covered (OcclusionCue)


@dataclass
class Swap:
    """The swap as a faceflow Operation (`apply(bgr, faces)`). `swapper` is an engine object
    (LandmarkSwapper or InswapperSwapper) and `source` what its `prepare` made of the source
    face. `fps` times the smoothing; `smooth=False` turns it off (for the bench's
    comparison). Each face given to `apply` gets a `swap` attribute (in its report record):
    the engine, whether it was swapped and at what opacity, or why not; `tracks()` sums it up
    per track for a video."""
    swapper: Any
    source: Any
    options: SwapOptions = field(default_factory=SwapOptions)
    fps: float = 25.0
    smooth: bool = True
    _tracks: dict[int, _Track] = field(default_factory=dict)
    _largest_track: int | None = None
    _frame: int = 0

    def fresh(self, fps: float | None = None) -> "Swap":
        """The same source and options with no video state (for another file)."""
        return Swap(self.swapper, self.source, self.options, fps=fps or self.fps, smooth=self.smooth)

    @property
    def engine(self) -> str:
        return self.swapper.name

    @property
    def digital_source_type(self) -> str:
        return self.swapper.digital_source_type

    @property
    def container_tags(self) -> dict[str, str]:
        """Tags the video writer puts in the container (faceflow.synthetic)."""
        return synthetic.video_tags(self.digital_source_type)

    def marking(self, kind: str, fmt: str | None = None) -> dict[str, Any]:
        """How the output says it is synthetic, for the report."""
        where = ("container metadata" if kind == "video" else
                 "xmp" if (fmt or "").upper() in synthetic.XMP_FORMATS else "gif comment")
        return {"synthetic": True, "digital_source_type": self.digital_source_type, "where": where}

    def selected(self, faces: list[Face]) -> list[Face]:
        opts = self.options
        if opts.tracks is not None:
            return [f for f in faces if f.track in opts.tracks]
        if opts.largest and faces:
            if self._largest_track is not None:  # stay on one face through a video
                same = [f for f in faces if f.track == self._largest_track]
                if same:
                    return same
            biggest = max(faces, key=lambda f: f.box[2] * f.box[3])
            self._largest_track = biggest.track
            return [biggest]
        return list(faces)

    def apply(self, pixels: np.ndarray, faces: list[Face]) -> np.ndarray:
        """Swap in place. Pixels other than 8-bit BGR (gray, alpha, 16-bit photos) are
        swapped on an 8-bit BGR copy and only the pixels the swap changed are written back,
        in their own layout."""
        bgr = images.to_bgr8(pixels)
        if bgr is pixels:
            self._apply(bgr, faces)
            return pixels
        before = bgr.copy()
        self._apply(bgr, faces)
        changed = _difference(bgr, before) > 0
        if pixels.ndim == 2:
            values = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)[changed]
        else:
            values = bgr[changed]
            if pixels.shape[2] == 4:
                values = np.concatenate([values, pixels[changed][:, 3:]], axis=1)
        if pixels.dtype == np.uint16:
            values = values.astype(np.uint16) * 257
            if pixels.ndim == 3 and pixels.shape[2] == 4:
                values[:, 3] = pixels[changed][:, 3]  # alpha as it was
        pixels[changed] = values
        return pixels

    # --- video frames in the encoder's layout ----------------------------------------------
    works_on_planes = True

    def apply_planes(self, planes: list[np.ndarray], subsampling: tuple[int, int],
                     faces: list[Face]) -> None:
        """Swap on a video frame's Y, U, V planes (pipeline.operate): only the region around
        the faces goes to BGR and back (a 720p frame's two full conversions cost more than
        the swap of a small face), and only the pixels the swap changed are written back."""
        import av  # only video frames come here
        region = _region(planes[0].shape, faces, subsampling)
        if region is None:  # no faces (or none inside the frame)
            for face in faces:
                face.attributes["swap"] = {"engine": self.engine, "swapped": False,
                                           "reason": "outside the picture"}
            self._frame += 1
            return
        x0, y0, x1, y1 = region
        sx, sy = subsampling
        fmt = "yuv420p" if subsampling == (2, 2) else "yuv444p"
        parts = [planes[0][y0:y1, x0:x1], planes[1][y0 // sy:y1 // sy, x0 // sx:x1 // sx],
                 planes[2][y0 // sy:y1 // sy, x0 // sx:x1 // sx]]
        data = (np.concatenate([p.ravel() for p in parts]).reshape((y1 - y0) * 3 // 2, x1 - x0)
                if fmt == "yuv420p" else np.ascontiguousarray(np.stack(parts)))
        bgr = av.VideoFrame.from_ndarray(data, format=fmt).to_ndarray(format="bgr24")
        before = bgr.copy()
        self._apply(bgr, faces, offset=(x0, y0))
        difference = _difference(bgr, before)
        if not cv2.countNonZero(difference):
            return
        back = av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format=fmt).to_ndarray()
        h, w = difference.shape
        if fmt == "yuv420p":
            flat, quarter = back.ravel(), (h // 2) * (w // 2)   # planes one after the other
            new = [flat[:h * w].reshape(h, w), flat[h * w:h * w + quarter].reshape(h // 2, w // 2),
                   flat[h * w + quarter:].reshape(h // 2, w // 2)]
            d = difference  # a chroma sample changes when any of its 2x2 pixels did
            chroma = np.maximum(np.maximum(d[0::2, 0::2], d[1::2, 0::2]),
                                np.maximum(d[0::2, 1::2], d[1::2, 1::2])) > 0
        else:
            new, chroma = [back[0], back[1], back[2]], difference > 0
        np.copyto(parts[0], new[0], where=difference > 0)
        np.copyto(parts[1], new[1], where=chroma)
        np.copyto(parts[2], new[2], where=chroma)

    def _apply(self, bgr: np.ndarray, faces: list[Face], offset: tuple[int, int] = (0, 0)) -> None:
        """Swap the selected faces; `bgr` may be a region of the picture whose top left
        corner is `offset` (faces and the tracks' state stay in the picture's pixels)."""
        chosen = self.selected(faces)
        chosen_ids = {id(f) for f in chosen}
        done: dict[int, dict[str, Any]] = {}
        if chosen:
            if getattr(self.swapper, "needs_mesh", False):
                done = self._apply_mesh(bgr, chosen, np.float32(offset))
            else:
                done = self._apply_direct(bgr, chosen, offset)
        for face in faces:
            record = {"engine": self.engine, "swapped": False}
            if id(face) in chosen_ids:
                record.update(done.get(id(face), {}))
            else:
                record["reason"] = "not selected"
            face.attributes["swap"] = record  # in the face's report record
        self._frame += 1

    def _apply_direct(self, bgr, faces, offset=(0, 0)) -> dict[int, dict[str, Any]]:
        """Engines that align from the 5 points themselves (INSwapper); on video a face not
        detected in this frame is left alone."""
        out = {}
        for face in faces:
            if face.landmarks is None or (face.track is not None and face.source != DETECTED):
                out[id(face)] = {"swapped": False, "reason": "not detected"}
                self._count(face, pasted=False)
                continue
            self.swapper.paste_face(bgr, self.source, _shifted(face, offset))
            out[id(face)] = {"swapped": True, "opacity": 1.0}
            self._count(face, pasted=True)
        return out

    def _apply_mesh(self, bgr, faces, offset) -> dict[int, dict[str, Any]]:
        detected = [f for f in faces if f.track is None or f.source == DETECTED]
        shifted = [_shifted(f, offset) for f in detected]
        if hasattr(self.swapper, "meshes_with_presence"):
            found, presence = self.swapper.meshes_with_presence(bgr, shifted)
        else:
            found, presence = self.swapper.meshes(bgr, shifted), [None] * len(shifted)
        meshes = {id(f): (m + offset, p) for f, m, p in zip(detected, found, presence)}
        out = {}
        for face in faces:
            mesh, flag = meshes.get(id(face), (None, None))
            points, opacity, covered = self._points(face, mesh, flag)
            pasted = points is not None and opacity > 0 and \
                self.swapper.paste(bgr, self.source, points - offset, opacity, still=face.track is None)
            out[id(face)] = {"swapped": bool(pasted), "opacity": round(opacity, 3) if pasted else 0.0}
            if covered:
                out[id(face)]["occluded"] = True
            if not pasted and face.source != DETECTED:
                out[id(face)]["reason"] = "not detected"
            elif not pasted and covered:
                out[id(face)]["reason"] = "occluded"
            self._count(face, pasted, opacity, covered)
        return out

    def _points(self, face: Face, mesh: np.ndarray | None,
                presence: float | None = None) -> tuple[np.ndarray | None, float, bool]:
        """The points to paste on, the opacity and whether the face is judged covered: a
        photo's face as meshed; a video track's smoothed (fading out while OcclusionCue says
        it is covered), or (not detected this frame) its last points moved with its box,
        fading."""
        if face.track is None:
            return mesh, 1.0, False
        state = self._tracks.get(face.track)
        if state is None:
            state = self._tracks[face.track] = _Track(OneEuroFilter(self.fps), opacity=1.0)
        x, y, w, h = face.box
        centre = (x + w / 2, y + h / 2)
        if mesh is not None:
            covered = state.occlusion.update(presence)
            steps = self._frame - state.frame if state.frame >= 0 else 1
            points = state.filter(mesh, face.size, steps) if self.smooth else mesh
            if covered:
                state.opacity = max(0.0, round(state.opacity - 1.0 / FADE_FRAMES, 6))
            elif state.frame >= 0 and state.opacity < 1.0:
                state.opacity = min(1.0, round(state.opacity + 1.0 / FADE_FRAMES, 6))
            state.points, state.centre, state.frame = points, centre, self._frame
            return points, state.opacity, covered
        # lost by the detector: the last points, moved with the tracker's box, fading out
        state.opacity = max(0.0, round(state.opacity - 1.0 / FADE_FRAMES, 6))  # 0 after FADE_FRAMES
        if state.points is None or state.opacity <= 0:
            return None, 0.0, False
        shift = np.subtract(centre, state.centre).astype(np.float32)
        return state.points + shift, state.opacity, False

    def _count(self, face: Face, pasted: bool, opacity: float = 1.0, covered: bool = False) -> None:
        if face.track is None:
            return
        state = self._tracks.get(face.track)
        if state is None:
            state = self._tracks[face.track] = _Track(OneEuroFilter(self.fps), opacity=1.0)
        state.covered += covered
        if pasted:
            state.frames += 1
            state.faded += opacity < 1.0
        else:
            state.skipped += 1

    def tracks(self) -> list[dict[str, Any]]:
        """Per track: frames swapped, of them faded, frames left alone, and frames judged
        covered (OcclusionCue: faded out, then left alone)."""
        return [{"track": t, "engine": self.engine, "frames_swapped": s.frames,
                 "frames_faded": s.faded, "frames_not_swapped": s.skipped,
                 "frames_occluded": s.covered}
                for t, s in sorted(self._tracks.items())]


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The largest channel difference per pixel of two BGR images (OpenCV's, without numpy's
    slow reduction over the last axis)."""
    blue, green, red = cv2.split(cv2.absdiff(a, b))
    return cv2.max(cv2.max(blue, green), red)


def _shifted(face: Face, offset) -> Face:
    """The face in the pixels of a region whose top left corner is `offset` (the same
    attributes dict, so what is recorded on it lands on the face)."""
    dx, dy = float(offset[0]), float(offset[1])
    if dx == 0 and dy == 0:
        return face
    x, y, w, h = face.box
    return replace(face, box=(x - dx, y - dy, w, h),
                   landmarks=None if face.landmarks is None else face.landmarks - np.float32([dx, dy]))


# Around each face, the region a swap reads and writes, in face sizes from its centre: the mesh
# sees a square 1.5 sizes wide (facemesh.ROI_SCALE), and the paste reaches a little past it.
REGION_REACH = 1.0


def _region(shape: tuple[int, int], faces: list[Face], subsampling: tuple[int, int]):
    """(x0, y0, x1, y1) around every face, on the chroma grid; None without faces."""
    if not faces:
        return None
    h, w = shape
    sx, sy = subsampling
    x0 = y0 = np.inf
    x1 = y1 = -np.inf
    for f in faces:
        cx, cy = f.box[0] + f.box[2] / 2, f.box[1] + f.box[3] / 2
        reach = REGION_REACH * f.size
        x0, y0 = min(x0, cx - reach), min(y0, cy - reach)
        x1, y1 = max(x1, cx + reach), max(y1, cy + reach)
    x0, y0 = max(0, int(x0) // sx * sx), max(0, int(y0) // sy * sy)
    x1, y1 = min(w, -(-int(np.ceil(x1)) // sx) * sx), min(h, -(-int(np.ceil(y1)) // sy) * sy)
    if x1 - x0 < 2 * sx or y1 - y0 < 2 * sy:
        return None
    return x0, y0, x1, y1


def make_swapper(options: SwapOptions, model_dir=None, providers=None, threads: int = 0):
    """The engine object for `options.engine`, its models loaded."""
    if options.engine == "inswapper":
        from .inswapper import InswapperSwapper
        return InswapperSwapper(model_dir, providers, threads)
    from .landmarkswap import LandmarkSwapper
    return LandmarkSwapper(model_dir)
