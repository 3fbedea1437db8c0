"""Reading and writing still images safely.

Reading checks the header before decoding (type, pixel count), honours EXIF orientation and
refuses truncated files. Writing re-encodes pixels only (no EXIF, XMP, GPS, ICC or text
chunks survive) into a temporary name beside the target, then renames it.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from . import media

MAX_PIXELS = int(os.environ.get("FACEFLOW_MAX_PIXELS", 100_000_000))
MAX_BYTES = int(os.environ.get("FACEFLOW_MAX_IMAGE_BYTES", 200 * 1024 * 1024))
FORMATS = {fmt: ext for fmt, (ext, _) in media.IMAGE_FORMATS.items()}
EXTENSION_FORMAT = media.IMAGE_EXTENSIONS
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own guard, in case a caller opens lazily


class BadInput(ValueError):
    """The input cannot be processed; the message is one line meant for the user."""


@dataclass
class Picture:
    """A decoded still: `pixels` as stored (gray, BGR or BGRA; 8 or 16 bit), upright.

    `frames` holds every frame of an animated GIF (BGR), with `durations` in ms."""
    pixels: np.ndarray
    format: str
    frames: list[np.ndarray] | None = None
    durations: list[int] | None = None
    loop: int = 0

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def to_bgr8(pixels: np.ndarray) -> np.ndarray:
    """An 8-bit BGR view for detectors, whatever the stored depth and channels."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise BadInput(f"unsupported pixel type {pixels.dtype}")
    if pixels.ndim == 2:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if pixels.shape[2] == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2BGR)
    return pixels


def sniff(data: bytes) -> tuple[str, int, int, int]:
    """(format, width, height, exif orientation) from the header, without decoding pixels."""
    if not data:
        raise BadInput("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "WEBP", "PNG") else 1
    except Image.DecompressionBombError:
        raise BadInput(f"image too large (over {MAX_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise BadInput("not an image (or a format faceflow does not read: JPEG, PNG, WebP, GIF)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"unreadable image header: {exc}") from None
    if fmt not in FORMATS:
        raise BadInput(f"unsupported image format {fmt}; faceflow reads JPEG, PNG, WebP and GIF")
    if w * h > MAX_PIXELS:
        raise BadInput(f"image too large: {w}x{h} is over the {MAX_PIXELS} pixel limit")
    return fmt, w, h, orientation


def _check_complete(data: bytes, fmt: str) -> None:
    if fmt == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        raise BadInput("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        raise BadInput("truncated PNG (no IEND chunk)")
    if fmt == "WEBP" and len(data) < int.from_bytes(data[4:8], "little") + 8:
        raise BadInput("truncated WebP")


def decode(data: bytes, reduce: int = 1) -> Picture:
    if len(data) > MAX_BYTES:
        raise BadInput(f"file too large ({len(data)} bytes, limit {MAX_BYTES})")
    fmt, w, h, orientation = sniff(data)
    _check_complete(data, fmt)
    if fmt == "GIF":
        return _decode_gif(data)
    buf = np.frombuffer(data, np.uint8)
    with Image.open(io.BytesIO(data)) as im:
        plain = im.mode in ("RGB", "CMYK", "YCbCr") and fmt == "JPEG"
    if plain:
        # cv2 applies EXIF orientation itself with IMREAD_COLOR and converts CMYK.
        flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}[reduce]
        pixels = cv2.imdecode(buf, flag)
    else:
        pixels = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if pixels is not None:
            pixels = _orient(pixels, orientation)
    if pixels is None:
        raise BadInput(f"could not decode {fmt} data (corrupt file?)")
    return Picture(pixels=pixels, format=fmt)


_ORIENT = {2: [cv2.ROTATE_180, "v"], 3: [cv2.ROTATE_180], 4: ["v"], 5: [cv2.ROTATE_90_CLOCKWISE, "h"],
           6: [cv2.ROTATE_90_CLOCKWISE], 7: [cv2.ROTATE_90_COUNTERCLOCKWISE, "h"],
           8: [cv2.ROTATE_90_COUNTERCLOCKWISE]}


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    for step in _ORIENT.get(orientation, []):
        if step == "v":
            pixels = cv2.flip(pixels, 0)
        elif step == "h":
            pixels = cv2.flip(pixels, 1)
        else:
            pixels = cv2.rotate(pixels, step)
    return pixels


def _decode_gif(data: bytes) -> Picture:
    frames, durations = [], []
    try:
        with Image.open(io.BytesIO(data)) as im:
            loop = im.info.get("loop", 0)
            for frame in ImageSequence.Iterator(im):
                frames.append(cv2.cvtColor(np.asarray(frame.convert("RGB")), cv2.COLOR_RGB2BGR))
                durations.append(int(frame.info.get("duration", 100)))
    except (OSError, ValueError) as exc:
        raise BadInput(f"corrupt GIF: {exc}") from None
    if not frames:
        raise BadInput("GIF has no frames")
    return Picture(pixels=frames[0], format="GIF", frames=frames, durations=durations, loop=loop)


def read(path: Path | str, reduce: int = 1) -> Picture:
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise BadInput(f"{path} is a directory") from None
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from None
    return decode(data, reduce)


def encode(picture: Picture, fmt: str | None = None, quality: int = 92) -> bytes:
    """Pixels only: the encoders below add no EXIF, XMP, GPS, ICC or text metadata."""
    fmt = (fmt or picture.format).upper()
    if fmt == "GIF":
        frames = picture.frames or [picture.pixels]
        pil = [Image.fromarray(cv2.cvtColor(to_bgr8(f), cv2.COLOR_BGR2RGB)) for f in frames]
        durations = picture.durations or [100] * len(pil)
        out = io.BytesIO()
        # Pillow takes a list of durations only with save_all: one frame gets its number
        pil[0].save(out, "GIF", save_all=len(pil) > 1, append_images=pil[1:],
                    duration=durations if len(pil) > 1 else durations[0], loop=picture.loop, optimize=False)
        return out.getvalue()
    pixels = picture.pixels
    if fmt == "JPEG":
        if pixels.dtype != np.uint8 or (pixels.ndim == 3 and pixels.shape[2] == 4):
            pixels = to_bgr8(pixels)  # JPEG holds neither 16 bits nor alpha
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    elif fmt == "PNG":
        ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    elif fmt == "WEBP":
        if pixels.dtype != np.uint8:
            pixels = (pixels >> 8).astype(np.uint8)
        ok, buf = cv2.imencode(".webp", pixels, [cv2.IMWRITE_WEBP_QUALITY, quality])
    else:
        raise BadInput(f"cannot write format {fmt}")
    if not ok:
        raise BadInput(f"could not encode {fmt}")
    return buf.tobytes()


def atomic_write(path: Path | str, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_for(path: Path | str, default: str) -> str:
    return EXTENSION_FORMAT.get(Path(path).suffix.lower(), default)
