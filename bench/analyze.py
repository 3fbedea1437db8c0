"""Face analysis speed and memory on one thread: a 640x480 photo with 1 to 5 faces, all the
default attributes (gender, age, pose, quality, eyes), and the cold start the analysis models add.

    python bench/analyze.py [--runs 30] [--warmup 3] [--attributes gender,age,pose,quality,eyes]
                            [--cold-runs 5] [--profile] [--age-chips SET] [--gender-chips SET]
                            [--models DIR]

The photo is cut from ../shared/data/images/pyfeat_multi_face.jpg (five faces, ~100-130 px):
a 640x480 window holding all five, then with 4, 3, 2, 1 of them covered by a flat grey patch
(the detector then finds one face fewer each time), encoded as JPEG q90 in memory; nothing is
written. End to end = Engine.analyze_bytes(jpeg, attributes=...) (decode, detect, mesh, every
estimator). Everything runs on one thread: OMP/OpenBLAS/MKL threads are set to 1 before numpy,
OpenCV and onnxruntime load, cv2.setNumThreads(1), Engine(threads=1).

Printed: p50 / p95 ms per face count with the process CPU time per run (wall far above CPU
means the run waited for a core on a busy machine) and, beside it, the same photo with
detection only (what the analysis adds is the difference), the cost of each extra face (least-squares
slope of p50, and of CPU time, over the face count), each stage's p50 at five faces (detect, mesh, each
estimator; with --profile a cProfile of the 5-face runs), peak RSS (ru_maxrss, interpreter
and models included) after the end-to-end runs and at the end, and the cold start: in
fresh processes, the wall time to import faceflow and build the Engine, then to build the
Analyzer (its imports and model loads: what analysis adds to a Lambda cold start); medians.
The load average is printed beside every table. Targets (printed, not enforced): p50 <= 40 ms
at up to 5 faces, peak RSS <= 180 MB, analysis cold start <= 1 s. --age-chips and
--gender-chips read each face from another of bench/accuracy.py's chip sets (one, mirror,
shift, four, ten) instead of agegender's defaults: the cost side of the accuracy it reports.
--models: another model folder (e.g. bench/accuracy.py --int8's).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
from faceflow import images  # noqa: E402
from faceflow.agegender import AGE_CHIP, CHIPS_PER_RUN, GENDER_CHIP, AgeGender  # noqa: E402
from faceflow.analysis import DEFAULT_ATTRIBUTES, FaceContext, parse_attributes  # noqa: E402
from faceflow.engine import Engine  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from accuracy import CHIP_SETS  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "images" / "pyfeat_multi_face.jpg"
WINDOW = (150, 20, 640, 480)  # x, y, w, h in the source: all five faces inside
TARGET_MS, TARGET_RSS_MB, TARGET_COLD_S = 40.0, 180.0, 1.0

COLD = """
import os, sys, time
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = "1"
start = time.perf_counter()
sys.path.insert(0, {shared!r})
from faceflow.engine import Engine
engine = Engine(threads=1, model_dir={models!r})
ready = time.perf_counter()
engine.analyzer({attributes!r})
print(ready - start, time.perf_counter() - ready)
"""


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def photos(engine: Engine) -> dict[int, bytes]:
    """JPEGs of the 640x480 window with 5, 4, ... 1 faces left uncovered."""
    source = cv2.imread(str(SOURCE))
    if source is None:
        raise SystemExit(f"{SOURCE} is not readable (the bench needs ../shared/data)")
    x, y, w, h = WINDOW
    window = source[y:y + h, x:x + w].copy()
    faces = sorted(engine.detect(window), key=lambda f: f.box[0])
    if len(faces) != 5:
        raise SystemExit(f"expected 5 faces in the window, the detector found {len(faces)}")
    out = {}
    picture = window.copy()
    for count in range(5, 0, -1):
        out[count] = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        fx, fy, fw, fh = faces[count - 1].box  # cover the rightmost face still showing
        x0, y0 = max(0, int(fx - 0.3 * fw)), max(0, int(fy - 0.3 * fh))
        picture[y0:int(fy + 1.3 * fh), x0:int(fx + 1.3 * fw)] = 128
    for count, data in out.items():
        found = len(engine.analyze_bytes(data)["faces"])
        if found != count:
            raise SystemExit(f"the {count}-face photo shows {found} faces to the detector")
    return out


def timed(fn, runs: int):
    wall, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    wall.sort()
    return statistics.median(wall), wall[min(len(wall) - 1, int(0.95 * len(wall)))], statistics.median(cpu)


def age_gender_parts(estimator: AgeGender, bgr, contexts) -> dict:
    """AgeGender's parts as stages: each network's chips, then the network on them."""
    points = [estimator.alignment_points(c) for c in contexts]
    stages = {}
    for session, size, label in ((estimator.age_session, AGE_CHIP, "age"),
                                 (estimator.gender_session, GENDER_CHIP, "gender")):
        variants = estimator.variants_for(size)
        per_run = max(1, CHIPS_PER_RUN // len(variants)) * len(variants)
        def chips(size=size):
            return [c for p in points for c in estimator.chips(bgr, p, size)]

        def network(session=session, blob=estimator.blob(chips()), per_run=per_run):
            name = session.get_inputs()[0].name
            return [session.run(None, {name: blob[i:i + per_run]}) for i in range(0, len(blob), per_run)]
        count = len(points) * len(variants)
        stages[f"- {label} chips ({count})"] = chips
        stages[f"- {label} network ({count} chips, {per_run} a run)"] = network
    return stages


def profile(fn, runs: int, top: int = 15) -> None:
    """cProfile of `runs` calls: the functions with the most time of their own."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [fn() for _ in range(runs)])
    print(f"\ncProfile, {runs} runs at 5 faces (own time, top {top}):")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def cold_start(attributes, runs: int, models: str | None = None) -> tuple[float, float]:
    """Median seconds, in fresh processes, of import + Engine, and of building the Analyzer
    (its imports and model loads) after that."""
    def once() -> tuple[float, float]:
        code = COLD.format(shared=str(ROOT / "shared"), attributes=list(attributes), models=models)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"cold start failed:\n{proc.stderr}")
        base, analysis = proc.stdout.strip().splitlines()[-1].split()
        return float(base), float(analysis)
    once()  # warm the OS file cache, as a provisioned image would be
    times = [once() for _ in range(runs)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cold-runs", type=int, default=5)
    ap.add_argument("--attributes", default=",".join(DEFAULT_ATTRIBUTES))
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of the 5-face runs")
    ap.add_argument("--age-chips", choices=sorted(CHIP_SETS), help="the age network's chip set")
    ap.add_argument("--gender-chips", choices=sorted(CHIP_SETS), help="the gender network's chip set")
    ap.add_argument("--models", help="model folder (default: faceflow's)")
    args = ap.parse_args()
    attributes = parse_attributes(args.attributes)
    cv2.setNumThreads(1)
    engine = Engine(threads=1, model_dir=args.models)
    analyzer = engine.analyzer(attributes)
    for estimator in analyzer.estimators:
        if isinstance(estimator, AgeGender):
            if args.age_chips:
                estimator.age_variants = CHIP_SETS[args.age_chips]
            if args.gender_chips:
                estimator.gender_variants = CHIP_SETS[args.gender_chips]
            print(f"chips a face: age {estimator.age_variants}, gender {estimator.gender_variants}")
    data = photos(engine)

    print(f"attributes: {','.join(attributes)}; one thread; {args.runs} runs after {args.warmup} warm-up")
    print(f"load average before: {load_average()}")
    print("| faces | p50 ms | p95 ms | CPU ms (p50) | detection only: p50 ms, CPU ms |\n|---|---|---|---|---|")
    p50s, cpus = {}, {}
    for count in sorted(data):
        fn = lambda d=data[count]: engine.analyze_bytes(d, attributes=attributes)  # noqa: E731
        detect_only = lambda d=data[count]: engine.analyze_bytes(d)  # noqa: E731
        for _ in range(args.warmup):
            fn()
            detect_only()
        p50, p95, cpu = timed(fn, args.runs)
        base_p50, _base_p95, base_cpu = timed(detect_only, args.runs)
        p50s[count] = p50
        cpus[count] = cpu
        print(f"| {count} | {p50:.1f} | {p95:.1f} | {cpu:.1f} | {base_p50:.1f}, {base_cpu:.1f} |")
    counts = np.array(sorted(p50s), float)
    slope, intercept = np.polyfit(counts, [p50s[c] for c in sorted(p50s)], 1)
    cpu_slope, cpu_intercept = np.polyfit(counts, [cpus[c] for c in sorted(cpus)], 1)
    print(f"cost per extra face: {slope:.1f} ms (fit: {intercept:.1f} ms + {slope:.1f} ms x faces); "
          f"CPU {cpu_slope:.1f} ms (fit: {cpu_intercept:.1f} ms + {cpu_slope:.1f} ms x faces)")
    print(f"load average after: {load_average()}")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS after the end-to-end runs: {rss_mb:.0f} MB (target <= {TARGET_RSS_MB:.0f} MB)")
    if args.profile:
        profile(lambda: engine.analyze_bytes(data[5], attributes=attributes), args.runs)

    # Stages at five faces.
    bgr = images.to_bgr8(images.decode(data[5]).pixels)
    faces = engine.detect(bgr)
    stages = {"decode": lambda: images.decode(data[5]), "detect": lambda: engine.detect(bgr)}
    meshes = [None] * len(faces)
    if analyzer.mesh is not None:
        stages["mesh (5 faces)"] = lambda: analyzer.mesh.run(bgr, faces)
        meshes = analyzer.mesh.run(bgr, faces)
    contexts = [FaceContext(f, m) for f, m in zip(faces, meshes)]
    for estimator in analyzer.estimators:
        stages[f"{type(estimator).__name__} (5 faces)"] = \
            lambda e=estimator: e.estimate(bgr, contexts)
        if isinstance(estimator, AgeGender):
            stages.update(age_gender_parts(estimator, bgr, contexts))
    print(f"\nstages at 5 faces, load average {load_average()}")
    print("| stage | p50 ms | CPU ms (p50) |\n|---|---|---|")
    for name, fn in stages.items():
        fn()
        p50, _p95, cpu = timed(fn, args.runs)
        print(f"| {name} | {p50:.1f} | {cpu:.1f} |")

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS at the end: {rss_mb:.0f} MB (target <= {TARGET_RSS_MB:.0f} MB), "
          f"load average {load_average()}")
    base, analysis_s = cold_start(attributes, args.cold_runs, args.models)
    print(f"cold start, median of {args.cold_runs} fresh processes: import + Engine {base:.2f} s, "
          f"then the Analyzer (imports + model loads) {analysis_s:.2f} s: {base + analysis_s:.2f} s "
          f"in all (target <= {TARGET_COLD_S:.0f} s); load average {load_average()}")
    print(f"target: p50 <= {TARGET_MS:.0f} ms up to 5 faces: "
          f"{'met' if max(p50s.values()) <= TARGET_MS else 'not met'} (max p50 {max(p50s.values()):.1f} ms)")


if __name__ == "__main__":
    main()
