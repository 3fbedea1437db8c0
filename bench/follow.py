"""How far a box drawn by hand on a video is followed (faceflow.review.BoxFollower).

    python bench/follow.py [--data ../shared/data] [--every 25] [--limit 120]

On each clip of DATA/video: a seed on every `--every`-th frame where the detector finds a
face, its box followed forward and backward with OpenCV's MIL tracker alone and with MIL
snapped to detections at review.FOLLOW_THRESHOLD (what `--from-report` does). A frame
counts as followed while the box overlaps the detector's own box (IoU >= 0.3) where the
detector found one (frames where it found none, e.g. a hand over the face, are passed and
not judged). "held": the follower reached `--limit` frames, the clip's end (forward) or
start (backward) or the face's last (first) detection without losing it. CPU time per
followed frame beside it (MIL alone, and MIL plus a detector pass).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
from faceflow import review  # noqa: E402
from faceflow.engine import Engine  # noqa: E402
from faceflow.face import iou  # noqa: E402
from faceflow.pipeline import Layout, Reader, Segment  # noqa: E402
from faceflow.video import probe  # noqa: E402

MIN_IOU = 0.3


def frames_and_truth(engine: Engine, path: Path) -> tuple[list, list]:
    """Every frame at the detector's size, and the detector's best face on each (or None)."""
    info = probe(path)
    layout = Layout.of(*info.display_size, info.rotation, engine.detector.max_side)
    frames, truth = [], []
    reader = Reader([Segment([path])], layout, fps=info.fps, keep_pixels=False)
    try:
        for frame in reader:
            frames.append(frame.small)
            faces = engine.detect(frame.small)
            truth.append(max(faces, key=lambda f: f.score).box if faces else None)
    finally:
        reader.close()
    return frames, truth


def follow(frames, truth, seed: int, step: int, snap, limit: int) -> tuple[int, bool, float]:
    """Frames followed from `seed` in direction `step` (+1/-1), whether it held to the end or
    the limit, CPU s."""
    follower = review.BoxFollower(frames[seed], truth[seed], snap)
    detected = [i for i, t in enumerate(truth) if t is not None]
    end = min(max(detected), seed + limit) if step > 0 else max(min(detected), seed - limit)
    n, cpu = 0, time.process_time()
    for t in range(seed + step, end + step, step):
        box = follower.step(frames[t])
        if box is None or (truth[t] is not None and iou(box, truth[t]) < MIN_IOU):
            return n, False, time.process_time() - cpu
        n += 1
    return n, True, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--limit", type=int, default=120, help="frames followed at most from a seed")
    args = ap.parse_args()
    engine = Engine(threads=1)
    print("| clip | follower | direction | seeds | frames followed: median (min-max) | held | CPU ms a frame |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted((args.data / "video").iterdir()):
        frames, truth = frames_and_truth(engine, path)
        seeds = [i for i in range(0, len(frames), args.every) if truth[i] is not None]
        print(f"{path.name}: {len(frames)} frames, a face detected on {sum(t is not None for t in truth)}",
              file=sys.stderr, flush=True)
        for name, snap in (("MIL", None),
                           ("MIL + detector", lambda bgr: engine.detect(bgr, review.FOLLOW_THRESHOLD))):
            for direction, step in (("forward", 1), ("backward", -1)):
                runs = [follow(frames, truth, s, step, snap, args.limit) for s in seeds]
                counts = [r[0] for r in runs]
                cpu = sum(r[2] for r in runs) / max(1, sum(counts))
                print(f"| {path.name} ({len(frames)} frames) | {name} | {direction} | {len(seeds)} | "
                      f"{statistics.median(counts):.0f} ({min(counts)}-{max(counts)}) | "
                      f"{sum(r[1] for r in runs)}/{len(runs)} | {cpu * 1000:.1f} |", flush=True)
        # where a follower seeded before the face's last detection stops (a cut, the face gone)
        last = max(i for i, t in enumerate(truth) if t is not None)
        if last < len(frames) - 1:
            seed = max(0, last - 20)
            follower = review.BoxFollower(frames[seed], truth[seed], None)
            stop = next((t for t in range(seed + 1, len(frames)) if follower.step(frames[t]) is None), None)
            print(f"{path.name}: last face detected on frame {last}; MIL seeded on frame {seed} stops "
                  f"{'at frame ' + str(stop) if stop is not None else 'never'}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
