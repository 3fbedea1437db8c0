"""Still images through the engine API: orientation, metadata, formats, untouched pixels,
size-independent strength, batched detection."""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps, ImageSequence, PngImagePlugin

from faceflow.anonymize import MaskOptions, mask_region
from faceflow.face import Face, iou

XMP = (b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
       b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="SecretCamera"/>'
       b'</rdf:RDF></x:xmpmeta><?xpacket end="w"?>')
COMMENT = b"faceflow-secret-comment"
GPS_IFD = 0x8825


def rgb(bgr):
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def bgr_of(pil_image):
    return cv2.cvtColor(np.asarray(pil_image.convert("RGB")), cv2.COLOR_RGB2BGR)


def one_face(faces):
    assert len(faces) == 1, faces
    return faces[0]


def face_box_inner(box, shrink=0.2):
    x, y, w, h = box
    return (slice(int(y + h * shrink), int(y + h * (1 - shrink))),
            slice(int(x + w * shrink), int(x + w * (1 - shrink))))


def laplacian_var(bgr):
    return cv2.Laplacian(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()


# --- EXIF orientation ------------------------------------------------------------------------
def test_exif_orientation_is_honoured(engine, astronaut_bgr, tmp_path):
    upright = np.ascontiguousarray(astronaut_bgr[:, :400])  # not square: 400 wide, 512 high
    stored = np.ascontiguousarray(np.rot90(upright, 1))      # turned 90 deg anticlockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    src = tmp_path / "sideways.jpg"
    Image.fromarray(rgb(stored)).save(src, quality=95, exif=exif)
    with Image.open(src) as im:
        assert im.size == (512, 400)
        shown = bgr_of(ImageOps.exif_transpose(im))
    assert shown.shape == upright.shape
    assert np.abs(shown.astype(int) - upright).mean() < 4  # Orientation 6 makes it upright

    record = engine.analyze_file(src)
    assert (record["width"], record["height"]) == (400, 512)
    expected = one_face(engine.detect(upright))
    found = one_face([Face.from_dict(f) for f in record["faces"]])
    assert iou(found.box, expected.box) >= 0.7, (found.box, expected.box)
    # Not the face the sideways pixels as stored would give (the test tells the two apart).
    assert all(iou(found.box, f.box) < 0.3 for f in engine.detect(stored))


def test_png_orientation_is_read_from_its_exif_chunk_without_decoding(astronaut_bgr, monkeypatch):
    """The header check must not decode: Pillow's getexif() on a PNG loads every pixel to look
    for an eXIf chunk after the image data (400 MB for a 10000 x 10000 RGBA)."""
    from faceflow import images
    upright = np.ascontiguousarray(astronaut_bgr[:, :400])
    stored = np.ascontiguousarray(np.rot90(upright, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(rgb(stored)).save(out, "PNG", exif=exif)
    # move the eXIf chunk after the image data, where PNG allows it too
    chunks, pos, data = [], 8, out.getvalue()
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    exif_chunk = next(c for c in chunks if c[4:8] == b"eXIf")
    chunks.remove(exif_chunk)
    late = data[:8] + b"".join(chunks[:-1]) + exif_chunk + chunks[-1]
    plain = io.BytesIO()
    Image.fromarray(rgb(stored)).save(plain, "PNG")

    def no_decoding(self):
        raise AssertionError("the header check decoded the image")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert images.header(plain.getvalue()).orientation == 1
    head = images.header(late)
    assert (head.format, head.width, head.height, head.orientation) == ("PNG", 512, 400, 6)
    monkeypatch.undo()
    assert np.array_equal(images.decode(late).pixels, upright)


# --- metadata --------------------------------------------------------------------------------
def exif_with_gps() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "SecretMaker"   # Make
    exif[0x0110] = "SecretModel"   # Model
    gps = exif.get_ifd(GPS_IFD)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 29.0)
    gps[3] = "E"
    gps[4] = (2.0, 17.0, 40.0)
    return exif


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        length, = struct.unpack(">I", data[pos:pos + 4])
        kinds.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return kinds


def webp_chunks(data: bytes) -> list[bytes]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    pos, kinds = 12, []
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        kinds.append(kind)
        pos += 8 + size + (size & 1)
    return kinds


def assert_no_metadata(data: bytes):
    for marker in (b"Exif", b"EXIF", b"http://ns.adobe.com/xap", b"ICC_PROFILE", b"SecretMaker",
                   b"SecretModel", b"SecretCamera", COMMENT, b"gps-secret"):
        assert marker not in data, marker
    with Image.open(io.BytesIO(data)) as im:
        exif = im.getexif()
        assert len(exif) == 0
        assert not exif.get_ifd(GPS_IFD)
        assert not im.info.get("icc_profile")
        assert not im.info.get("exif")
        assert not im.info.get("xmp")
        assert not im.info.get("comment")


def test_jpeg_metadata_is_stripped(engine, astronaut_bgr, tmp_path):
    src, dst = tmp_path / "meta.jpg", tmp_path / "out.jpg"
    Image.fromarray(rgb(astronaut_bgr)).save(src, quality=92, exif=exif_with_gps(), xmp=XMP,
                                             comment=COMMENT, icc_profile=srgb_icc())
    data = src.read_bytes()
    for marker in (b"Exif", b"http://ns.adobe.com/xap", b"ICC_PROFILE", COMMENT):
        assert marker in data, marker  # the input really carries it
    with Image.open(src) as im:
        assert im.getexif().get_ifd(GPS_IFD)[1] == "N"

    report = engine.anonymize_file(src, dst)
    assert len(report["faces"]) == 1
    out = dst.read_bytes()
    assert out[:3] == b"\xff\xd8\xff"
    assert_no_metadata(out)
    # No APP1 (EXIF/XMP), APP2 (ICC) or COM segment before the image data.
    markers, pos = [], 2
    while pos < len(out) and out[pos] == 0xFF and out[pos + 1] != 0xDA:
        markers.append(out[pos + 1])
        pos += 2 + int.from_bytes(out[pos + 2:pos + 4], "big")
    assert not {0xE1, 0xE2, 0xFE} & set(markers), [hex(m) for m in markers]


def test_png_metadata_is_stripped(engine, astronaut_bgr, tmp_path):
    src, dst = tmp_path / "meta.png", tmp_path / "out.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", COMMENT.decode())
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    info.add_text("Location", "gps-secret 48.85N 2.29E", zip=True)
    Image.fromarray(rgb(astronaut_bgr)).save(src, pnginfo=info, exif=exif_with_gps(),
                                             icc_profile=srgb_icc())
    kinds = png_chunks(src.read_bytes())
    assert {b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP"} <= set(kinds), kinds

    report = engine.anonymize_file(src, dst)
    assert len(report["faces"]) == 1
    out = dst.read_bytes()
    kinds = png_chunks(out)
    assert not {b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP", b"sRGB", b"tIME"} & set(kinds), kinds
    assert_no_metadata(out)


def test_webp_metadata_is_stripped(engine, astronaut_bgr, tmp_path):
    src, dst = tmp_path / "meta.webp", tmp_path / "out.webp"
    Image.fromarray(rgb(astronaut_bgr)).save(src, quality=90, exif=exif_with_gps(), xmp=XMP,
                                             icc_profile=srgb_icc())
    kinds = webp_chunks(src.read_bytes())
    assert {b"EXIF", b"XMP ", b"ICCP"} <= set(kinds), kinds

    report = engine.anonymize_file(src, dst)
    assert len(report["faces"]) == 1
    out = dst.read_bytes()
    kinds = webp_chunks(out)
    assert not {b"EXIF", b"XMP ", b"ICCP"} & set(kinds), kinds
    assert_no_metadata(out)


# --- formats ---------------------------------------------------------------------------------
MAGIC = {"png": (0, b"\x89PNG\r\n\x1a\n"), "jpg": (0, b"\xff\xd8\xff"), "webp": (8, b"WEBP")}


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_format_is_kept(ext, engine, astronaut_bgr, tmp_path):
    src, dst = tmp_path / f"in.{ext}", tmp_path / f"out.{ext}"
    assert cv2.imwrite(str(src), astronaut_bgr)
    report = engine.anonymize_file(src, dst)
    offset, magic = MAGIC[ext]
    data = dst.read_bytes()
    assert data[offset:offset + len(magic)] == magic
    assert report["format"] == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
    out = cv2.imread(str(dst))
    assert out.shape == astronaut_bgr.shape
    inner = face_box_inner(report["faces"][0]["box"])
    assert np.abs(out[inner].astype(int) - astronaut_bgr[inner]).mean() > 25


def test_animated_gif_stays_animated_and_every_frame_is_masked(engine, astronaut_bgr, tmp_path):
    variants = [astronaut_bgr, np.ascontiguousarray(astronaut_bgr[:, ::-1]),
                np.roll(astronaut_bgr, 60, axis=1)]
    durations = [80, 200, 500]
    src, dst = tmp_path / "anim.gif", tmp_path / "out.gif"
    frames = [Image.fromarray(rgb(v)) for v in variants]
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    with Image.open(src) as im:
        before = [bgr_of(f) for f in ImageSequence.Iterator(im)]
    assert len(before) == 3

    report = engine.anonymize_file(src, dst)
    assert dst.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    assert report["format"] == "GIF"
    assert [f["frame"] for f in report["frames"]] == [0, 1, 2]
    with Image.open(dst) as im:
        assert im.is_animated and im.n_frames == 3
        after, got_durations = [], []
        for f in ImageSequence.Iterator(im):
            after.append(bgr_of(f))
            got_durations.append(f.info["duration"])
    assert got_durations == durations
    for i, (a, b) in enumerate(zip(before, after)):
        faces = report["frames"][i]["faces"]
        assert len(faces) == 1, i
        expected = one_face(engine.detect(a))
        assert iou(faces[0]["box"], expected.box) > 0.7
        inner = face_box_inner(faces[0]["box"])
        assert np.abs(b[inner].astype(int) - a[inner]).mean() > 25, i
        # Away from the face the frame is the same picture (palette noise only).
        assert np.abs(b[-150:].astype(int) - a[-150:]).mean() < 8, i


# --- only the masks change -------------------------------------------------------------------
def test_pixels_outside_masks_are_unchanged(engine, astronaut_bgr, tmp_path):
    # Two faces (a mirrored copy side by side) so the union of masks matters.
    pic = np.hstack([astronaut_bgr, astronaut_bgr[:, ::-1]])
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    assert cv2.imwrite(str(src), pic)
    report = engine.anonymize_file(src, dst)
    out = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
    assert out.shape == pic.shape
    faces = [Face.from_dict(f) for f in report["faces"]]
    assert len(faces) == 2
    h, w = pic.shape[:2]
    # The engine's verify pass re-masks a face the detector still sees with stronger options
    # (up to 3 rounds, each growing mask_scale by 0.2), so a mask may reach the default scale
    # + 0.6. Every pixel outside the union of those largest possible regions must be identical.
    scale = MaskOptions().mask_scale + 0.6
    outside = np.ones((h, w), bool)
    for face in faces:
        x1, y1, x2, y2 = mask_region(face, scale, w, h)
        outside[y1:y2, x1:x2] = False
        inner = face_box_inner(face.box)
        assert np.abs(out[inner].astype(int) - pic[inner]).mean() > 25
    assert outside.mean() > 0.8
    assert np.array_equal(out[outside], pic[outside])


# --- strength relative to the face -----------------------------------------------------------
def test_strength_scales_with_face_size(engine, astronaut_bgr):
    def masked(img):
        ok, buf = cv2.imencode(".png", img)
        # verify=False: compare the masking itself, not how many verify rounds each size took.
        result = engine.anonymize_bytes(buf.tobytes(), MaskOptions(), verify=False)
        return cv2.imdecode(np.frombuffer(result.data, np.uint8), cv2.IMREAD_COLOR), result.report

    native, native_report = masked(astronaut_bgr)
    big_in = cv2.resize(astronaut_bgr, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    big, big_report = masked(big_in)
    assert len(native_report["faces"]) == len(big_report["faces"]) == 1
    box = native_report["faces"][0]["box"]
    assert iou([v / 4 for v in big_report["faces"][0]["box"]], box) > 0.8

    back = cv2.resize(big, astronaut_bgr.shape[1::-1], interpolation=cv2.INTER_AREA)
    inner = face_box_inner(box)
    assert np.abs(back[inner].astype(int) - native[inner]).mean() < 10
    original = laplacian_var(astronaut_bgr[inner])
    assert laplacian_var(native[inner]) < original * 0.02
    assert laplacian_var(back[inner]) < original * 0.02


# --- batched detection -----------------------------------------------------------------------
def test_detect_batch_equals_single_detections(engine, astronaut_bgr):
    img = astronaut_bgr
    img2 = np.ascontiguousarray(cv2.resize(astronaut_bgr[100:400, 50:350], img.shape[1::-1])[:, ::-1])
    batch = engine.detect_batch([img, img2])
    single = [engine.detect(img), engine.detect(img2)]
    assert len(batch) == 2
    for got, want in zip(batch, single):
        assert len(got) == len(want) >= 1
        for a, b in zip(sorted(got, key=lambda f: f.box), sorted(want, key=lambda f: f.box)):
            assert np.allclose(a.box, b.box, atol=1.0), (a.box, b.box)
            assert abs(a.score - b.score) < 0.01
            if b.landmarks is not None:
                assert np.allclose(a.landmarks, b.landmarks, atol=1.0)
    # The two images give different faces: results are not mixed up between the slots.
    assert not np.allclose(batch[0][0].box, batch[1][0].box, atol=5)


@pytest.mark.data
@pytest.mark.parametrize("name", ["pyfeat_multi_face.jpg", "ultralytics_bus.jpg"])
def test_analysis_of_a_large_photo_from_a_reduced_decode_finds_the_same_faces(name, engine):
    """analyze decodes a large JPEG at 1/2 to 1/8 (the detector sees 640 px anyway): the faces,
    in full-size pixels, are those found on the full decode."""
    from conftest import data_path
    from faceflow import images
    photo = cv2.imread(str(data_path("images", name)))
    scale = 4000 / photo.shape[1]
    large = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", large, [cv2.IMWRITE_JPEG_QUALITY, 92])
    data = buf.tobytes()
    assert images.reduction_for(images.header(data), 2 * engine.detector.max_side) >= 2
    full = engine.detect(images.decode(data).pixels)
    record = engine.analyze_bytes(data)
    assert (record["width"], record["height"]) == (large.shape[1], large.shape[0])
    assert len(record["faces"]) == len(full) >= 2
    for face in full:
        assert max(iou(face.box, found["box"]) for found in record["faces"]) > 0.85


def test_an_atomically_written_output_gets_the_mode_of_any_new_file(tmp_path):
    """The temporary file an output is written through is private; the output must not be."""
    import os
    from faceflow.images import atomic_write
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.jpg", b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "out.jpg").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.jpg"]
