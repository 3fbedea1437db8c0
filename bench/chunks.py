"""Chunked video on one machine: one pass vs split → chunks on 1, 2, 4 workers → merge.

    python bench/chunks.py                 # 25 s 1280x720 30 fps clip, 2 s chunks
    python bench/chunks.py --seconds 30 --target 2 --target 6 --keep

The clip is a slow pan and zoom over ../shared/data/images/pyfeat_multi_face.jpg (five
faces) with a 440 Hz AAC tone, a keyframe every `--gop` seconds (phones write 1-2 s). Each
configuration runs `faceflow.chunks.process_video_in_chunks` (state mode for one worker:
chunks in order, tracker state handed on; warm-up mode otherwise: chunks in a process pool,
each warming up on the tail of the chunk before) and is checked against the one-pass report
(frames where the covered faces differ must be 0). Prints wall time, speed-up over one pass,
and the time spent splitting and merging (the overhead that chunking adds besides the
warm-up frames detected twice).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
from faceflow import chunks as C  # noqa: E402
from faceflow.engine import Engine  # noqa: E402
from faceflow.face import iou  # noqa: E402
from faceflow.video import anonymize_video  # noqa: E402
from clips import FPS, HEIGHT, WIDTH, camera, view, write_clip  # noqa: E402  (bench/clips.py)

DATA = ROOT.parent / "shared" / "data"
PHOTO = DATA / "images" / "pyfeat_multi_face.jpg"
WORK = ROOT / ".bench" / "chunks"


def make_clip(path: Path, seconds: float, gop_s: float) -> int:
    photo = cv2.imread(str(PHOTO))
    if photo is None:
        raise SystemExit(f"cannot read {PHOTO} (../shared/data beside the checkout)")
    ph, pw = photo.shape[:2]
    frames = round(seconds * FPS)
    gop = max(1, round(gop_s * FPS))
    return write_clip(path, (view(photo, *camera(i, frames, pw, ph)) for i in range(frames)),
                      {"crf": "18", "preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"})


def differing_frames(one: list[dict], other: list[dict]) -> tuple[int, int]:
    """(frames covered differently, frames with a box apart by IoU < 0.9)."""
    differ = low = 0
    for a, b in zip(one, other):
        pairs = C._pairs(a["faces"], b["faces"], 0.05)
        d = len(pairs) != len(a["faces"]) or len(pairs) != len(b["faces"])
        differ += d
        low += d or any(iou(x["box"], y["box"]) < 0.9 for x, y in pairs)
    return differ + abs(len(one) - len(other)), low


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--gop", type=float, default=2.0, help="seconds between keyframes in the clip")
    ap.add_argument("--target", type=float, action="append", help="chunk seconds (repeatable; default 2)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--keep", action="store_true", help="keep the clip and outputs under .bench/chunks")
    args = ap.parse_args()
    targets = args.target or [2.0]
    workers = [int(w) for w in args.workers.split(",")]

    WORK.mkdir(parents=True, exist_ok=True)
    clip = WORK / "clip.mp4"
    frames = make_clip(clip, args.seconds, args.gop)
    print(f"clip: {WIDTH}x{HEIGHT} {FPS} fps, {frames} frames ({args.seconds:g} s), keyframe every "
          f"{args.gop:g} s, AAC tone; nproc {os.cpu_count()}, load average {load()}", flush=True)
    engine = Engine()
    engine.detect(np.zeros((HEIGHT, WIDTH, 3), np.uint8))  # warm the session

    start = time.perf_counter()
    anonymize_video(engine, clip, WORK / "one.mp4", report=WORK / "one.json")
    one_s = time.perf_counter() - start
    ref = json.loads((WORK / "one.json").read_text())["frames"]
    rows = [("one pass", None, one_s, None, 0, 0, 0)]
    print(f"one pass: {one_s:.1f} s ({frames / one_s:.1f} frames/s)", flush=True)

    for target in targets:
        configs = [(1, "state"), (1, "warmup")] + [(w, "warmup") for w in workers if w > 1]
        for w, mode in configs:
            if w not in workers:
                continue
            out, report = WORK / f"w{w}-{mode}-{target:g}.mp4", WORK / f"w{w}-{mode}-{target:g}.json"
            s = C.process_video_in_chunks(engine, clip, out, workers=w, mode=mode,
                                          target_seconds=target, report=report)
            got = json.loads(report.read_text())["frames"]
            differ, low = differing_frames(ref, got)
            rows.append((f"{w} worker{'s' if w > 1 else ''}, {mode}, {target:g} s chunks", s, s["timing"]["total_s"],
                         s["chunks"], s["warmup_frames"] + s["lookahead_frames"], differ, low))
            print(f"  {rows[-1][0]}: {s['timing']['total_s']:.1f} s, timing {s['timing']}, "
                  f"load {load()}", flush=True)

    print(f"\n| run | wall s | speed-up vs one pass | chunks | split s | merge s | split+merge % of total "
          f"| extra frames detected | frames covered differently / boxes IoU<0.9 |\n|---|---|---|---|---|---|---|---|---|")
    for name, s, wall, n, extra, differ, low in rows:
        if s is None:
            print(f"| {name} | {wall:.1f} | 1.00x | - | - | - | - | 0 | - |")
            continue
        t = s["timing"]
        over = t["split_s"] + t["merge_s"]
        print(f"| {name} | {wall:.1f} | {one_s / wall:.2f}x | {n} | {t['split_s']:.2f} | {t['merge_s']:.2f} "
              f"| {100 * over / wall:.1f}% | {extra} ({100 * extra / frames:.0f}%) | {differ} / {low} |")
    print(f"\nnproc {os.cpu_count()}, load average at the end {load()}")
    print("extra frames: warm-up frames (the previous chunk's tail, detected again) plus look-ahead "
          "frames (the next chunk's head); the report stage (joining chunk reports) is in the wall time.")
    if not args.keep:
        shutil.rmtree(WORK)
    else:
        print(f"files kept in {WORK}")


if __name__ == "__main__":
    main()
