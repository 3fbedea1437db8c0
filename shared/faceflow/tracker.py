"""Face tracks across video frames.

A track keeps a face covered through missed detections (a hand in front, a turned head) for
at most `max_missing` frames, coasting on its last motion, and ends at a scene cut. When a
face is found again inside the gap, the boxes held meanwhile are rewritten by interpolation
(frames still waiting in the caller's look-ahead buffer get the better box).

The whole state exports to plain JSON-safe data (`state()` / `Tracker.from_state()`), so a
video cut into chunks can carry its tracks from one worker to the next. The state holds the
boxes emitted while a face was missing (`pending`), so a track restored in the next chunk
still interpolates over the right frames when the face is found again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from .face import DETECTED, INTERPOLATED, TRACKED, Face, iou

STATE_VERSION = 2          # 2: tracks carry `pending` (held boxes since last seen)
READABLE_VERSIONS = (1, 2)


@dataclass
class Track:
    id: int
    box: list[float]                 # last box [x, y, w, h]
    velocity: list[float]            # per-frame change of the box
    last_seen: int                   # global frame index of the last detection
    hits: int = 1
    score: float = 0.0
    pending: list[Face] = field(default_factory=list)  # boxes emitted since last_seen

    def predicted(self, frame: int) -> list[float]:
        gap = frame - self.last_seen
        damp = min(gap, 10)  # trust motion for a few frames only
        x, y, w, h = (b + v * damp for b, v in zip(self.box, self.velocity))
        # Never assume a face shrinks while unseen: a hand or an edge cutting into it shrinks
        # the last detections, and extrapolating that gave boxes of no (or negative) size,
        # i.e. a face left uncovered. Keep the last size, about the predicted centre.
        if w < self.box[2]:
            x, w = x - (self.box[2] - w) / 2, self.box[2]
        if h < self.box[3]:
            y, h = y - (self.box[3] - h) / 2, self.box[3]
        grow = min(1.5, 1.0 + 0.02 * gap)  # uncertainty grows with time unseen
        return [x - w * (grow - 1) / 2, y - h * (grow - 1) / 2, w * grow, h * grow]


def frame_signature(bgr: np.ndarray) -> np.ndarray:
    """A small colour histogram; consecutive frames of one shot have similar ones."""
    small = cv2.resize(bgr, (64, 36), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256]).ravel()
    return (hist / max(1.0, hist.sum())).astype(np.float32)


class Tracker:
    def __init__(self, fps: float = 25.0, max_missing_s: float = 1.5, match_iou: float = 0.2,
                 cut_distance: float = 0.5):
        self.fps = fps
        self.max_missing = max(1, int(round(max_missing_s * fps)))
        self.match_iou = match_iou
        self.cut_distance = cut_distance  # histogram L1 distance (0..2) that marks a cut
        self.tracks: list[Track] = []
        self.next_id = 1
        self.frame = -1                   # global index of the last frame seen
        self.last_cut = 0
        self.signature: np.ndarray | None = None

    # --- per frame -------------------------------------------------------------------------
    def is_cut(self, bgr: np.ndarray) -> bool:
        sig = frame_signature(bgr)
        cut = self.signature is not None and float(np.abs(sig - self.signature).sum()) > self.cut_distance
        self.signature = sig
        return cut

    def update(self, frame: int, detections: list[Face], bgr: np.ndarray | None = None) -> list[Face]:
        """Faces to cover on `frame` (global index), each with a track id and its source."""
        self.frame = frame
        if bgr is not None and self.is_cut(bgr):
            self.tracks = []
            self.last_cut = frame
        out: list[Face] = []
        unmatched = list(range(len(detections)))
        pairs = sorted(((iou(t.predicted(frame), detections[d].box), ti, d)
                        for ti, t in enumerate(self.tracks) for d in unmatched), reverse=True)
        used_t, used_d = set(), set()
        for score, ti, d in pairs:
            if score < self.match_iou or ti in used_t or d in used_d:
                continue
            used_t.add(ti)
            used_d.add(d)
            out.append(self._observe(self.tracks[ti], frame, detections[d]))
        for d in range(len(detections)):
            if d not in used_d:
                track = Track(self.next_id, list(detections[d].box), [0.0] * 4, frame,
                              score=detections[d].score)
                self.next_id += 1
                self.tracks.append(track)
                out.append(_tagged(detections[d], track.id, DETECTED))
        alive = []
        for ti, track in enumerate(self.tracks):
            if ti in used_t or track.last_seen == frame:
                alive.append(track)
            elif frame - track.last_seen <= self.max_missing:
                held = Face(box=tuple(track.predicted(frame)), score=track.score, track=track.id,
                            source=TRACKED)
                track.pending.append(held)
                out.append(held)
                alive.append(track)
        self.tracks = alive
        return out

    def _observe(self, track: Track, frame: int, det: Face) -> Face:
        gap = frame - track.last_seen
        new = list(det.box)
        if gap > 1 and track.pending:
            # Found again: replace the held boxes by a straight path from last seen to now.
            # The held boxes are the frames just before this one (pending[-1] is frame - 1);
            # counted from the end, a state that lost its oldest ones still lines up.
            first = frame - len(track.pending)
            for k, held in enumerate(track.pending):  # pending[k] is frame `first + k`
                a = (first + k - track.last_seen) / gap
                held.box = tuple(o + (n - o) * a for o, n in zip(track.box, new))
                held.source = INTERPOLATED
        alpha = 0.5
        track.velocity = [alpha * (n - o) / max(1, gap) + (1 - alpha) * v
                          for n, o, v in zip(new, track.box, track.velocity)]
        track.box, track.last_seen, track.score = new, frame, det.score
        track.hits += 1
        track.pending = []
        return _tagged(det, track.id, DETECTED)

    # --- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "fps": self.fps, "max_missing": self.max_missing,
            "match_iou": self.match_iou, "cut_distance": self.cut_distance,
            "next_id": self.next_id, "frame": self.frame, "last_cut": self.last_cut,
            "signature": None if self.signature is None else self.signature.tolist(),
            "tracks": [{"id": t.id, "box": [float(v) for v in t.box],
                        "velocity": [float(v) for v in t.velocity], "last_seen": t.last_seen,
                        "hits": t.hits, "score": float(t.score),
                        # pending[k] is frame last_seen + 1 + k
                        "pending": [[float(v) for v in f.box] for f in t.pending]}
                       for t in self.tracks],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Tracker":
        if state.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"tracker state version {state.get('version')} is not one of {READABLE_VERSIONS}")
        tracker = cls(fps=state["fps"], match_iou=state["match_iou"], cut_distance=state["cut_distance"])
        tracker.max_missing = state["max_missing"]
        tracker.next_id, tracker.frame, tracker.last_cut = state["next_id"], state["frame"], state["last_cut"]
        sig = state.get("signature")
        tracker.signature = None if sig is None else np.asarray(sig, np.float32)
        tracker.tracks = [Track(t["id"], list(t["box"]), list(t["velocity"]), t["last_seen"],
                                t["hits"], t["score"],
                                [Face(box=tuple(b), score=t["score"], track=t["id"], source=TRACKED)
                                 for b in t.get("pending", [])])
                          for t in state["tracks"]]
        return tracker


def _tagged(face: Face, track: int, source: str) -> Face:
    face.track, face.source = track, source
    return face
