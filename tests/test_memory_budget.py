"""Memory: a still is processed within the function's memory or refused before it is decoded.

Each case runs the functions' path in a child process (settings from
AWS_LAMBDA_FUNCTION_MEMORY_SIZE, the engine, anonymize_bytes or analyze_bytes) and reads the
child's peak RSS (Linux's VmHWM). The images are made here, streamed to disk, so this process stays small.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT
from faceflow import images
from stills_data import sideways_photo, write_large_png

MiB = 1024 * 1024

CHILD = r"""
import json, sys
from functions.common.settings import function_memory_bytes
from faceflow import images
from faceflow.engine import Engine
from faceflow.images import TooLarge


def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


operation, path = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
engine = Engine()
record = {"baseline_mb": status_mb("VmRSS"), "estimate_mb": images.memory_needed(images.header(data)) / 2**20}
try:
    if operation == "anonymize":
        result = engine.anonymize_bytes(data, memory_bytes=function_memory_bytes())
        record.update(result.report, status="done", bytes=len(result.data))
    else:
        record.update(engine.analyze_bytes(data, memory_bytes=function_memory_bytes()), status="done")
except TooLarge as exc:
    record.update(status="refused", error=str(exc))
# The peak of this program's own memory (VmHWM): ru_maxrss would also count the parent's RSS at
# fork time, which Linux carries across exec.
record["peak_mb"] = status_mb("VmHWM")
print(json.dumps(record))
"""


def run_as_function(operation: str, path, memory_mb: int, model_dir) -> dict:
    env = {**os.environ, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
           "FACEFLOW_MODEL_DIR": str(model_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")])}
    env.pop("FACEFLOW_MEMORY_MB", None)
    done = subprocess.run([sys.executable, "-c", CHILD, operation, str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def large_png_16bit(tmp_path_factory, astronaut_bgr):
    """10000 x 10000 16-bit RGBA: about 2 MB on disk, 800 MB decoded."""
    path = tmp_path_factory.mktemp("memory") / "large16.png"
    write_large_png(path, astronaut_bgr)
    return path


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory, astronaut_bgr):
    """10000 x 10000 JPEG (300 MB decoded), made in a child so this process does not hold it."""
    path = tmp_path_factory.mktemp("memory") / "large.jpg"
    face = tmp_path_factory.mktemp("memory") / "face.png"
    cv2.imwrite(str(face), astronaut_bgr)
    script = ("import sys, cv2, numpy as np\n"
              "face = cv2.resize(cv2.imread(sys.argv[1]), (2000, 2000))\n"
              "big = np.full((10000, 10000, 3), 128, np.uint8)\n"
              "big[4000:6000, 4000:6000] = face\n"
              "assert cv2.imwrite(sys.argv[2], big, [cv2.IMWRITE_JPEG_QUALITY, 90])\n")
    subprocess.run([sys.executable, "-c", script, str(face), str(path)], check=True, timeout=300)
    return path


def assert_within(record: dict, memory_mb: int):
    # the margin the budget keeps free (images.MEMORY_MARGIN) is left untouched
    limit = memory_mb * (1 - images.MEMORY_MARGIN)
    peak = record["peak_mb"]
    assert peak < limit, f"peak {peak:.0f} MB, limit {limit:.0f} MB of {memory_mb} MB"


@pytest.mark.parametrize("memory_mb", [2048, 512])
def test_what_does_not_fit_is_refused_before_decoding(memory_mb, large_png_16bit, model_dir):
    record = run_as_function("anonymize", large_png_16bit, memory_mb, model_dir)
    assert record["status"] == "refused", {k: v for k, v in record.items() if k != "faces"}
    assert "10000x10000 16-bit PNG needs about" in record["error"] and "MB available" in record["error"]
    # decoding would have taken 800 MB for the pixels alone
    assert record["peak_mb"] < 400, record


def test_large_png_is_processed_within_a_larger_function(large_png_16bit, model_dir):
    record = run_as_function("anonymize", large_png_16bit, 4096, model_dir)
    assert record["status"] == "done", record
    assert (record["width"], record["height"], record["format"]) == (10000, 10000, "PNG")
    assert len(record["faces"]) == 1, record["faces"]
    assert_within(record, 4096)


def test_large_jpeg_is_anonymised_within_the_function_memory(large_jpeg, model_dir):
    record = run_as_function("anonymize", large_jpeg, 2048, model_dir)
    assert record["status"] == "done", record
    assert len(record["faces"]) == 1, record["faces"]
    x, y, w, h = record["faces"][0]["box"]
    assert 4000 < x + w / 2 < 6000 and 4000 < y + h / 2 < 6000  # in the full image's pixels
    assert_within(record, 2048)


def test_large_jpeg_is_analysed_from_a_reduced_decode_in_a_small_function(large_jpeg, model_dir):
    # 512 MB could not hold the full decode (300 MB) beside the runtime: analyze decodes at 1/4
    with open(large_jpeg, "rb") as f:
        head = images.header(f.read())
    assert images.memory_needed(head) > images.pixel_budget(512 * MiB)
    record = run_as_function("analyze", large_jpeg, 512, model_dir)
    assert record["status"] == "done", record
    assert (record["width"], record["height"]) == (10000, 10000)
    assert len(record["faces"]) == 1
    x, y, w, h = record["faces"][0]["box"]
    assert 4000 < x + w / 2 < 6000 and 4000 < y + h / 2 < 6000 and w > 200  # not 1/4 size
    assert_within(record, 512)


@pytest.fixture(scope="module")
def phone_photos(tmp_path_factory, astronaut_bgr) -> dict:
    """12-megapixel photos as phones and cameras save them (stored sideways with EXIF
    orientation 6), and a 16-bit RGBA PNG of the same size."""
    folder = tmp_path_factory.mktemp("phone")
    portrait = cv2.resize(astronaut_bgr[:, :384], (3024, 4032))
    paths = {}
    for fmt, ext in (("HEIF", ".heic"), ("AVIF", ".avif"), ("JPEG", ".jpg")):
        paths[fmt] = folder / f"IMG_0001{ext}"
        paths[fmt].write_bytes(sideways_photo(portrait, fmt))
    deep = np.full((3000, 4000, 4), 65535, np.uint16)
    deep[..., :3] = cv2.resize(astronaut_bgr, (4000, 3000)).astype(np.uint16) * 257
    paths["PNG"] = folder / "deep.png"
    cv2.imwrite(str(paths["PNG"]), deep)
    return paths


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "JPEG", "PNG"])
def test_peak_memory_stays_within_the_estimate(fmt, phone_photos, model_dir):
    """What the budget promises: the process never holds more than what it reserves for the
    runtime plus the estimate for the image (which is what is checked against the budget)."""
    record = run_as_function("anonymize", phone_photos[fmt], 2048, model_dir)
    assert record["status"] == "done", record
    assert record["format"] == fmt and len(record["faces"]) == 1, record
    assert record["peak_mb"] <= images.RESERVED_BYTES / MiB + record["estimate_mb"], \
        f"peak {record['peak_mb']:.0f} MB over the estimate {record['estimate_mb']:.0f} MB + the reserve"
    assert_within(record, 2048)


def test_memory_estimate_counts_every_copy():
    head = images.Header("PNG", 10000, 10000, channels=4, sample_bytes=2)
    pixels = 10000 * 10000 * 4 * 2
    assert images.memory_needed(head) == pixels + 2 * pixels  # the PNG encoder's buffer and its bytes
    turned = images.Header("JPEG", 4000, 3000, orientation=6)
    assert images.memory_needed(turned) == 2 * 4000 * 3000 * 3  # the turned copy, or the encoder's
    assert images.memory_needed(turned, scale=4) == 2 * 1000 * 750 * 3  # decoded, then turned
    gif = images.Header("GIF", 500, 400, frames=10)
    assert images.memory_needed(gif) == 10 * 500 * 400 * 3 + 10 * 500 * 400 * 8


def test_to_bgr8_in_bands_equals_the_whole_image_conversion():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 65536, (1000, 700, 4), dtype=np.uint16)
    expected = cv2.cvtColor((pixels >> 8).astype(np.uint8), cv2.COLOR_BGRA2BGR)
    assert np.array_equal(images.to_bgr8(pixels), expected)
    gray = rng.integers(0, 65536, (300, 200), dtype=np.uint16)
    expected = cv2.cvtColor((gray >> 8).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    assert np.array_equal(images.to_bgr8(gray), expected)


def test_analysis_is_budgeted_without_the_encoder():
    """Analysis never encodes: a 24-megapixel AVIF fits in a 1 GB function for analysis even
    though anonymising it (libaom holds the whole frame) does not."""
    avif = images.Header("AVIF", 6000, 4000)
    gigabyte = 1024 * MiB
    assert images.memory_needed(avif, encoded=False) == 6000 * 4000 * (3 + 16)  # pixels + decoder
    assert images.memory_needed(avif, encoded=False) < images.pixel_budget(gigabyte) < images.memory_needed(avif)
    with pytest.raises(images.TooLarge):
        images.check_memory(avif, gigabyte)
    images.check_memory(avif, gigabyte, encoded=False)
