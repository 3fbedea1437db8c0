"""Real-time streams on loopback: per-frame latency and sustained frame rate through
`faceflow serve`'s WebSocket route and the GPU container's gRPC service, on CPU.

    python bench/stream.py [--streams 1,4,8] [--seconds 10] [--transports ws,grpc] [--json out.json]

The source: ../shared/data/video/pyfeat_WolfgangLanger_Pexels.mp4 (640x360, a talking head,
a hand over the face for a while), decoded and JPEG-encoded once (quality 80, as
`faceflow stream` sends it), then played by N clients at once, each at 25 fps from its own
start, as `faceflow stream` plays a file (faceflow.streamclient.play_async: a window of 4
frames in flight, later frames dropped), anonymised frames returned. The clip loops when
--seconds asks for more than it holds.

Each server runs in its own process, started fresh per transport and warmed up with one
short stream before the runs:
  ws    `faceflow serve`'s /v1/stream route, text messages as API Gateway takes them.
  grpc  python -m functions.gpu.stream_server (the GPU container's service) on CPU.

Per run: latency (send to reply, over every frame of every stream) p50, p95, max; sustained
frames per second per stream (results / time from the first send to the last reply; the
slowest stream and the mean); frames dropped (client window and server backlog) out of those
played; the server's and the clients' CPU seconds (user + system) beside the wall time. The
clients share the machine with the server: on two cores they take their part of it.

Targets (printed, not enforced), on two cores at 640x360: one stream p50 <= 40 ms and 25 fps
sustained. The load average is printed with the figures: on a shared machine they are noisy.

On a GPU machine, the gRPC service at 1080p with many streams (the clip upscaled; its JPEGs
within the protocol's 95 KiB, so at a lower quality):

    python bench/stream.py --transports grpc --providers gpu --width 1920 --streams 1,8,32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
sys.path.insert(0, str(ROOT))

CLIP = ROOT.parent / "shared" / "data" / "video" / "pyfeat_WolfgangLanger_Pexels.mp4"
FPS = 25.0
TARGET_P50_MS, TARGET_FPS = 40.0, 25.0


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(transport: str, providers: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "shared"), str(ROOT)])}
    if transport == "ws":
        cmd = [sys.executable, "-m", "faceflow.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--providers", providers]
        url = f"ws://127.0.0.1:{port}/v1/stream"
    else:
        cmd = [sys.executable, "-m", "functions.gpu.stream_server", "--host", "127.0.0.1", "--port", str(port),
               "--providers", providers]
        url = f"grpc://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {transport} server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, url
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the {transport} server did not listen within 60 s")


def source_frames(seconds: float, width: int | None):
    """The clip's frames as the client sends them; `width`: scaled to that width first (the
    clip is 640x360: larger sizes are it upscaled)."""
    from faceflow.streamclient import encode_jpeg
    frames = []
    with av.open(str(CLIP)) as container:
        for frame in container.decode(video=0):
            bgr = frame.to_ndarray(format="bgr24")
            if width and width != bgr.shape[1]:
                height = round(bgr.shape[0] * width / bgr.shape[1] / 2) * 2
                bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_CUBIC)
            frames.append(encode_jpeg(bgr))
    wanted = int(round(seconds * FPS))
    return [frames[i % len(frames)] for i in range(wanted)]


async def run_streams(url: str, frames, streams: int):
    from faceflow.streamclient import play_async
    return await asyncio.gather(*(play_async(frames, url, fps=FPS, return_frames=True) for _ in range(streams)))


def measure(url: str, server_pid: int, frames, streams: int) -> dict:
    wall, cpu, server_cpu = time.perf_counter(), time.process_time(), process_cpu(server_pid)
    results = asyncio.run(run_streams(url, frames, streams))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server_cpu = process_cpu(server_pid) - server_cpu
    latencies = np.concatenate([np.asarray(s.latencies_ms) for s in results if s.latencies_ms] or [np.zeros(0)])
    fps = [s.sustained_fps for s in results]
    played = sum(s.frames for s in results)
    return {
        "streams": streams, "frames_played": played, "done": sum(s.done for s in results),
        "dropped": sum(s.dropped for s in results), "client_dropped": sum(s.client_dropped for s in results),
        "server_dropped": sum(s.server_dropped for s in results), "refused": sum(s.refused for s in results),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies.size else None,
        "p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies.size else None,
        "max_ms": round(float(latencies.max()), 1) if latencies.size else None,
        "fps_min": round(min(fps), 2), "fps_mean": round(sum(fps) / len(fps), 2),
        "wall_s": round(wall, 2), "server_cpu_s": round(server_cpu, 2), "client_cpu_s": round(cpu, 2),
        "load": load(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,4,8", help="concurrent streams per run, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each stream (the clip loops)")
    parser.add_argument("--transports", default="ws,grpc")
    parser.add_argument("--width", type=int, default=None, help="scale the clip to this width (e.g. 1920 for 1080p)")
    parser.add_argument("--providers", default="cpu", help="the servers' onnxruntime providers (gpu on a GPU machine)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    if not CLIP.is_file():
        raise SystemExit(f"the clip is missing: {CLIP} (put shared/data beside the checkout)")
    frames = source_frames(args.seconds, args.width)
    print(f"{CLIP.name}: {len(frames)} frames a stream at {FPS:g} fps, {frames[0].width}x{frames[0].height}, "
          f"JPEG {np.mean([len(f.jpeg) for f in frames]) / 1024:.1f} KiB on average; {os.cpu_count()} cores, {load()}")
    rows = []
    for transport in args.transports.split(","):
        proc, url = start_server(transport, args.providers)
        try:
            asyncio.run(run_streams(url, frames[:50], 1))  # warm-up: model and first allocations
            for streams in (int(n) for n in args.streams.split(",")):
                row = {"transport": transport, **measure(url, proc.pid, frames, streams)}
                rows.append(row)
                print(f"{transport:4} {streams} stream(s): p50 {row['p50_ms']} ms  p95 {row['p95_ms']} ms  "
                      f"max {row['max_ms']} ms  fps/stream min {row['fps_min']} mean {row['fps_mean']}  "
                      f"dropped {row['dropped']}/{row['frames_played']} (client {row['client_dropped']}, "
                      f"server {row['server_dropped']})  wall {row['wall_s']} s, CPU server {row['server_cpu_s']} s "
                      f"clients {row['client_cpu_s']} s  ({row['load']})", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for row in rows:
        if row["streams"] == 1 and args.providers == "cpu" and frames[0].width == 640:
            ok = (row["p50_ms"] or 1e9) <= TARGET_P50_MS and row["fps_min"] >= TARGET_FPS * 0.98
            print(f"target {row['transport']} 1 stream: p50 <= {TARGET_P50_MS:g} ms and {TARGET_FPS:g} fps: "
                  f"{'met' if ok else 'NOT met'} (p50 {row['p50_ms']} ms, {row['fps_min']} fps)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
