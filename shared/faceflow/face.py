"""The face record every stage reads and extends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DETECTED, TRACKED, INTERPOLATED = "detected", "tracked", "interpolated"
# Faces a reviewer added (faceflow.review): drawn by hand, and followed from such a box.
MANUAL, FOLLOWED = "manual", "followed"
# A face record's key: kept in the report, left unmasked (a reviewer's decision).
EXEMPT = "exempt"


@dataclass
class Face:
    """One face in one image or frame, in pixels of the upright image.

    `box` is [x, y, w, h]; `landmarks` the 5 points (eyes, nose, mouth corners) or None.
    `attributes` holds what later stages add (age, gender, mesh, pose, embedding), so new
    analyses never change this class.
    """
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None = None
    track: int | None = None
    source: str = DETECTED
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.box
        return x, y, x + w, y + h

    @property
    def size(self) -> float:
        return max(self.box[2], self.box[3])

    def to_dict(self, ndigits: int = 1) -> dict[str, Any]:
        d: dict[str, Any] = {
            "box": [round(float(v), ndigits) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": None if self.landmarks is None else
            [[round(float(x), ndigits), round(float(y), ndigits)] for x, y in self.landmarks],
        }
        if self.track is not None:
            d["track"] = self.track
            d["source"] = self.source
        d.update({k: _plain(v) for k, v in self.attributes.items()})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Face":
        known = {"box", "score", "landmarks", "track", "source"}
        lm = d.get("landmarks")
        return cls(box=tuple(d["box"]), score=float(d["score"]),
                   landmarks=None if lm is None else np.asarray(lm, dtype=np.float32),
                   track=d.get("track"), source=d.get("source", DETECTED),
                   attributes={k: v for k, v in d.items() if k not in known})


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def iou(a: tuple, b: tuple) -> float:
    """IoU of two [x, y, w, h] boxes."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
