"""Still formats beyond JPEG/PNG/WebP, on every surface: single-frame and partial-frame GIFs,
phones' HEIC/HEIF and AVIF, through the engine, the command line, the HTTP API's
/v1/anonymize and an S3 upload to the stills function (the real handlers under devstack:
moto_server, redis-server, awslambdaric), and a large image the functions must refuse with
a clear message (413 / a failed job) instead of running out of memory.
"""
from __future__ import annotations

import io
import json
import time
import urllib.request

import cv2
import numpy as np
import pytest
from PIL import Image, ImageSequence

from conftest import run_cli
from faceflow import images, media
from faceflow.face import iou
from stills_data import GPS_IFD, MAKE, ORIENTATION, gif_bytes, rgb, sideways_photo, write_large_png


def bgr_of(pil_image) -> np.ndarray:
    return cv2.cvtColor(np.asarray(pil_image.convert("RGB")), cv2.COLOR_RGB2BGR)


def gif_frames(data: bytes) -> tuple[list[np.ndarray], list[int]]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "GIF"
        frames = [(bgr_of(f), f.info.get("duration")) for f in ImageSequence.Iterator(im)]
    return [f for f, _ in frames], [d for _, d in frames]


def inner(box, shrink=0.2):
    x, y, w, h = box
    return (slice(int(y + h * shrink), int(y + h * (1 - shrink))),
            slice(int(x + w * shrink), int(x + w * (1 - shrink))))


def assert_face_masked(before: np.ndarray, after: np.ndarray, box, rest_rows=slice(-120, None)):
    region = inner(box)
    assert np.abs(after[region].astype(int) - before[region]).mean() > 25, "face not masked"
    rest = np.abs(after[rest_rows].astype(int) - before[rest_rows]).mean()
    assert rest < 8, f"the picture changed away from the face (mean |diff| {rest:.1f})"


@pytest.fixture(scope="module")
def portrait(astronaut_bgr) -> np.ndarray:
    """Not square (384 wide, 512 high), so that a wrong orientation changes the shape."""
    return np.ascontiguousarray(astronaut_bgr[:, :384])


# --- GIF -----------------------------------------------------------------------------------------

def test_single_frame_gif_through_the_cli(engine, astronaut_bgr, tmp_path):
    src, dst = tmp_path / "one.gif", tmp_path / "one-out.gif"
    src.write_bytes(gif_bytes([Image.fromarray(rgb(astronaut_bgr))], 100))
    (before,), _ = gif_frames(src.read_bytes())

    result = run_cli("anonymize", src, "-o", dst)
    assert result.returncode == 0, result.stderr
    frames, _ = gif_frames(dst.read_bytes())
    assert len(frames) == 1 and frames[0].shape == astronaut_bgr.shape
    face = engine.detect(before)[0]
    assert_face_masked(before, frames[0], face.box)


def test_gif_with_partial_frames_and_disposal_is_masked_as_shown(engine, astronaut_bgr):
    """Frames after the first cover part of the screen only (offsets), with 'leave in place'
    and 'restore to background' disposal: each output frame is the composited picture, masked."""
    base = Image.fromarray(rgb(astronaut_bgr))
    patch = Image.fromarray(rgb(astronaut_bgr[300:420, 300:460]))  # away from the face
    shifted = np.roll(astronaut_bgr, 40, axis=1)
    second = base.copy()
    second.paste(patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (300, 300))
    frames = [base, second, Image.fromarray(rgb(shifted))]
    data = gif_bytes(frames, [100, 150, 200], disposal=[1, 2, 1], optimize=True)
    with Image.open(io.BytesIO(data)) as im:  # Pillow stores the later frames as partial rectangles
        im.seek(1)
        assert im.tile[0][1][2:] != im.size or im.disposal_method == 2
    before, _ = gif_frames(data)

    result = engine.anonymize_bytes(data)
    after, durations = gif_frames(result.data)
    assert len(after) == 3 and durations == [100, 150, 200]
    assert [len(f["faces"]) for f in result.report["frames"]] == [1, 1, 1]
    for shown, masked, frame in zip(before, after, result.report["frames"]):
        assert_face_masked(shown, masked, frame["faces"][0]["box"])


# --- HEIC/HEIF and AVIF --------------------------------------------------------------------------

PHONE_FORMATS = [("HEIF", ".heic", "image/heic"), ("HEIF", ".heif", "image/heif"),
                 ("AVIF", ".avif", "image/avif")]


def test_phone_formats_are_known_to_media_and_the_upload_settings():
    from functions.common.settings import UPLOAD_CONTENT_TYPES
    for fmt, ext, media_type in PHONE_FORMATS:
        assert media.IMAGE_EXTENSIONS[ext] == fmt
        assert media.kind_of(f"photo{ext.upper()}") == "image"
        assert media.media_type_for(f"IMG_0001{ext}") == media_type
        assert UPLOAD_CONTENT_TYPES[ext] == media_type  # what a presigned upload is signed with
    assert UPLOAD_CONTENT_TYPES[".jpg"] == UPLOAD_CONTENT_TYPES[".jpeg"] == "image/jpeg"
    assert UPLOAD_CONTENT_TYPES[".gif"] == "image/gif"


@pytest.mark.parametrize("fmt,ext", [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_phone_photo_is_read_upright_and_written_back_without_metadata(fmt, ext, engine, portrait, tmp_path):
    data = sideways_photo(portrait, fmt)
    assert images.header(data).format == fmt

    picture = images.decode(data)
    assert picture.pixels.shape == portrait.shape  # EXIF orientation applied
    assert np.abs(picture.pixels.astype(int) - portrait).mean() < 8

    src, dst = tmp_path / f"IMG_0001{ext}", tmp_path / f"out{ext}"
    src.write_bytes(data)
    report = engine.anonymize_file(src, dst)
    assert report["format"] == fmt  # written back in its own format
    assert (report["width"], report["height"]) == (384, 512)
    with Image.open(dst) as out:
        assert out.format == fmt and out.size == (384, 512)
        exif = out.getexif()
        assert exif.get(MAKE) is None and not exif.get_ifd(GPS_IFD) and exif.get(ORIENTATION, 1) == 1
        assert not out.info.get("exif") and not out.info.get("xmp")
        after = bgr_of(out)
    assert len(report["faces"]) == 1
    assert_face_masked(portrait, after, report["faces"][0]["box"], rest_rows=slice(-100, None))

    record = engine.analyze_bytes(data)
    assert (record["width"], record["height"], record["format"]) == (384, 512, fmt)
    assert iou(record["faces"][0]["box"], report["faces"][0]["box"]) > 0.9


def test_truncated_phone_photo_is_a_clear_error(portrait, tmp_path):
    for fmt in ("HEIF", "AVIF"):
        data = sideways_photo(portrait, fmt)
        with pytest.raises(images.BadInput):
            images.decode(data[: len(data) // 2])
    src = tmp_path / "cut.heic"
    src.write_bytes(sideways_photo(portrait, "HEIF")[:3000])
    result = run_cli("anonymize", src, "-o", tmp_path / "out.heic")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [src]


# --- through the functions -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    pytest.importorskip("awslambdaric", reason="awslambdaric not installed: pip install awslambdaric")
    import devstack
    reason = devstack.skip_reason()
    if reason:
        pytest.skip(f"devstack cannot run here: {reason}")
    # the template's memory (2048 MB) and upload limit: the functions as deployed
    with devstack.Stack(function_env={"FACEFLOW_MODEL_DIR": str(model_dir)},
                        workdir=tmp_path_factory.mktemp("formats-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def large_png(tmp_path_factory, astronaut_bgr) -> bytes:
    """A 10000 x 10000 16-bit RGBA PNG like the report's: about 2 MB, 800 MB decoded."""
    path = tmp_path_factory.mktemp("large") / "large.png"
    write_large_png(path, astronaut_bgr)
    return path.read_bytes()


def wait_job(stack, job_id: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = stack.request("GET", f"/v1/jobs/{job_id}")
        assert status == 200, body
        job = json.loads(body)
        if job["status"] in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout}s"
        time.sleep(0.2)


def upload(stack, name: str, data: bytes) -> tuple[str, dict]:
    """Upload through the API's presigned URL (as a client does); the S3 event runs the stills
    function. Returns the job id and its final record."""
    status, _, body = stack.request("POST", "/v1/jobs", body={"filename": name})
    assert status == 201, body
    created = json.loads(body)
    up = created["upload"]
    request = urllib.request.Request(up["url"], data=data, method="PUT", headers=up["headers"])
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    return created["job_id"], wait_job(stack, created["job_id"])


def output(stack, job: dict) -> tuple[bytes, str]:
    bucket, key = job["outputs"]["image"][len("s3://"):].split("/", 1)
    obj = stack.s3.get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj["ContentType"]


def test_single_frame_gif_through_the_api_and_an_upload(stack, astronaut_bgr):
    data = gif_bytes([Image.fromarray(rgb(astronaut_bgr))], 100)
    status, headers, body = stack.request("POST", "/v1/anonymize", body=data,
                                          headers={"Content-Type": "image/gif"})
    assert status == 200, body[:300]
    assert headers["content-type"] == "image/gif" and headers["x-faceflow-faces"] == "1"
    frames, _ = gif_frames(body)
    assert len(frames) == 1 and frames[0].shape == astronaut_bgr.shape

    job_id, job = upload(stack, "one.gif", data)
    assert job["status"] == "done", job
    out, content_type = output(stack, job)
    assert content_type == "image/gif" and len(gif_frames(out)[0]) == 1
    assert stack.queue_depth(dlq=True) == 0  # nothing went to the dead-letter queue


@pytest.mark.parametrize("fmt,ext,media_type", PHONE_FORMATS)
def test_phone_photo_upload_comes_back_in_its_format(fmt, ext, media_type, stack, portrait):
    job_id, job = upload(stack, f"IMG_0001{ext}", sideways_photo(portrait, fmt))
    assert job["status"] == "done" and job["faces"] == 1, job
    out, content_type = output(stack, job)
    assert content_type == media.image_media_type(fmt)
    with Image.open(io.BytesIO(out)) as im:
        assert im.format == fmt and im.size == (384, 512) and not im.info.get("exif")


def test_image_too_large_for_the_function_memory_is_refused_with_a_reason(stack, large_png):
    assert len(large_png) < 5 * 1024 * 1024  # within the API's body limit: refused for its pixels
    status, _, body = stack.request("POST", "/v1/anonymize", body=large_png,
                                    headers={"Content-Type": "image/png"})
    assert status == 413, body[:300]
    message = json.loads(body)["message"]
    assert "10000x10000" in message and "MB" in message, message

    job_id, job = upload(stack, "large.png", large_png)
    assert job["status"] == "failed" and "10000x10000" in job["error"], job
