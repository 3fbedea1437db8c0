#!/usr/bin/env bash
# The GPU worker's pipeline on a GPU machine: batched detection and full anonymisation at 1080p.
#
#   bash bench/gpu.sh [SECONDS]        # from the repository root; SECONDS of clip (default 10)
#
# What it does, in order:
#   1. A virtual environment (.bench/gpu-venv) with faceflow and onnxruntime-gpu (CUDA 12 and
#      cuDNN 9 from their PyPI wheels, onnxruntime-gpu[cuda,cudnn]), the versions of
#      functions/gpu/requirements.txt. Where PyPI cannot be reached, an onnxruntime that already
#      has the CUDA provider in the system Python is used instead (the venv sees system packages).
#   2. Models: $FACEFLOW_MODEL_DIR, else .bench/models, else the default folder. None is
#      downloaded here: copy them along (cp -r ~/.cache/faceflow/models .bench/models).
#   3. Checks that the CUDA provider (and TensorRT, where onnxruntime has it and its libraries
#      load) really ran the detector: onnxruntime's profile names the provider of every node;
#      fails when no node ran on the GPU.
#   4. Prints detector frames/s on 1080p frames for batches of 1, 8 and 32 (at the default
#      640 px and at full 1920 px), then full anonymisation (decode → detect → track → mask →
#      encode, VideoOptions(batch=16), as the GPU worker runs it) of a 1080p clip: a pan over
#      ../shared/data/images/pyfeat_multi_face.jpg when that is there, else a synthetic
#      pattern (no faces: the detector still runs on every frame). The clip is made under
#      .bench/gpu and removed.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_OF_CLIP="${1:-10}"
VENV=.bench/gpu-venv
ORT_GPU=$(sed -n 's/^onnxruntime-gpu==//p' functions/gpu/requirements.txt)

mkdir -p .bench
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
has_cuda() { "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; }
if ! has_cuda; then
    echo "installing onnxruntime-gpu[cuda,cudnn]==$ORT_GPU ..."
    "$PY" -m pip install -q "onnxruntime-gpu[cuda,cudnn]==$ORT_GPU" || echo "pip install failed (no registry?)"
fi
"$PY" -m pip install -q --no-deps -e . 2>/dev/null || true
"$PY" -c "import av, cv2, numpy" 2>/dev/null || "$PY" -m pip install -q av opencv-python-headless numpy pillow
has_cuda || { echo "FAIL: onnxruntime has no CUDAExecutionProvider here"; exit 1; }
if [ -z "${FACEFLOW_MODEL_DIR:-}" ] && [ -f .bench/models/manifest.json ]; then
    export FACEFLOW_MODEL_DIR="$PWD/.bench/models"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

"$PY" - "$SECONDS_OF_CLIP" <<'EOF'
import json, math, shutil, sys, time
from pathlib import Path

import av
import cv2
import numpy as np
import onnxruntime as ort

sys.path.insert(0, "shared")
from faceflow import bundle, runtime  # noqa: E402
from faceflow.engine import Engine  # noqa: E402
from faceflow.video import VideoOptions  # noqa: E402

if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # CUDA and cuDNN from their PyPI wheels
seconds = float(sys.argv[1])
W, H, FPS = 1920, 1080, 30
work = Path(".bench/gpu")
work.mkdir(parents=True, exist_ok=True)
models = bundle.default_model_dir()
model = models / "yunet_2023mar.onnx"
if not model.exists():
    sys.exit(f"FAIL: no model at {model}: copy the bundle (see the header)")
print("onnxruntime", ort.__version__, "providers available:", ort.get_available_providers())


def providers_that_ran(providers):
    """Run the detector once with profiling on; the providers its nodes ran on."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / "profile")
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    name = sess.get_inputs()[0].name
    x = np.zeros((1, 3, 384, 640), np.float32)
    for _ in range(3):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    ran = {}
    for e in events:
        p = e.get("args", {}).get("provider")
        if e.get("cat") == "Node" and p:
            ran[p] = ran.get(p, 0) + 1
    return sess.get_providers(), ran


ok = True
listed, ran = providers_that_ran(["CUDAExecutionProvider", "CPUExecutionProvider"])
print(f"CUDA session providers {listed}; node runs by provider {ran}")
if not ran.get("CUDAExecutionProvider"):
    print("FAIL: no node ran on CUDA")
    ok = False
if "TensorrtExecutionProvider" in ort.get_available_providers():
    try:
        listed, ran = providers_that_ran(["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                          "CPUExecutionProvider"])
        trt = "TensorrtExecutionProvider" in listed and any("Tensorrt" in p for p in ran)
        print(f"TensorRT session providers {listed}; node runs {ran}; TensorRT ran: {trt}")
    except Exception as exc:  # noqa: BLE001 — TensorRT is optional; report and go on
        print(f"TensorRT did not load: {exc}")
else:
    print("TensorRT: not in this onnxruntime build")

# --- the clip ---
photo_path = Path("../shared/data/images/pyfeat_multi_face.jpg")
photo = cv2.imread(str(photo_path)) if photo_path.exists() else None
clip = work / "clip_1080p.mp4"
n = round(seconds * FPS)
frames = []
with av.open(str(clip), "w") as out:
    s = out.add_stream("libx264", rate=FPS)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    s.options = {"crf": "20", "preset": "veryfast"}
    for i in range(n):
        t = i / max(1, n - 1)
        if photo is not None:
            ph, pw = photo.shape[:2]
            zoom = 1.0 + 0.6 * math.sin(math.pi * t)
            cw = min(pw, ph * W / H) / zoom
            x0 = (pw - cw) * t
            y0 = (ph - cw * H / W) / 2
            sc = W / cw
            img = cv2.warpAffine(photo, np.float32([[sc, 0, -sc * x0], [0, sc, -sc * y0]]), (W, H),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        else:
            yy, xx = np.mgrid[0:H, 0:W]
            img = np.dstack([(xx + 7 * i) % 256, (yy + 3 * i) % 256, (xx + yy) % 256]).astype(np.uint8)
        if len(frames) < 64:
            frames.append(img)
        f = av.VideoFrame.from_ndarray(img, format="bgr24")
        f.pts = i
        out.mux(s.encode(f))
    out.mux(s.encode())
print(f"clip: {W}x{H}, {n} frames, {'the photo pan' if photo is not None else 'a synthetic pattern (no faces)'}")

# --- batched detection ---
for max_side in (640, 1920):
    engine = Engine(providers="gpu", max_side=max_side)
    print(f"detector max_side {max_side}, providers {engine.detector.providers}")
    for batch in (1, 8, 32):
        group = (frames * (batch // len(frames) + 1))[:batch]
        engine.detect_batch(group)  # warm-up (CUDA kernels, TensorRT engine)
        runs = max(2, 128 // batch)
        t = time.perf_counter()
        for _ in range(runs):
            found = engine.detect_batch(group)
        dt = time.perf_counter() - t
        print(f"  batch {batch:2d}: {runs * batch / dt:7.1f} frames/s detection "
              f"(faces on the first frame: {len(found[0])})")

# --- the whole pipeline, as the GPU worker runs it ---
engine = Engine(providers="gpu")
engine.detect_batch(frames[:16])
t = time.perf_counter()
summary = engine.anonymize_file(clip, work / "out.mp4", video_options=VideoOptions(batch=16),
                                report=work / "out.json")
dt = time.perf_counter() - t
print(f"full anonymisation 1080p, batch 16: {summary['frames'] / dt:.1f} frames/s "
      f"({summary['frames']} frames in {dt:.1f} s, frames with faces {summary['frames_with_faces']}, "
      f"output {summary['pix_fmt']})")
shutil.rmtree(work)
sys.exit(0 if ok else 1)
EOF
