"""A synthetic live source for the stream transport tests: the public-domain astronaut face
(skimage) moving across a plain background, made at test time (no photo is stored)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

FRAME_W, FRAME_H = 640, 360
FACE_SIDE = 180


def scene_frame(face: np.ndarray, i: int) -> np.ndarray:
    """Frame `i`: the face 2 px further right each frame."""
    canvas = np.full((FRAME_H, FRAME_W, 3), (60, 90, 40), np.uint8)
    x = 200 + 2 * (i % 100)
    canvas[90:90 + FACE_SIDE, x:x + FACE_SIDE] = face
    return canvas


def face_of(astronaut_bgr: np.ndarray) -> np.ndarray:
    return cv2.resize(astronaut_bgr[0:256, 96:352], (FACE_SIDE, FACE_SIDE), interpolation=cv2.INTER_AREA)


def jpeg(bgr: np.ndarray, quality: int = 85) -> bytes:
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def write_clip(path: Path, face: np.ndarray, frames: int, fps: int = 25) -> Path:
    """An H.264 clip of the scene (PyAV)."""
    import av
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = FRAME_W, FRAME_H, "yuv420p"
        video.options = {"preset": "ultrafast"}
        for i in range(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(scene_frame(face, i), format="bgr24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
    return path


def count_frames(path: Path) -> int:
    import av
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def face_changed(original: np.ndarray, returned: np.ndarray, box) -> float:
    """Share of the face box's pixels that changed by more than a JPEG round trip would."""
    x, y, w, h = (int(v) for v in box)
    diff = np.abs(returned[y:y + h, x:x + w].astype(int) - original[y:y + h, x:x + w].astype(int)).max(axis=2)
    return float((diff > 24).mean())


class SlowEngine:
    """The real engine, its detector held back `delay_s` a call: a server that cannot keep
    up with the sender, without a busy machine."""

    def __init__(self, engine, delay_s: float):
        self.engine, self.delay_s = engine, delay_s

    def detect(self, bgr, threshold=None):
        return self.detect_batch([bgr], threshold)[0]

    def detect_batch(self, frames, threshold=None):
        import time
        time.sleep(self.delay_s)
        return self.engine.detect_batch(frames, threshold)
