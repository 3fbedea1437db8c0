"""Cold start of the function images' handlers: from process start to the handler being
ready (interpreter start, imports, engine and model load), median of N fresh processes.

    python bench/coldstart.py [--runs 10] [--handler functions.stills.app]

The handler module is imported exactly as awslambdaric imports it at init. Settings point at
unused loopback addresses: nothing connects during init (clients are created lazily).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = "import importlib, sys; importlib.import_module(sys.argv[1]); print('ready', flush=True)"


def one_run(module: str, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, module], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "ready" not in proc.stdout:
        raise SystemExit(f"{module} failed to initialise:\n{proc.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--handler", action="append",
                    help="handler module (repeatable; default the stills and api functions)")
    args = ap.parse_args()
    modules = args.handler or ["functions.stills.app", "functions.api.app"]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")]),
           "FACEFLOW_INPUT_BUCKET": "in", "FACEFLOW_OUTPUT_BUCKET": "out",
           "FACEFLOW_REDIS_URL": "redis://127.0.0.1:1/0", "AWS_DEFAULT_REGION": "us-east-1",
           "POWERTOOLS_TRACE_DISABLED": "true"}
    one_run(modules[0], env)  # warm the OS file cache, as a provisioned image would be
    print(f"| handler | median s | min s | max s | runs |\n|---|---|---|---|---|")
    for module in modules:
        times = [one_run(module, env) for _ in range(args.runs)]
        print(f"| {module} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} | {len(times)} |")
    print("target: median <= 1 s")


if __name__ == "__main__":
    main()
