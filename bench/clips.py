"""Test clips for the benchmarks, made from a still photo (never committed): 1280x720 at 30 fps
with a 440 Hz AAC tone, so audio passes through the pipeline as in real uploads."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import av
import cv2
import numpy as np

WIDTH, HEIGHT, FPS, SAMPLE_RATE = 1280, 720, 30, 48000
TONE_SAMPLES = 1024  # AAC frame size


def camera(i: int, n: int, pw: int, ph: int) -> tuple[float, float, float]:
    """Frame i of n's crop window on a pw x ph photo: top-left (x0, y0) and the scale to the
    frame; a pan with a zoom in and out, so faces move and change size."""
    t = i / max(1, n - 1)
    zoom = 1.0 + 0.6 * math.sin(math.pi * t)
    cw = min(pw, ph * WIDTH / HEIGHT) / zoom
    ch = cw * HEIGHT / WIDTH
    cx = min(max((0.3 + 0.4 * t) * pw, cw / 2), pw - cw / 2)
    cy = min(max((0.4 + 0.2 * t) * ph, ch / 2), ph - ch / 2)
    return cx - cw / 2, cy - ch / 2, WIDTH / cw


def view(photo: np.ndarray, x0: float, y0: float, scale: float, interpolation=cv2.INTER_LINEAR) -> np.ndarray:
    """The frame that shows `photo` from (x0, y0) at `scale`."""
    warp = np.float32([[scale, 0, -scale * x0], [0, scale, -scale * y0]])
    return cv2.warpAffine(photo, warp, (WIDTH, HEIGHT), flags=interpolation, borderMode=cv2.BORDER_REFLECT)


def write_clip(path: Path, frames: Iterable[np.ndarray], x264: dict[str, str]) -> int:
    """Encode BGR frames as H.264 (x264 `options`) with the tone beside them; returns the count.
    Written under a temporary name and renamed when complete, so an interrupted run leaves no
    clip that a later run would take for a whole one."""
    count = 0
    part = path.with_name(f".{path.stem}.part{path.suffix}")
    with av.open(str(part), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = x264
        audio = out.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "mono"
        samples = 0
        for i, bgr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
            frame.pts = i
            out.mux(video.encode(frame))
            while samples < (i + 1) * SAMPLE_RATE // FPS:
                t = (samples + np.arange(TONE_SAMPLES)) / SAMPLE_RATE
                tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
                chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = SAMPLE_RATE, samples
                out.mux(audio.encode(chunk))
                samples += TONE_SAMPLES
            count = i + 1
        out.mux(video.encode())
        out.mux(audio.encode())
    part.replace(path)
    return count
