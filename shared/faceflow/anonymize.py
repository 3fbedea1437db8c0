"""Masking faces so they cannot be recovered.

Strength is relative to the face: a face is reduced to a fixed number of cells across
(`cells`) whatever its size in pixels, so a 400 px face loses as much as a 40 px one.
Only pixels inside the masks change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from .face import Face

METHODS = ("blur", "pixelate", "solid")
SHAPES = ("ellipse", "box")


@dataclass
class MaskOptions:
    method: str = "blur"
    shape: str = "ellipse"
    mask_scale: float = 1.6   # mask size relative to the detected box (hair, ears, jaw)
    cells: int = 2            # detail left across a face: lower is stronger
    color: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}")
        if not 0.5 <= self.mask_scale <= 4:
            raise ValueError("mask scale must be between 0.5 and 4")
        if not 2 <= self.cells <= 32:
            raise ValueError("cells must be between 2 and 32")

    def stronger(self) -> "MaskOptions":
        """The next step up when a masked face is still detectable: fewer cells, larger
        mask, and at the end a solid fill."""
        if self.cells > 2:
            return replace(self, cells=self.cells - 1, mask_scale=min(4.0, self.mask_scale + 0.2))
        return replace(self, method="solid", mask_scale=min(4.0, self.mask_scale + 0.2))


def mask_region(face: Face, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The face box grown by `scale` about its centre, clipped: (x1, y1, x2, y2)."""
    x, y, w, h = face.box
    cx, cy = x + w / 2, y + h / 2
    # Faces are taller than detectors' boxes: grow height a little more to cover forehead/chin.
    half_w, half_h = w * scale / 2, h * scale * 1.1 / 2
    x1, y1 = max(0, int(cx - half_w)), max(0, int(cy - half_h))
    x2, y2 = min(width, int(np.ceil(cx + half_w))), min(height, int(np.ceil(cy + half_h)))
    return x1, y1, x2, y2


def _obscured(roi: np.ndarray, opts: MaskOptions) -> np.ndarray:
    h, w = roi.shape[:2]
    if opts.method == "solid":
        fill = np.empty_like(roi)
        fill[...] = opts.color[: roi.shape[2]] if roi.ndim == 3 else opts.color[0]
        return fill
    # Reduce to `cells` across the longer side: the information left is the same for every size.
    step = max(w, h) / opts.cells
    sw, sh = max(1, round(w / step)), max(1, round(h / step))
    small = cv2.resize(roi, (sw, sh), interpolation=cv2.INTER_AREA)
    if opts.method == "pixelate":
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    # Smooth the cell grid at a low resolution (8 px a cell), then scale up: cheap whatever
    # the face size.
    mid = cv2.resize(small, (sw * 8, sh * 8), interpolation=cv2.INTER_LINEAR)
    mid = cv2.GaussianBlur(mid, (9, 9), 0)
    return cv2.resize(mid, (w, h), interpolation=cv2.INTER_LINEAR)


def apply_masks(pixels: np.ndarray, faces: list[Face], opts: MaskOptions) -> np.ndarray:
    """Mask every face in place (pixels may be gray, BGR or BGRA, 8 or 16 bit); returns pixels."""
    height, width = pixels.shape[:2]
    color_channels = 3 if pixels.ndim == 3 and pixels.shape[2] == 4 else None
    for face in faces:
        x1, y1, x2, y2 = mask_region(face, opts.mask_scale, width, height)
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue
        roi = pixels[y1:y2, x1:x2]
        target = roi[..., :color_channels] if color_channels else roi
        masked = _obscured(np.ascontiguousarray(target), opts)
        if opts.shape == "box":
            target[...] = masked
            continue
        x, y, w, h = face.box
        cx, cy = x + w / 2 - x1, y + h / 2 - y1
        axes = (max(1, int(w * opts.mask_scale / 2)), max(1, int(h * opts.mask_scale * 1.1 / 2)))
        inside = np.zeros(roi.shape[:2], np.uint8)
        cv2.ellipse(inside, (int(cx), int(cy)), axes, 0, 0, 360, 1, -1)
        where = inside.astype(bool)
        np.copyto(target, masked, where=where[..., None] if target.ndim == 3 else where)
    return pixels
