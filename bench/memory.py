"""Peak memory of anonymising a long 1280x720 video: it must stay flat with the length.

    python bench/memory.py [--minutes 10] [--keep]

The clip (made here under .bench/memory, never committed): `--minutes` of 1280x720 at 30 fps,
a slow pan over ../shared/data/images/pyfeat_multi_face.jpg (five faces; 60 distinct frames
played back and forth, encoded with x264 ultrafast, a keyframe every 2 s) with an AAC tone.
faceflow runs it in this process (Engine().anonymize_file with a report, the defaults)
while a thread samples the resident set size (VmRSS) every 0.2 s. Printed: RSS before the
run (models loaded), after each tenth of the frames, and the peak (VmHWM); the growth from
the first tenth to the end is what would scale with length.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
from faceflow.engine import Engine  # noqa: E402

PHOTO = ROOT.parent / "shared" / "data" / "images" / "pyfeat_multi_face.jpg"
WORK = ROOT / ".bench" / "memory"
WIDTH, HEIGHT, FPS, SAMPLE_RATE, DISTINCT = 1280, 720, 30, 48000, 60


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def make_clip(path: Path, frames: int) -> None:
    photo = cv2.imread(str(PHOTO))
    if photo is None:
        raise SystemExit(f"cannot read {PHOTO} (../shared/data beside the checkout)")
    ph, pw = photo.shape[:2]
    views = []
    for i in range(DISTINCT):
        s = WIDTH / (pw * (0.7 + 0.1 * math.sin(i / DISTINCT * math.pi)))
        x0 = (pw - WIDTH / s) * i / DISTINCT
        warp = np.float32([[s, 0, -s * x0], [0, s, -s * (ph - HEIGHT / s) / 2]])
        views.append(cv2.warpAffine(photo, warp, (WIDTH, HEIGHT), borderMode=cv2.BORDER_REFLECT))
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = {"crf": "23", "preset": "ultrafast", "g": str(2 * FPS)}
        audio = out.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "mono"
        samples = 0
        for i in range(frames):
            k = i % (2 * DISTINCT)
            frame = av.VideoFrame.from_ndarray(views[k if k < DISTINCT else 2 * DISTINCT - 1 - k],
                                               format="bgr24")
            frame.pts = i
            out.mux(video.encode(frame))
            while samples < (i + 1) * SAMPLE_RATE // FPS:
                t = (samples + np.arange(1024)) / SAMPLE_RATE
                tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
                chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = SAMPLE_RATE, samples
                out.mux(audio.encode(chunk))
                samples += 1024
        out.mux(video.encode())
        out.mux(audio.encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    clip = WORK / f"clip_{args.minutes:g}min.mp4"
    frames = round(args.minutes * 60 * FPS)
    if not clip.exists():
        print(f"making {clip.name}: {frames} frames ...", flush=True)
        make_clip(clip, frames)
    engine = Engine()
    before = status_kb("VmRSS")
    marks: dict[int, int] = {}
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        tenth = done * 10 // max(1, frames)
        if tenth not in marks:
            marks[tenth] = status_kb("VmRSS")

    samples: list[int] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append(status_kb("VmRSS"))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    summary = engine.anonymize_file(clip, WORK / "out.mp4", report=WORK / "out.json", progress=progress)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    mb = lambda kb: f"{kb / 1024:.0f} MB"  # noqa: E731
    print(f"{summary['frames']} frames of {WIDTH}x{HEIGHT} ({args.minutes:g} min) in {seconds:.0f} s, "
          f"{summary['frames'] / seconds:.1f} frames/s; load average "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"RSS with the models loaded, before the video: {mb(before)}")
    print("RSS after each tenth of the frames: " + ", ".join(mb(marks[k]) for k in sorted(marks) if k))
    print(f"RSS sampled every 0.2 s: max {mb(max(samples))}; peak of the process (VmHWM): "
          f"{mb(status_kb('VmHWM'))}")
    tenths = [marks[k] for k in sorted(marks) if k]
    if len(tenths) >= 2:
        print(f"growth from the first tenth to the end: {mb(tenths[-1] - tenths[0])}")
    if not args.keep:
        shutil.rmtree(WORK)


if __name__ == "__main__":
    main()
