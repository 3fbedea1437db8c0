"""The synthetic mark: XMP with IPTC DigitalSourceType in every photo format that holds XMP,
read back by Pillow, by a plain XML parse of the file's XMP (as exiftool-style readers do) and
by exiftool itself where it is installed; pixels untouched by the marking; anonymised output
and unmarked encodes carry no metadata."""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
from PIL import Image

from faceflow import images, synthetic

from conftest import in_ci

MARKS = [synthetic.COMPOSITE_SYNTHETIC, synthetic.TRAINED_ALGORITHMIC_MEDIA]
DST = "{%s}DigitalSourceType" % synthetic.IPTC_EXT_NAMESPACE


def _picture(channels: int = 3, dtype=np.uint8, size=(67, 45)) -> images.Picture:
    rng = np.random.default_rng(7)
    top = 65535 if dtype == np.uint16 else 255
    shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
    return images.Picture(pixels=rng.integers(0, top, shape).astype(dtype), format="PNG")


def _source_type_from_xmp(xmp: bytes) -> str | None:
    """The DigitalSourceType of an XMP packet, parsed as XML (no Pillow involved)."""
    body = xmp[xmp.index(b"<x:xmpmeta"):xmp.index(b"</x:xmpmeta>") + len(b"</x:xmpmeta>")]
    for element in ET.fromstring(body).iter():
        if DST in element.attrib:
            return element.attrib[DST]
    return None


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGBA"))


@pytest.mark.parametrize("mark", MARKS)
@pytest.mark.parametrize("fmt,channels", [("JPEG", 3), ("JPEG", 1), ("PNG", 3), ("PNG", 4), ("PNG", 1),
                                          ("WEBP", 3), ("WEBP", 4), ("HEIF", 3), ("AVIF", 3)])
def test_marked_photos_carry_xmp_readable_by_pillow_with_the_same_pixels(fmt, channels, mark):
    if not images.can_write(fmt):
        pytest.skip(f"this installation cannot encode {fmt}")
    picture = _picture(channels)
    plain = images.encode(picture, fmt)
    marked = images.encode(picture, fmt, synthetic_mark=mark)
    with Image.open(io.BytesIO(marked)) as im:
        assert im.format == ("HEIF" if fmt == "HEIF" else fmt)
        xmp = im.info.get("xmp")
        assert xmp, f"no XMP in the marked {fmt}"
        xmp = xmp if isinstance(xmp, bytes) else xmp.encode()
        assert _source_type_from_xmp(xmp) == mark
        pytest.importorskip("defusedxml", reason="Image.getxmp() needs defusedxml (the test extra)")
        description = im.getxmp()["xmpmeta"]["RDF"]["Description"]
        assert description["DigitalSourceType"] == mark
    if fmt in ("JPEG", "PNG", "WEBP"):  # spliced into the encoded file: the same pixel bytes
        assert np.array_equal(_decoded(plain), _decoded(marked))
    with Image.open(io.BytesIO(plain)) as im:
        assert not im.info.get("xmp"), f"an unmarked {fmt} must carry no XMP"


def test_a_gif_cannot_carry_xmp_through_pillow_and_gets_the_statement_as_its_comment():
    picture = _picture(3)
    marked = images.encode(picture, "GIF", synthetic_mark=synthetic.COMPOSITE_SYNTHETIC)
    with Image.open(io.BytesIO(marked)) as im:
        assert synthetic.COMPOSITE_SYNTHETIC in im.info["comment"].decode()
    with Image.open(io.BytesIO(images.encode(picture, "GIF"))) as im:
        assert "comment" not in im.info


def test_xmp_is_where_readers_look_for_it():
    """JPEG: an APP1 segment with Adobe's XMP header right after JFIF; PNG: an iTXt chunk
    `XML:com.adobe.xmp` before IDAT with a valid CRC (Pillow checks it); WebP: an extended
    file whose VP8X flags say XMP and whose canvas is the picture's size."""
    picture = _picture(3)
    jpeg = images.encode(picture, "JPEG", synthetic_mark=synthetic.COMPOSITE_SYNTHETIC)
    assert jpeg[:2] == b"\xff\xd8" and jpeg[2:4] == b"\xff\xe0"
    app1 = jpeg.index(b"\xff\xe1")
    assert jpeg[app1 + 4:app1 + 4 + len(synthetic.XMP_JPEG_HEADER)] == synthetic.XMP_JPEG_HEADER
    png = images.encode(picture, "PNG", synthetic_mark=synthetic.COMPOSITE_SYNTHETIC)
    assert png.index(b"iTXtXML:com.adobe.xmp") < png.index(b"IDAT")
    with Image.open(io.BytesIO(png)) as im:
        im.load()  # verifies chunk CRCs
    webp = images.encode(picture, "WEBP", synthetic_mark=synthetic.COMPOSITE_SYNTHETIC)
    assert webp[12:16] == b"VP8X" and webp[20] & 0x04
    width = int.from_bytes(webp[24:27], "little") + 1
    height = int.from_bytes(webp[27:30], "little") + 1
    assert (width, height) == (67, 45)
    assert int.from_bytes(webp[4:8], "little") == len(webp) - 8


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exiftool_reads_the_digital_source_type(tmp_path, fmt):
    exiftool = shutil.which("exiftool")
    if exiftool is None:
        if in_ci():  # .ci/run installs it
            pytest.fail("exiftool not installed (Debian: libimage-exiftool-perl)", pytrace=False)
        pytest.skip("exiftool not installed (Debian: libimage-exiftool-perl)")
    path = tmp_path / f"marked{images.FORMATS[fmt]}"
    path.write_bytes(images.encode(_picture(3), fmt, synthetic_mark=synthetic.TRAINED_ALGORITHMIC_MEDIA))
    out = subprocess.run([exiftool, "-s", "-XMP-iptcExt:DigitalSourceType", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"DigitalSourceType\s*:\s*" + re.escape(synthetic.TRAINED_ALGORITHMIC_MEDIA), out), out


def test_anonymised_output_stays_metadata_free(engine, astronaut_bgr):
    ok, jpeg = cv2.imencode(".jpg", astronaut_bgr)
    for fmt in ("JPEG", "PNG", "WEBP"):
        result = engine.anonymize_bytes(jpeg.tobytes(), out_format=fmt)
        with Image.open(io.BytesIO(result.data)) as im:
            assert not im.info.get("xmp") and not im.info.get("exif"), fmt
        assert b"DigitalSourceType" not in result.data
