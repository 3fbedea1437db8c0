"""Reading and writing still images safely.

Reading checks the header before decoding (type, pixel count, and the memory that decoding and
processing will take against a budget), honours EXIF orientation and refuses truncated files.
Writing re-encodes pixels only (no EXIF, XMP, GPS, ICC or text chunks survive; a face swap's
output alone gets its synthetic mark, faceflow.synthetic) into a temporary name beside the
target, then renames it. HEIC/HEIF (pillow-heif) and AVIF (Pillow) are read
through Pillow; the others through OpenCV.
"""
from __future__ import annotations

import io
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pillow_heif
from PIL import Image, ImageSequence, UnidentifiedImageError, features

from . import media, synthetic

MAX_PIXELS = int(os.environ.get("FACEFLOW_MAX_PIXELS", 100_000_000))
MAX_BYTES = int(os.environ.get("FACEFLOW_MAX_IMAGE_BYTES", 200 * 1024 * 1024))
FORMATS = {fmt: ext for fmt, (ext, _) in media.IMAGE_FORMATS.items()}
EXTENSION_FORMAT = media.IMAGE_EXTENSIONS
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own guard, in case a caller opens lazily
READABLE = "JPEG, PNG, WebP, GIF, HEIC/HEIF and AVIF"

# HEIC/HEIF through pillow-heif; only the primary image is wanted (thumbnails, depth maps and
# auxiliary images are dropped like other metadata, so they are not even decoded).
pillow_heif.options.THUMBNAILS = False
pillow_heif.options.DEPTH_IMAGES = False
pillow_heif.options.AUX_IMAGES = False
# HEIC is written as a grid of 512 px tiles, as phones write it: x265 then holds one tile, not
# the whole picture (48 megapixels: 130 MB instead of 800 MB beside the pixels).
pillow_heif.options.GRID_TILE_SIZE = 512
pillow_heif.register_heif_opener()
# Formats decoded and encoded through Pillow rather than OpenCV.
PIL_FORMATS = ("HEIF", "AVIF")

# Memory: what the process holds besides the image (interpreter, onnxruntime and the model:
# about 90 MB measured, plus the functions' AWS libraries) and the share of the rest kept free
# for what the estimate below does not see (allocator slack, the request and its response).
RESERVED_BYTES = 256 * 1024 * 1024
MEMORY_MARGIN = 0.15
MiB = 1024 * 1024


class BadInput(ValueError):
    """The input cannot be processed; the message is one line meant for the user."""


class TooLarge(BadInput):
    """The input is valid but too large to process here (size, pixels or memory)."""


@dataclass
class Picture:
    """A decoded still: `pixels` as stored (gray, BGR or BGRA; 8 or 16 bit), upright.

    `frames` holds every frame of an animated GIF (BGR), with `durations` in ms."""
    pixels: np.ndarray
    format: str
    frames: list[np.ndarray] | None = None
    durations: list[int] | None = None
    loop: int = 0
    # > 1: `pixels` is a reduced decode of about 1/scale the image's `size` (for detection only)
    scale: int = 1
    size: tuple[int, int] | None = None  # (width, height) of the image when reduced

    @property
    def height(self) -> int:
        return self.size[1] if self.size else self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.size[0] if self.size else self.pixels.shape[1]


def to_bgr8(pixels: np.ndarray) -> np.ndarray:
    """An 8-bit BGR image for detectors, whatever the stored depth and channels: the pixels
    themselves when they are 8-bit BGR, else one new array, filled a band of rows at a time so
    that no other full-size temporary is made (a 16-bit image is 2-3x its 8-bit BGR size)."""
    if pixels.dtype not in (np.uint8, np.uint16):
        raise BadInput(f"unsupported pixel type {pixels.dtype}")
    if pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels
    height, width = pixels.shape[:2]
    out = np.empty((height, width, 3), np.uint8)
    band = max(1, (1 << 22) // max(1, pixels[0].nbytes))  # about 4 MB of input a band
    for top in range(0, height, band):
        rows = pixels[top:top + band]
        if rows.dtype == np.uint16:
            rows = (rows >> 8).astype(np.uint8)
        if rows.ndim == 2:
            cv2.cvtColor(rows, cv2.COLOR_GRAY2BGR, dst=out[top:top + band])
        elif rows.shape[2] == 4:
            cv2.cvtColor(rows, cv2.COLOR_BGRA2BGR, dst=out[top:top + band])
        else:
            out[top:top + band] = rows
    return out


@dataclass(frozen=True)
class Header:
    """What the file's header says, before any pixel is decoded."""
    format: str
    width: int
    height: int
    orientation: int = 1  # EXIF orientation still to apply (1: upright as stored)
    channels: int = 3     # channels as decoded: 1 gray, 3 BGR, 4 BGRA
    sample_bytes: int = 1  # 2 for 16-bit PNG
    frames: int = 1       # GIF frames


def _png_layout(data: bytes) -> tuple[int, int]:
    """(channels as OpenCV decodes them, bytes per sample) from the IHDR chunk."""
    depth, color_type = data[24], data[25]
    # gray, -, RGB, palette (BGR, or BGRA with a tRNS chunk: counted as 4), gray+alpha (BGRA), RGBA
    channels = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}.get(color_type, 4)
    return channels, 2 if depth == 16 else 1


def _png_orientation(data: bytes) -> int:
    """EXIF orientation from a PNG's eXIf chunk, found by walking the chunk headers: Pillow's
    getexif() decodes the whole image to look past IDAT for it."""
    at = 8
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        if kind == b"eXIf":
            exif = Image.Exif()
            try:
                exif.load(data[at + 8:at + 8 + length])
            except (OSError, ValueError, SyntaxError, struct.error):
                return 1
            return exif.get(0x0112, 1)
        if kind == b"IEND":
            break
        at += 12 + length
    return 1


def header(data: bytes) -> Header:
    """The format, size and layout from the header, without decoding pixels. Works on a
    prefix of the file too (enough to hold the header)."""
    if not data:
        raise BadInput("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h), mode = im.format, im.size, im.mode
            if fmt == "PNG":
                orientation = _png_orientation(data)
            elif fmt in ("JPEG", "WEBP", "AVIF"):
                orientation = im.getexif().get(0x0112, 1)
            else:
                orientation = 1
            # HEIF: pillow-heif applies the file's rotation (irot/imir, which a phone writes from
            # its EXIF orientation) itself and reports orientation 1.
            frames = getattr(im, "n_frames", 1) if fmt == "GIF" else 1
    except Image.DecompressionBombError:
        raise TooLarge(f"image too large (over {MAX_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise BadInput(f"not an image (or a format faceflow does not read: {READABLE})") from None
    except (OSError, SyntaxError, ValueError, RuntimeError) as exc:
        raise BadInput(f"unreadable image header: {exc}") from None
    if fmt not in FORMATS:
        raise BadInput(f"unsupported image format {fmt}; faceflow reads {READABLE}")
    if w * h > MAX_PIXELS:
        raise TooLarge(f"image too large: {w}x{h} is over the {MAX_PIXELS} pixel limit")
    if orientation not in range(1, 9):
        orientation = 1
    channels, sample_bytes = 3, 1
    if fmt == "PNG" and len(data) >= 26:
        channels, sample_bytes = _png_layout(data)
    elif "A" in mode or mode in ("P", "PA"):
        channels = 4  # WebP, HEIF or AVIF with alpha (a palette may hold transparency)
    return Header(fmt, w, h, orientation, channels, sample_bytes, frames)


def sniff(data: bytes) -> tuple[str, int, int, int]:
    """(format, width, height, exif orientation) from the header, without decoding pixels."""
    head = header(data)
    return head.format, head.width, head.height, head.orientation


def _check_complete(data: bytes, fmt: str) -> None:
    if fmt == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        raise BadInput("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        raise BadInput("truncated PNG (no IEND chunk)")
    if fmt == "WEBP" and len(data) < int.from_bytes(data[4:8], "little") + 8:
        raise BadInput("truncated WebP")


# --- memory --------------------------------------------------------------------------------------

def memory_limit() -> int:
    """The memory this process may use, in bytes, when the caller names none (the functions
    pass their configured memory): FACEFLOW_MEMORY_MB when set, else the machine's memory."""
    configured = os.environ.get("FACEFLOW_MEMORY_MB")
    if configured:
        return int(configured) * MiB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pixel_budget(memory_bytes: int | None = None) -> int:
    """Bytes of image data (every copy at once) that fit in `memory_bytes` of process memory
    (default: memory_limit()), after what the process holds anyway and a margin."""
    memory = memory_limit() if memory_bytes is None else memory_bytes
    return max(0, int(memory * (1 - MEMORY_MARGIN)) - RESERVED_BYTES)


def memory_needed(head: Header, out_format: str | None = None, scale: int = 1, encoded: bool = True) -> int:
    """Peak bytes the still pipeline allocates for this image: the decoded pixels plus the
    largest of what decoding, detection and encoding add beside them.

    decoding: OpenCV's decoder holds a second full buffer (so does turning the image for EXIF
      orientation, after it); HEIF and AVIF decoders with Pillow's image up to 16 bytes a
      pixel (libheif turns a phone's photo itself), GIF Pillow's frame and its conversion (8).
    detection and the verify pass: one 8-bit BGR copy unless the pixels are 8-bit BGR.
    encoding: the encoder's buffer and its copy as bytes: for PNG up to twice the raw pixels
      (measured for incompressible pixels), for lossy formats about the 8-bit size; Pillow's
      encoders take an RGB copy (3 bytes a pixel) as a Pillow image (4), then GIF's 4 more
      (frames as Pillow images, 4 bytes a pixel, and their palette versions), HEIF's tiled x265
      4, AVIF's libaom, which holds the whole frame, up to 30.
    The per-pixel figures were measured on 12- and 48-megapixel photos (bench/stills.py and
    tests/test_memory_budget.py check them).
    `scale` > 1: a reduced 8-bit BGR decode for detection only (nothing encoded).
    `encoded` False: the pixels are only looked at (analysis), never encoded.
    """
    area = -(-head.width // scale) * -(-head.height // scale)
    if scale > 1:  # OpenCV decodes a reduced JPEG directly, PNG and WebP at full size first
        full = 0 if head.format == "JPEG" else head.width * head.height * 4 * head.sample_bytes
        return area * 3 * (2 if head.orientation != 1 else 1) + full
    frame = area * head.channels * head.sample_bytes
    pixels = frame * head.frames
    if head.format in PIL_FORMATS:
        decoding = area * 16 + (frame if head.orientation != 1 else 0)
    elif head.format == "GIF":
        decoding = area * 8
    else:
        decoding = frame
    detection = 0 if (head.channels, head.sample_bytes) == (3, 1) else area * 3
    out = (out_format or head.format).upper()
    if not encoded:
        encoding = 0
    elif out == "PNG":
        encoding = 2 * pixels
    elif out == "AVIF":
        encoding = area * (3 + 4 + 30)
    elif out == "HEIF":
        encoding = area * (3 + 4 + 4)
    elif out == "GIF":
        encoding = head.frames * area * (4 + 4)
    else:
        encoding = area * 3 + (area * 3 if detection else 0)
    return pixels + max(decoding, detection, encoding)


def check_memory(head: Header, memory_bytes: int | None = None, out_format: str | None = None,
                 scale: int = 1, encoded: bool = True) -> None:
    """Refuse, before decoding, an image whose processing would not fit in memory."""
    need, budget = memory_needed(head, out_format, scale, encoded), pixel_budget(memory_bytes)
    if need > budget:
        depth = f"{8 * head.sample_bytes}-bit " if head.sample_bytes > 1 else ""
        frames = f", {head.frames} frames" if head.frames > 1 else ""
        raise TooLarge(
            f"image too large to process in this memory: {head.width}x{head.height} {depth}{head.format}"
            f"{frames} needs about {-(-need // MiB)} MB, {budget // MiB} MB available")


def reduction_for(head: Header, min_side: int) -> int:
    """The largest decode reduction (1, 2, 4 or 8) that keeps the longer side >= min_side."""
    factor = 1
    while factor < 8 and max(head.width, head.height) // (factor * 2) >= min_side:
        factor *= 2
    return factor


# --- decoding ------------------------------------------------------------------------------------

_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def decode(data: bytes, reduce: int = 1, memory_bytes: int | None = None,
           out_format: str | None = None, encoded: bool = True) -> Picture:
    """Decode an upright picture, refusing first what is invalid or would not fit in
    `memory_bytes` (see pixel_budget) when encoded as `out_format`. `reduce` (2, 4, 8): an 8-bit
    BGR image of 1/reduce the size for detection only (JPEG decodes it directly); formats
    OpenCV does not read (GIF, HEIF, AVIF) are decoded at full size whatever `reduce` says."""
    if len(data) > MAX_BYTES:
        raise TooLarge(f"file too large ({len(data)} bytes, limit {MAX_BYTES})")
    head = header(data)
    if head.format == "GIF" or head.format in PIL_FORMATS:
        reduce = 1
    _check_complete(data, head.format)
    check_memory(head, memory_bytes, out_format, reduce, encoded)
    fmt, orientation = head.format, head.orientation
    if reduce > 1:
        pixels = _decode_reduced(data, head, reduce)
    elif fmt == "GIF":
        return _decode_gif(data)
    elif fmt in PIL_FORMATS:
        pixels = _decode_pil(data, head)
    else:
        buf = np.frombuffer(data, np.uint8)
        with Image.open(io.BytesIO(data)) as im:
            plain = im.mode in ("RGB", "CMYK", "YCbCr") and fmt == "JPEG"
        if plain:
            # cv2 applies EXIF orientation itself with IMREAD_COLOR and converts CMYK.
            pixels = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        else:
            pixels = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if pixels is not None:
                pixels = _orient(pixels, orientation)
    if pixels is None:
        raise BadInput(f"could not decode {fmt} data (corrupt file?)")
    if reduce == 1:
        return Picture(pixels=pixels, format=fmt)
    upright = (head.width, head.height) if head.orientation < 5 else (head.height, head.width)
    return Picture(pixels=pixels, format=fmt, scale=reduce, size=upright)


def _decode_reduced(data: bytes, head: Header, reduce: int) -> np.ndarray | None:
    # OpenCV applies EXIF orientation itself for JPEG; for the others it is applied here.
    flags = _REDUCED[reduce] | (cv2.IMREAD_IGNORE_ORIENTATION if head.format != "JPEG" else 0)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is not None and head.format != "JPEG":
        pixels = _orient(pixels, head.orientation)
    return pixels


def _decode_pil(data: bytes, head: Header) -> np.ndarray:
    """HEIF or AVIF through Pillow: 8-bit BGR(A), EXIF orientation applied."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = "RGBA" if head.channels == 4 else "RGB"
            rgb = np.array(im if im.mode == mode else im.convert(mode))
    except (OSError, ValueError, RuntimeError, SyntaxError) as exc:
        raise BadInput(f"could not decode {head.format} data (corrupt file?): {exc}") from None
    cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA if mode == "RGBA" else cv2.COLOR_RGB2BGR, dst=rgb)
    return _orient(rgb, head.orientation)


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
    """Every frame composited as shown (Pillow applies each frame's disposal and its offset
    within the logical screen), as BGR."""
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


def can_write(fmt: str) -> bool:
    """Whether this installation can encode `fmt` (HEIF and AVIF need their encoders)."""
    fmt = fmt.upper()
    if fmt == "HEIF":
        return bool(pillow_heif.libheif_info().get("HEIF"))
    if fmt == "AVIF":
        return bool(features.check("avif"))
    return fmt in FORMATS


def encode(picture: Picture, fmt: str | None = None, quality: int = 92,
           synthetic_mark: str | None = None) -> bytes:
    """Pixels only: the encoders below add no EXIF, XMP, GPS, ICC or text metadata, except
    `synthetic_mark` (an IPTC DigitalSourceType URI, for face swaps only): XMP stating it, or
    a GIF's comment (faceflow.synthetic)."""
    fmt = (fmt or picture.format).upper()
    data = _encode(picture, fmt, quality, synthetic_mark)
    if synthetic_mark and fmt in synthetic.SPLICED_FORMATS:
        pixels = picture.pixels
        data = synthetic.embed_xmp(data, fmt, synthetic.xmp_packet(synthetic_mark),
                                   (pixels.shape[1], pixels.shape[0]),
                                   alpha=pixels.ndim == 3 and pixels.shape[2] == 4)
    return data


def _encode(picture: Picture, fmt: str, quality: int, synthetic_mark: str | None) -> bytes:
    if fmt == "GIF":
        frames = picture.frames or [picture.pixels]
        pil = [Image.fromarray(cv2.cvtColor(to_bgr8(f), cv2.COLOR_BGR2RGB)) for f in frames]
        durations = picture.durations or [100] * len(pil)
        out = io.BytesIO()
        # save_all for one frame too: Pillow takes a list of durations only with it
        extra = {"comment": synthetic.statement(synthetic_mark)} if synthetic_mark else {}
        pil[0].save(out, "GIF", save_all=True, append_images=pil[1:],
                    duration=durations if len(pil) > 1 else durations[0], loop=picture.loop,
                    optimize=False, **extra)
        return out.getvalue()
    pixels = picture.pixels
    if fmt in PIL_FORMATS:
        return _encode_pil(pixels, fmt, quality, synthetic_mark)
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


# Encoder speed: at their defaults a 12-megapixel phone photo took 20 s of CPU to encode as HEIC
# (x265) and 4.6 s as AVIF, too slow for a synchronous API call; these settings took 3 s and
# 1.8 s for files of about the same size at the same quality.
_PIL_ENCODER_OPTIONS = {"HEIF": {"enc_params": {"preset": "ultrafast"}}, "AVIF": {"speed": 8}}


def _encode_pil(pixels: np.ndarray, fmt: str, quality: int, synthetic_mark: str | None = None) -> bytes:
    """HEIF or AVIF, 8-bit, alpha kept; nothing but pixels (no EXIF, XMP or ICC is passed),
    or with `synthetic_mark` its XMP."""
    alpha = pixels.ndim == 3 and pixels.shape[2] == 4
    if pixels.dtype != np.uint8:
        pixels = (pixels >> 8).astype(np.uint8)
    if pixels.ndim == 2:
        image = Image.fromarray(pixels, "L")
    else:
        image = Image.fromarray(cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if alpha else cv2.COLOR_BGR2RGB))
    out = io.BytesIO()
    try:
        extra = {"xmp": synthetic.xmp_packet(synthetic_mark)} if synthetic_mark else {}
        image.save(out, fmt, quality=quality, **_PIL_ENCODER_OPTIONS[fmt], **extra)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"could not encode {fmt}: {exc}") from None
    return out.getvalue()


def atomic_write(path: Path | str, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); an output gets the mode any new file would
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def format_for(path: Path | str, default: str) -> str:
    return EXTENSION_FORMAT.get(Path(path).suffix.lower(), default)
