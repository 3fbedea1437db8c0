"""Bad and unusual inputs through the command line, as a user meets them.

Broken inputs must fail with a non-zero exit, one line on stderr (no traceback) and nothing
at all left in the output folder (no output, no `.name.xxxx.part` temporary). Unusual but
valid inputs (CMYK, 16-bit, alpha, grayscale, video without audio) must come out correct,
in the same kind of file, with the face masked and the rest of the picture left alone.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from faceflow.anonymize import MaskOptions, mask_region
from faceflow.face import Face

# The engine's verify pass may grow the mask by up to 3 x 0.2 over the default.
MAX_MASK_SCALE = MaskOptions().mask_scale + 0.6


# --- helpers ---------------------------------------------------------------------------------
def assert_one_line_error(result):
    # 2 is the CLI's "bad input" status; 1 ("failed: SomeError") would mean faceflow itself
    # broke on the file instead of recognising it as unusable.
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("faceflow"), lines[0]


def assert_ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # the "-> ..." summary


@pytest.fixture()
def dirs(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    return src, out


@pytest.fixture(scope="module")
def face_box(engine, astronaut_bgr):
    faces = engine.detect(astronaut_bgr)
    assert len(faces) == 1
    return faces[0].box


def regions(box, shape, scale=1.0):
    """(inner, outside): the middle of the face box, and everything outside the largest mask
    the engine can draw for a face at `box` (coordinates scaled by `scale`)."""
    x, y, w, h = (v * scale for v in box)
    inner = (slice(int(y + h * 0.2), int(y + h * 0.8)), slice(int(x + w * 0.2), int(x + w * 0.8)))
    height, width = shape[:2]
    x1, y1, x2, y2 = mask_region(Face(box=(x, y, w, h), score=1.0), MAX_MASK_SCALE, width, height)
    outside = np.ones((height, width), bool)
    outside[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = False
    return inner, outside


def assert_masked(out, ref, box, scale=1.0, rest_tol=3.0, face_min=25.0):
    """The face area changed strongly; everything outside the largest possible mask barely
    (`rest_tol` mean levels leaves room for lossy re-encoding)."""
    assert out.shape == ref.shape
    inner, outside = regions(box, ref.shape, scale)
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    assert diff[inner].mean() > face_min, diff[inner].mean()
    assert diff[outside].mean() < rest_tol, diff[outside].mean()


# --- broken inputs ---------------------------------------------------------------------------
def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb() -> bytes:
    """A valid-looking PNG header declaring 30000x30000 RGB; the pixels are never allocated."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def audio_only_mp4(path) -> None:
    rate = 44100
    with av.open(str(path), "w") as c:
        stream = c.add_stream("aac", rate=rate)
        t = np.arange(rate) / rate
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    with av.open(str(path)) as c:  # the file really is an audio-only MP4
        assert len(c.streams.audio) == 1 and not c.streams.video


def jpeg_bytes(bgr) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


BROKEN = ["empty.jpg", "truncated.jpg", "text.jpg", "bomb.png", "audio_only.mp4", "text.mp4",
          "empty.mp4", "missing.jpg", "missing.mp4"]


def make_broken(name, src_dir, astronaut_bgr):
    path = src_dir / name
    if name.startswith("empty"):
        path.write_bytes(b"")
    elif name == "truncated.jpg":
        data = jpeg_bytes(astronaut_bgr)
        path.write_bytes(data[: len(data) // 2])
    elif name.startswith("text"):
        path.write_text("This is a plain text file, not a picture or a video.\n" * 20)
    elif name == "bomb.png":
        path.write_bytes(png_bomb())
    elif name == "audio_only.mp4":
        audio_only_mp4(path)
    # missing.*: not created
    return path


@pytest.mark.parametrize("name", BROKEN)
def test_broken_input_fails_cleanly_and_leaves_nothing(name, dirs, astronaut_bgr):
    src_dir, out = dirs
    src = make_broken(name, src_dir, astronaut_bgr)
    r = run_cli("anonymize", src, "-o", out / f"result{src.suffix}")
    assert_one_line_error(r)
    assert sorted(p.name for p in out.iterdir()) == []


def test_png_bomb_is_well_formed_and_refused_for_its_size(dirs, monkeypatch):
    """The crafted file is a real PNG header (so the refusal is about size, not garbage)."""
    src_dir, out = dirs
    data = png_bomb()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(data)) as im:  # header only (CRCs checked): pixels not loaded
        assert im.format == "PNG" and im.size == (30000, 30000)
    (src_dir / "bomb.png").write_bytes(data)
    r = run_cli("anonymize", src_dir / "bomb.png", "-o", out / "x.png")
    assert_one_line_error(r)
    assert "large" in r.stderr
    assert list(out.iterdir()) == []


def test_image_over_the_memory_budget_is_refused_and_a_small_one_is_not(dirs, astronaut_bgr):
    """FACEFLOW_MEMORY_MB=400 leaves 84 MB for images: a 4000 x 4000 PNG needs 48 MB of
    pixels and up to twice that to encode, so it is refused before decoding; the 512 x 512
    astronaut is processed."""
    src_dir, out = dirs
    big = np.full((4000, 4000, 3), 128, np.uint8)
    big[1744:2256, 1744:2256] = astronaut_bgr
    cv2.imwrite(str(src_dir / "big.png"), big)
    small = src_dir / "small.jpg"
    small.write_bytes(jpeg_bytes(astronaut_bgr))
    env = {"FACEFLOW_MEMORY_MB": "400"}
    r = run_cli("anonymize", src_dir / "big.png", "-o", out / "big.png", env=env)
    assert_one_line_error(r)
    assert "4000x4000 PNG needs about 138 MB, 84 MB available" in r.stderr, r.stderr
    assert list(out.iterdir()) == []
    assert_ok(run_cli("anonymize", small, "-o", out / "small.jpg", env=env))
    assert (out / "small.jpg").exists()


def test_broken_input_with_output_folder_leaves_nothing(dirs, astronaut_bgr):
    """`-o FOLDER` for a broken file: still nothing written in the folder."""
    src_dir, out = dirs
    src = make_broken("truncated.jpg", src_dir, astronaut_bgr)
    r = run_cli("anonymize", src, "-o", out)
    assert_one_line_error(r)
    assert list(out.iterdir()) == []


# --- unusual but valid stills ----------------------------------------------------------------
def test_cmyk_jpeg(dirs, astronaut_bgr, face_box):
    src_dir, out = dirs
    src = src_dir / "cmyk.jpg"
    Image.fromarray(cv2.cvtColor(astronaut_bgr, cv2.COLOR_BGR2RGB)).convert("CMYK").save(src, quality=95)
    with Image.open(src) as im:
        assert im.mode == "CMYK"
    ref = cv2.imread(str(src), cv2.IMREAD_COLOR)
    assert np.abs(ref.astype(int) - astronaut_bgr).mean() < 8  # decodes to the same picture

    r = run_cli("anonymize", src, "-o", out / "cmyk.jpg")
    assert_ok(r)
    assert sorted(p.name for p in out.iterdir()) == ["cmyk.jpg"]
    with Image.open(out / "cmyk.jpg") as im:
        assert im.format == "JPEG"
    result = cv2.imread(str(out / "cmyk.jpg"), cv2.IMREAD_COLOR)
    assert_masked(result, ref, face_box)


def test_16bit_png_stays_16bit(dirs, astronaut_bgr, face_box):
    src_dir, out = dirs
    src = src_dir / "deep.png"
    deep = astronaut_bgr.astype(np.uint16) * 257
    assert cv2.imwrite(str(src), deep)
    r = run_cli("anonymize", src, "-o", out / "deep.png")
    assert_ok(r)
    assert sorted(p.name for p in out.iterdir()) == ["deep.png"]
    result = cv2.imread(str(out / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert result.dtype == np.uint16 and result.shape == deep.shape
    inner, outside = regions(face_box, deep.shape)
    assert np.array_equal(result[outside], deep[outside])  # PNG is lossless
    assert np.abs(result[inner].astype(np.float64) - deep[inner]).mean() > 25 * 257
    # Real 16-bit values come out, not 8-bit ones shifted up.
    assert np.any(result[inner] % 257 != 0)


def test_png_with_alpha_keeps_alpha_exactly(dirs, astronaut_bgr, face_box):
    src_dir, out = dirs
    src = src_dir / "alpha.png"
    h, w = astronaut_bgr.shape[:2]
    alpha = ((np.add.outer(np.arange(h), np.arange(w)) * 7) % 256).astype(np.uint8)
    bgra = np.dstack([astronaut_bgr, alpha])
    assert cv2.imwrite(str(src), bgra)
    r = run_cli("anonymize", src, "-o", out / "alpha.png")
    assert_ok(r)
    result = cv2.imread(str(out / "alpha.png"), cv2.IMREAD_UNCHANGED)
    assert result.shape == (h, w, 4) and result.dtype == np.uint8
    assert np.array_equal(result[..., 3], alpha)
    assert_masked(result[..., :3], astronaut_bgr, face_box, rest_tol=1e-9)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_grayscale(ext, dirs, astronaut_bgr, engine):
    src_dir, out = dirs
    src = src_dir / f"gray{ext}"
    gray = cv2.cvtColor(astronaut_bgr, cv2.COLOR_BGR2GRAY)
    assert cv2.imwrite(str(src), gray)
    ref = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    assert ref.ndim == 2
    faces = engine.detect(cv2.cvtColor(ref, cv2.COLOR_GRAY2BGR))
    assert len(faces) == 1

    r = run_cli("anonymize", src, "-o", out / f"gray{ext}")
    assert_ok(r)
    assert sorted(p.name for p in out.iterdir()) == [f"gray{ext}"]
    result = cv2.imread(str(out / f"gray{ext}"), cv2.IMREAD_UNCHANGED)
    assert result is not None
    if ext == ".png":
        assert result.ndim == 2 and result.dtype == np.uint8
        assert_masked(result, ref, faces[0].box, rest_tol=1e-9)
    else:
        if result.ndim == 3:
            result = cv2.cvtColor(result, cv2.COLOR_BGR2GRAY)
        assert_masked(result, ref, faces[0].box)


# --- video without audio ---------------------------------------------------------------------
def make_silent_video(path, astronaut_bgr, frames=50, fps=25):
    base = cv2.resize(astronaut_bgr[:384], (320, 240), interpolation=cv2.INTER_AREA)
    written = []
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(frames):
            img = np.roll(base, i // 5, axis=1)  # a slow pan: frames differ
            written.append(img)
            frame = av.VideoFrame.from_ndarray(img, format="bgr24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return written


def decode_frames(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def test_video_without_audio(dirs, astronaut_bgr, engine):
    src_dir, out = dirs
    src = src_dir / "silent.mp4"
    make_silent_video(src, astronaut_bgr)
    with av.open(str(src)) as c:
        assert not c.streams.audio and len(c.streams.video) == 1
    before = decode_frames(src)
    assert len(before) == 50

    r = run_cli("anonymize", src, "-o", out / "silent.mp4")
    assert_ok(r)
    assert sorted(p.name for p in out.iterdir()) == ["silent.mp4"]
    with av.open(str(out / "silent.mp4")) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 0
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (320, 240)
    after = decode_frames(out / "silent.mp4")
    assert len(after) == len(before)
    for i in (0, 25, 49):
        faces = engine.detect(before[i])
        assert len(faces) == 1, i
        assert_masked(after[i], before[i], faces[0].box, rest_tol=4.0)


# --- analyze ---------------------------------------------------------------------------------
def test_analyze_reports_bad_file_and_still_does_good_ones(dirs, astronaut_bgr):
    src_dir, _ = dirs
    good1, bad, good2 = src_dir / "a.jpg", src_dir / "bad.jpg", src_dir / "b.png"
    cv2.imwrite(str(good1), astronaut_bgr)
    bad.write_text("not a photo")
    cv2.imwrite(str(good2), astronaut_bgr[:, ::-1])
    r = run_cli("analyze", good1, bad, good2)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "bad.jpg" in r.stderr
    records = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [rec["source"] for rec in records] == [str(good1), str(bad), str(good2)]
    assert "error" in records[1] and records[1]["error"]
    for rec in (records[0], records[2]):
        assert "error" not in rec
        assert rec["width"] == 512 and rec["height"] == 512 and len(rec["faces"]) == 1
