"""Cold start of the function images' handlers: from process start to the handler being
ready (interpreter start, imports, engine and model load), median of N fresh processes.

    python bench/coldstart.py [--runs 10] [--handler functions.stills.app [--analysis]]

The handler module is imported exactly as awslambdaric imports it at init. Settings point at
unused loopback addresses: nothing connects during init (clients are created lazily).
Tracing is off (POWERTOOLS_TRACE_DISABLED), as in devstack: the X-Ray SDK is then not imported;
in Lambda with Tracing: Active it adds about 170 ms.

The api function loads the face engine on first use of /v1/analyze or /v1/anonymize, except
when Lambda initialises it ahead of traffic (AWS_LAMBDA_INITIALIZATION_TYPE
provisioned-concurrency or snap-start): the default run measures both (the second row is what
the first analyze of an on-demand environment pays on top, roughly). The last row adds the
default analysis models (age, gender, the face mesh: engine.analyzer(DEFAULT_ATTRIBUTES)) to
the provisioned init: the cold start of an environment that serves analysis.
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
# argv: the handler module, then "analysis" to also load the default analysis models into
# the handler's engine (what the first analysis request pays when init did not).
CHILD = """
import importlib, sys
handler = importlib.import_module(sys.argv[1])
if sys.argv[2:] == ["analysis"]:
    from faceflow.analysis import DEFAULT_ATTRIBUTES
    engine = handler.engine() if callable(handler.engine) else handler.engine
    engine.analyzer(DEFAULT_ATTRIBUTES)
print("ready", flush=True)
"""


def one_run(module: str, env: dict, analysis: bool = False) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, module, *(["analysis"] if analysis else [])],
                          env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "ready" not in proc.stdout:
        raise SystemExit(f"{module} failed to initialise:\n{proc.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--handler", action="append",
                    help="handler module (repeatable; default the stills and api functions)")
    ap.add_argument("--analysis", action="store_true",
                    help="with --handler: also time each handler with the default analysis models loaded")
    args = ap.parse_args()
    provisioned = {"AWS_LAMBDA_INITIALIZATION_TYPE": "provisioned-concurrency"}
    runs = ([(m, m, {}, False) for m in args.handler] if args.handler else
            [("functions.stills.app", "functions.stills.app", {}, False),
             ("functions.api.app", "functions.api.app", {}, False),
             ("functions.api.app (provisioned: engine at init)", "functions.api.app", provisioned, False),
             ("functions.api.app (provisioned) + default analysis models", "functions.api.app", provisioned,
              True)])
    if args.analysis and args.handler:
        runs += [(f"{m} + default analysis models", m, {}, True) for m in args.handler]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")]),
           "FACEFLOW_INPUT_BUCKET": "in", "FACEFLOW_OUTPUT_BUCKET": "out",
           "FACEFLOW_REDIS_URL": "redis://127.0.0.1:1/0", "AWS_DEFAULT_REGION": "us-east-1",
           "POWERTOOLS_TRACE_DISABLED": "true"}
    for _label, module, extra, analysis in runs:  # warm the OS file cache, as a provisioned image would be
        one_run(module, {**env, **extra}, analysis)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| handler | median s | min s | max s | runs |\n|---|---|---|---|---|")
    for label, module, extra, analysis in runs:
        times = [one_run(module, {**env, **extra}, analysis) for _ in range(args.runs)]
        print(f"| {label} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} | {len(times)} |")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("target: median <= 1 s")


if __name__ == "__main__":
    main()
