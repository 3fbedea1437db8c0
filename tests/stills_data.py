"""Still images the format and memory tests make for themselves (from skimage's astronaut(),
public domain): nothing identifiable is stored in the repository."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ORIENTATION = 0x0112
MAKE, MODEL, GPS_IFD = 0x010F, 0x0110, 0x8825


def rgb(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def phone_exif(orientation: int) -> Image.Exif:
    """EXIF as a phone writes it: orientation, camera and a GPS position."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[MAKE], exif[MODEL] = "PhoneMaker", "Phone 15"
    gps = exif.get_ifd(GPS_IFD)
    gps[1], gps[2] = "N", (48.0, 51.0, 24.0)
    gps[3], gps[4] = "E", (2.0, 21.0, 3.0)
    return exif


def sideways_photo(upright_bgr: np.ndarray, fmt: str) -> bytes:
    """`upright_bgr` stored turned 90 degrees anticlockwise with EXIF orientation 6 ("turn 90
    degrees clockwise to show"), camera and GPS tags, in `fmt` (HEIF, AVIF, JPEG, ...)."""
    stored = Image.fromarray(rgb(np.ascontiguousarray(np.rot90(upright_bgr, 1))))
    out = io.BytesIO()
    stored.save(out, fmt, quality=90, exif=phone_exif(6).tobytes())
    return out.getvalue()


def gif_bytes(frames: list[Image.Image], durations: list[int] | int, **options) -> bytes:
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   **options)
    return out.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_large_png(path: Path, face_bgr: np.ndarray, width: int = 10000, height: int = 10000,
                    depth: int = 16, alpha: bool = True, face_side: int = 2000) -> None:
    """A large, highly compressible PNG written a row at a time (never more than a few rows in
    memory): mid-gray, opaque, with `face_bgr` scaled up (nearest neighbour) in the middle.
    Rows are filtered 'Up' (difference to the row above), so repeated rows deflate to almost
    nothing: 10000 x 10000 16-bit RGBA comes to about 2 MB (0.8 MB without the face)."""
    channels = 4 if alpha else 3
    dtype = np.dtype(">u2") if depth == 16 else np.dtype(np.uint8)
    top_value = (1 << depth) - 1
    face = cv2.resize(rgb(face_bgr), (face_side, face_side), interpolation=cv2.INTER_NEAREST)
    top, left = (height - face_side) // 2, (width - face_side) // 2
    background = np.zeros((width, channels), dtype)
    background[:, :3] = top_value // 2
    if alpha:
        background[:, 3] = top_value
    row_bytes = width * channels * dtype.itemsize
    unchanged = b"\x02" + bytes(row_bytes)  # filter Up, same as the row above
    compressor = zlib.compressobj(6)
    previous = np.zeros(row_bytes, np.uint8)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 6 if alpha else 2, 0, 0, 0)))
        pending, size = [], 0
        for y in range(height):
            in_face = top <= y < top + face_side
            if y == 0 or in_face or y == top + face_side:
                row = background.copy()
                if in_face:
                    row[left:left + face_side, :3] = face[y - top].astype(np.uint32) * top_value // 255
                raw = np.frombuffer(row.tobytes(), np.uint8)
                line = b"\x02" + (raw - previous).tobytes()
                previous = raw
            else:
                line = unchanged
            piece = compressor.compress(line)
            if piece:
                pending.append(piece)
                size += len(piece)
            if size > 1 << 20:
                f.write(_chunk(b"IDAT", b"".join(pending)))
                pending, size = [], 0
        pending.append(compressor.flush())
        f.write(_chunk(b"IDAT", b"".join(pending)))
        f.write(_chunk(b"IEND", b""))
