"""Operations: what is done to the faces found in a picture or a video frame.

An operation is an object with `apply(bgr, faces) -> bgr` (in place). The video pipeline hands
it frames in the encoder's YUV layout instead: an operation that can work there has
`apply_planes(planes, subsampling, faces)` and saves two full-frame colour conversions a
frame; any other is given BGR (`pipeline.operate`). Masking today; analysis and face
swap plug in beside it without touching the decode/detect/encode flow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import images
from .anonymize import MaskOptions, apply_masks, apply_masks_planes
from .face import Face, iou

if TYPE_CHECKING:  # the handlers that never detect must not load onnxruntime through this module
    from .detectors import Detector

# Masked output must show no face to the detector even at a low threshold (0.3); check
# below it to leave room for what re-encoding changes.
VERIFY_THRESHOLD = 0.2


class Operation(Protocol):
    def apply(self, pixels: np.ndarray, faces: list[Face]) -> np.ndarray: ...


@dataclass
class Mask:
    """Mask faces; with `verify`, look again at a low threshold and mask harder where the
    detector still sees a face inside a mask (the irreversibility check, up to 3 rounds)."""
    options: MaskOptions = field(default_factory=MaskOptions)
    verify: Detector | None = None
    verify_threshold: float = VERIFY_THRESHOLD

    def apply(self, pixels: np.ndarray, faces: list[Face]) -> np.ndarray:
        apply_masks(pixels, faces, self.options)
        if self.verify is None or not faces:
            return pixels
        opts = self.options
        for _ in range(3):
            seen = self.verify.detect(images.to_bgr8(pixels), self.verify_threshold)
            again = [f for f in faces if any(iou(f.box, s.box) > 0 for s in seen)]
            if not again:
                break
            opts = opts.stronger()
            apply_masks(pixels, again, opts)
        return pixels

    @property
    def works_on_planes(self) -> bool:
        return self.verify is None  # verifying runs the detector, which wants BGR

    def apply_planes(self, planes: list[np.ndarray], subsampling: tuple[int, int],
                     faces: list[Face]) -> None:
        apply_masks_planes(planes, subsampling, faces, self.options)
