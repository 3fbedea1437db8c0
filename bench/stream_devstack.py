"""Per-frame latency of the deployed stream path, run locally: the Pexels talking head through
devstack's WebSocket API stand-in, the stream function (two awslambdaric processes, state in
a real Redis, replies through the @connections stand-in), one frame at a time (the next frame
is sent when the reply arrives), so this is the latency of one frame, not a sustained rate.

    python bench/stream_devstack.py [--frames 100] [--width 640] [--quality 80] [--no-return-frame]

Prints p50 / p95 / max of the round trip (send → reply) in ms, the function's own time per
frame (the reply's `ms`: decode, detect, track, mask, encode), and the CPU seconds the two
function processes used per frame beside the wall time (on a busy machine wall time well
above CPU time means waiting for a core), and the load average. Loopback only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import av
import cv2

from faceflow import bundle, stream

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # devstack
CLIP = ROOT.parent / "shared" / "data" / "video" / "pyfeat_WolfgangLanger_Pexels.mp4"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--no-return-frame", action="store_true")
    parser.add_argument("--clip", type=Path, default=CLIP)
    args = parser.parse_args()
    from websockets.sync.client import connect

    import devstack

    frames = []
    with av.open(str(args.clip)) as container:
        for frame in container.decode(video=0):
            bgr = frame.to_ndarray(format="bgr24")
            height = round(bgr.shape[0] * args.width / bgr.shape[1] / 2) * 2
            frames.append(cv2.imencode(".jpg", cv2.resize(bgr, (args.width, height), interpolation=cv2.INTER_AREA),
                                       [cv2.IMWRITE_JPEG_QUALITY, args.quality])[1].tobytes())
            if len(frames) >= args.frames:
                break
    env = {"FACEFLOW_MODEL_DIR": str(bundle.default_model_dir())}
    with devstack.Stack(functions=("stream",), function_env=env) as stack:
        pids = [function.pid for function in stack.stream_functions]
        with connect(stack.websocket_url, open_timeout=120, max_size=2 * stream.MESSAGE_LIMIT_BYTES) as ws:
            def send(seq: int, data: bytes) -> dict:
                message = stream.FrameMessage(seq, seq / 25, data, return_frame=not args.no_return_frame)
                ws.send(stream.fragments(stream.encode_frame(message)))
                return stream.decode_reply(ws.recv(timeout=120))

            for seq in range(5):  # warm both processes
                send(seq, frames[seq % len(frames)])
            cpu_before = sum(cpu_seconds(pid) for pid in pids)
            rtts, inside = [], []
            for seq, data in enumerate(frames, start=5):
                start = time.perf_counter()
                reply = send(seq, data)
                rtts.append((time.perf_counter() - start) * 1000)
                inside.append(reply.get("ms", 0.0))
            cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    rtts.sort()
    p95 = rtts[min(len(rtts) - 1, int(0.95 * len(rtts)))]
    print(f"{len(rtts)} frames {args.width}px q{args.quality}, return_frame={not args.no_return_frame}: "
          f"round trip p50 {statistics.median(rtts):.1f} ms, p95 {p95:.1f} ms, max {rtts[-1]:.1f} ms; "
          f"in the function p50 {statistics.median(inside):.1f} ms; function CPU {cpu / len(rtts) * 1000:.1f} ms/frame; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
