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

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
from faceflow.engine import Engine  # noqa: E402
from clips import FPS, HEIGHT, WIDTH, view, write_clip  # noqa: E402  (bench/clips.py)

PHOTO = ROOT.parent / "shared" / "data" / "images" / "pyfeat_multi_face.jpg"
WORK = ROOT / ".bench" / "memory"
DISTINCT = 60  # distinct frames in the clip


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
        scale = WIDTH / (pw * (0.7 + 0.1 * math.sin(i / DISTINCT * math.pi)))
        views.append(view(photo, (pw - WIDTH / scale) * i / DISTINCT, (ph - HEIGHT / scale) / 2, scale))
    # played back and forth, so the long clip is cheap to make
    played = (views[k if k < DISTINCT else 2 * DISTINCT - 1 - k] for k in (i % (2 * DISTINCT) for i in range(frames)))
    write_clip(path, played, {"crf": "23", "preset": "ultrafast", "g": str(2 * FPS)})


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
