"""How large a live-stream frame may be over API Gateway: the JPEG size of a real clip's
frames at several resolutions and qualities, against faceflow.stream.MAX_JPEG_BYTES (what a
128 KiB WebSocket message holds once base64-encoded).

    python bench/frame_sizes.py [--clip PATH] [--samples 8]

Frames are taken one second apart from the clip (default: the Pexels talking head in
../shared/data/video, 640x360), resized with INTER_AREA and encoded with OpenCV; each cell is
the largest of the samples, in KiB, marked `*` when it does not fit. A clip smaller than a
resolution is upscaled, which encodes smaller than real footage of that size would.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import av
import cv2

from faceflow import stream

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = ROOT.parent / "shared" / "data" / "video" / "pyfeat_WolfgangLanger_Pexels.mp4"
SIZES = ((640, 360), (960, 540), (1280, 720), (1920, 1080))
QUALITIES = (95, 90, 85, 80, 75, 70, 60, 50)


def sample_frames(path: Path, count: int) -> list:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        step = max(1, round(float(video.average_rate or 25)))
        frames = []
        for index, frame in enumerate(container.decode(video=0)):
            if index % step == 0:
                frames.append(frame.to_ndarray(format="bgr24"))
            if len(frames) >= count:
                break
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    if not args.clip.exists():
        raise SystemExit(f"clip not found: {args.clip} (put shared/data beside the checkout or pass --clip)")
    frames = sample_frames(args.clip, args.samples)
    limit = stream.MAX_JPEG_BYTES
    print(f"{args.clip.name}: {len(frames)} frames of {frames[0].shape[1]}x{frames[0].shape[0]}; "
          f"limit {limit / 1024:.0f} KiB of JPEG")
    print("size       " + "".join(f"   q{q:<4}" for q in QUALITIES))
    for width, height in SIZES:
        cells = []
        for quality in QUALITIES:
            largest = max(len(cv2.imencode(".jpg", cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA),
                                           [cv2.IMWRITE_JPEG_QUALITY, quality])[1]) for f in frames)
            cells.append(f"{largest / 1024:6.0f}{'*' if largest > limit else ' '} ")
        print(f"{width}x{height:<5}" + "".join(cells))


if __name__ == "__main__":
    main()
