"""Latency of one still on one thread: a 1920 px JPEG anonymised end to end; with --memory,
the peak memory of large photos against faceflow's estimate instead.

    python bench/stills.py [--runs 50] [--warmup 5] [--image PATH]
    python bench/stills.py --memory [--megapixels 12,48]

End to end = read the file's bytes from disk, then Engine.anonymize_bytes (decode, detect,
mask with the verification pass, encode) to JPEG bytes, with faceflow's defaults (YuNet at
640 px, blur ellipse). Everything runs on one thread: OMP/OpenBLAS/MKL threads are set to
1 before numpy, OpenCV and onnxruntime load, cv2.setNumThreads(1), Engine(threads=1).
After `--warmup` untimed runs, `--runs` timed ones give p50 / p95 / mean wall-clock ms,
and the p50 of the process's CPU time per run: on a busy machine wall time well above CPU
time means the run waited for a core. Peak RSS is ru_maxrss after the timed runs (model,
interpreter and buffers included).

Then each stage is timed on its own with faceflow's functions, once per run, on a fresh
decode each time: images.decode, engine.detect, Mask(...).apply (masks plus the
verification pass, which runs the detector again at threshold 0.2 until it no longer sees
a face in a mask, at most 3 more passes), images.encode. A second table splits detect into
its letterbox (resize + float blob), onnxruntime run and output decoding, and mask+verify
into the masks alone and the number of verify passes.

The image is ../shared/data/images/vladmandic_sample2.jpg beside the checkout (1920x1367,
3 faces); if it is missing, pyfeat_multi_face.jpg upscaled to 1920 px wide (JPEG q92) is
used instead.
Target (printed, not enforced): p50 <= 60 ms.

--memory: for each size (megapixels) and format (JPEG, HEIC, AVIF, 16-bit RGBA PNG), an image
made from skimage's astronaut() (photos stored sideways with EXIF orientation 6, as phones do)
is anonymised in a fresh process: the table gives images.memory_needed (what is checked against
the budget before decoding), the process's peak RSS (VmHWM) less its RSS once the engine is
loaded, and the wall time. Target (printed): every peak within the estimate plus
images.RESERVED_BYTES, the promise the memory budget rests on.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
from faceflow import images  # noqa: E402
from faceflow.anonymize import MaskOptions  # noqa: E402
from faceflow.detectors import Letterbox  # noqa: E402
from faceflow.engine import VERIFY_THRESHOLD, Engine, Mask  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "images"
IMAGE = DATA / "vladmandic_sample2.jpg"
FALLBACK = DATA / "pyfeat_multi_face.jpg"
TARGET_MS = 60.0


class CountingDetector:
    """Passes detect() through to a detector and counts the calls (the verify passes)."""

    def __init__(self, detector):
        self.detector, self.calls = detector, 0

    def detect(self, image, threshold=None):
        self.calls += 1
        return self.detector.detect(image, threshold)


def source_image(path: Path | None) -> Path:
    if path is not None:
        return path
    if IMAGE.is_file():
        return IMAGE
    small = cv2.imread(str(FALLBACK))
    if small is None:
        raise SystemExit(f"neither {IMAGE} nor {FALLBACK} is readable")
    scale = 1920 / small.shape[1]
    big = cv2.resize(small, (1920, round(small.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)
    out = ROOT / ".bench" / "stills" / "upscaled_1920.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), big, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return out


def ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def median(values: list[float]) -> float:
    return statistics.median(values)


MEMORY_CHILD = r"""
import json, sys, time
from faceflow import images
from faceflow.engine import Engine


def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


data = open(sys.argv[1], "rb").read()
engine = Engine(threads=1)
baseline = status_mb("VmRSS")
start = time.perf_counter()
result = engine.anonymize_bytes(data, memory_bytes=1 << 40)  # measure, do not refuse
print(json.dumps({"ms": (time.perf_counter() - start) * 1000, "faces": len(result.report["faces"]),
                  "estimate_mb": images.memory_needed(images.header(data)) / 2**20,
                  "peak_mb": status_mb("VmHWM") - baseline}))
"""


def memory_table(megapixels: list[float]) -> None:
    import io
    import json
    import subprocess
    import tempfile

    from PIL import Image
    from skimage.data import astronaut

    face = astronaut()[:, :384]  # RGB, portrait
    folder = Path(tempfile.mkdtemp(prefix="faceflow-memory-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "shared"), os.environ.get("PYTHONPATH", "")])}
    print("| image | estimate MB | peak above the loaded engine MB | ms | faces |\n|---|---|---|---|---|")
    within = True
    for mp in megapixels:
        height = int((mp * 1e6 * 4 / 3) ** 0.5)
        width = height * 3 // 4
        upright = Image.fromarray(face).resize((width, height), Image.Resampling.BICUBIC)
        exif = Image.Exif()
        exif[0x0112] = 6
        for fmt, ext in (("JPEG", ".jpg"), ("HEIF", ".heic"), ("AVIF", ".avif"), ("PNG", ".png")):
            path = folder / f"{mp:g}mp{ext}"
            if fmt == "PNG":  # 16-bit RGBA, upright
                deep = np.full((height, width, 4), 65535, np.uint16)
                deep[..., :3] = cv2.cvtColor(np.asarray(upright), cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
                cv2.imwrite(str(path), deep)
                del deep
            else:
                out = io.BytesIO()
                upright.transpose(Image.Transpose.ROTATE_90).save(out, fmt, quality=90, exif=exif.tobytes())
                path.write_bytes(out.getvalue())
            done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path)], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"| {mp:g} MP {fmt} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")
                within = False
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            within &= r["peak_mb"] <= r["estimate_mb"] + images.RESERVED_BYTES / 2**20
            label = f"{mp:g} MP {fmt}" + (" 16-bit RGBA" if fmt == "PNG" else "")
            print(f"| {label} | {r['estimate_mb']:.0f} | {r['peak_mb']:.0f} | {r['ms']:.0f} | {r['faces']} |")
            path.unlink()
    print(f"\nevery peak within the estimate + {images.RESERVED_BYTES >> 20} MB reserved: "
          f"{'yes' if within else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--image", type=Path, help="a JPEG to use instead of the default")
    ap.add_argument("--memory", action="store_true", help="peak memory of large photos instead")
    ap.add_argument("--megapixels", default="12,48", help="sizes for --memory")
    args = ap.parse_args()
    if args.memory:
        memory_table([float(v) for v in args.megapixels.split(",")])
        return
    cv2.setNumThreads(1)
    path = source_image(args.image)
    engine = Engine(threads=1)

    def end_to_end() -> bytes:
        return engine.anonymize_bytes(path.read_bytes(), out_format="JPEG").data

    for _ in range(args.warmup):
        end_to_end()
    times, cpu = [], []
    for _ in range(args.runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        end_to_end()
        times.append(ms(start))
        cpu.append((time.process_time() - start_cpu) * 1000)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    p50, p95 = np.percentile(times, [50, 95])

    data = path.read_bytes()
    picture = images.decode(data)
    faces = engine.detect(images.to_bgr8(picture.pixels))
    print(f"image: {path} ({picture.width}x{picture.height}, {len(data) // 1024} KiB), "
          f"{len(faces)} faces; detector {engine.detector.name} at {engine.detector.max_side} px, "
          f"1 thread; {args.warmup} warm-up + {args.runs} timed runs\n")
    print("| end to end (bytes -> bytes) | p50 ms | p95 ms | mean ms | CPU p50 ms | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    print(f"| anonymize_bytes, JPEG out | {p50:.1f} | {p95:.1f} | {statistics.mean(times):.1f} | "
          f"{median(cpu):.1f} | {peak_mb:.0f} |")
    print(f"target p50 <= {TARGET_MS:.0f} ms: {'met' if p50 <= TARGET_MS else 'NOT met'}\n")

    stages = {"decode": [], "detect": [], "mask+verify": [], "encode": []}
    passes = []
    for _ in range(args.runs):
        start = time.perf_counter()
        picture = images.decode(data)
        stages["decode"].append(ms(start))
        start = time.perf_counter()
        faces = engine.detect(images.to_bgr8(picture.pixels))
        stages["detect"].append(ms(start))
        verify = CountingDetector(engine.detector)
        start = time.perf_counter()
        Mask(MaskOptions(), verify).apply(picture.pixels, faces)
        stages["mask+verify"].append(ms(start))
        passes.append(verify.calls)
        start = time.perf_counter()
        images.encode(picture, "JPEG")
        stages["encode"].append(ms(start))
    total = sum(median(v) for v in stages.values())
    print("| stage | median ms | share of the stage sum |\n|---|---|---|")
    for name, values in stages.items():
        print(f"| {name} | {median(values):.1f} | {median(values) / total:.0%} |")
    print(f"| sum of stages | {total:.1f} | |\n")

    detector, bgr = engine.detector, images.to_bgr8(images.decode(data).pixels)
    box = Letterbox.fit(*bgr.shape[:2], detector.max_side)
    parts = {"letterbox: resize + blob": [], "onnxruntime run": [], "output decoding + NMS": [],
             "masks alone (no verify)": []}
    for _ in range(args.runs):
        start = time.perf_counter()
        blob = detector.preprocess(box, [bgr])
        parts["letterbox: resize + blob"].append(ms(start))
        start = time.perf_counter()
        outputs = detector.session.run(None, {detector.input_name: blob})
        parts["onnxruntime run"].append(ms(start))
        start = time.perf_counter()
        detector.decode(outputs, 0, box, VERIFY_THRESHOLD)
        parts["output decoding + NMS"].append(ms(start))
        pixels = bgr.copy()
        start = time.perf_counter()
        Mask(MaskOptions()).apply(pixels, faces)
        parts["masks alone (no verify)"].append(ms(start))
    print(f"| inside detect and mask+verify | median ms |\n|---|---|")
    for name, values in parts.items():
        print(f"| {name} | {median(values):.2f} |")
    print(f"| verify passes per image (detector runs after the first) | "
          f"{min(passes)}-{max(passes)} |")
    print(f"\nletterbox: {bgr.shape[1]}x{bgr.shape[0]} -> {box.width}x{box.height} network input "
          f"(scale {box.scale:.3f})")


if __name__ == "__main__":
    main()
