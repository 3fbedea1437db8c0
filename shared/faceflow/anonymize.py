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
        _paint(target, face, (x1, y1), (1, 1), opts, _obscured(np.ascontiguousarray(target), opts))
    return pixels


def apply_masks_planes(planes: list[np.ndarray], subsampling: tuple[int, int], faces: list[Face],
                       opts: MaskOptions) -> None:
    """Mask every face in place on the 8-bit planes of a YUV frame: Y at full size, U and V
    reduced by `subsampling` (x, y). The same region and ellipse as `apply_masks`, drawn on
    each plane at its own scale, so a video frame is masked without converting it to BGR."""
    height, width = planes[0].shape
    fill = _yuv(opts.color)
    for face in faces:
        x1, y1, x2, y2 = mask_region(face, opts.mask_scale, width, height)
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue
        for k, plane in enumerate(planes):
            sx, sy = (1, 1) if k == 0 else subsampling
            px1, py1 = x1 // sx, y1 // sy
            px2, py2 = min(plane.shape[1], -(-x2 // sx)), min(plane.shape[0], -(-y2 // sy))
            target = plane[py1:py2, px1:px2]
            if opts.method == "solid":
                masked = np.full_like(target, fill[k])
            else:
                masked = _obscured(np.ascontiguousarray(target), opts)
            _paint(target, face, (px1, py1), (sx, sy), opts, masked)


def _paint(target: np.ndarray, face: Face, origin: tuple[int, int], step: tuple[int, int],
           opts: MaskOptions, masked: np.ndarray) -> None:
    """Copy `masked` into `target` (a region at `origin` of an image sampled every `step`
    pixels of the full frame) inside the face's mask shape."""
    if opts.shape == "box":
        target[...] = masked
        return
    (sx, sy), (ox, oy) = step, origin
    x, y, w, h = face.box
    cx, cy = (x + w / 2) / sx - ox, (y + h / 2) / sy - oy
    axes = (max(1, int(w * opts.mask_scale / 2 / sx)), max(1, int(h * opts.mask_scale * 1.1 / 2 / sy)))
    if step != (1, 1):
        axes = (axes[0] + 1, axes[1] + 1)  # a subsampled plane's ellipse covers all the full one's
    inside = np.zeros(target.shape[:2], np.uint8)
    cv2.ellipse(inside, (int(cx), int(cy)), axes, 0, 0, 360, 1, -1)
    where = inside.astype(bool)
    np.copyto(target, masked, where=where[..., None] if target.ndim == 3 else where)


def _yuv(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    """A BGR colour in 8-bit limited-range BT.601 YUV (what H.264 video carries)."""
    b, g, r = bgr
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return tuple(int(round(min(255, max(0, c)))) for c in (y, u, v))
