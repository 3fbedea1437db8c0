"""What faceflow reads and writes, defined once: image formats, file extensions, media types,
and the job id. Plain data with no heavy imports, so handlers can check a name at cold start
without loading cv2 or the models."""
from __future__ import annotations

import re
from pathlib import PurePath

# Still-image formats (Pillow's names) → the extension written and the media type.
IMAGE_FORMATS = {
    "JPEG": (".jpg", "image/jpeg"),
    "PNG": (".png", "image/png"),
    "WEBP": (".webp", "image/webp"),
    "GIF": (".gif", "image/gif"),
    "HEIF": (".heic", "image/heic"),  # what phones write: HEVC-coded HEIF
    "AVIF": (".avif", "image/avif"),
}
# Every extension read as a still, and its format.
IMAGE_EXTENSIONS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF",
                    ".heic": "HEIF", ".heif": "HEIF", ".avif": "AVIF"}
# Extensions whose media type is not their format's own.
EXTENSION_MEDIA_TYPES = {".heif": "image/heif"}

# Video containers read (FFmpeg probes the contents; the extension only routes the file) and the
# media type of each.
VIDEO_MEDIA_TYPES = {
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
    ".webm": "video/webm", ".avi": "video/x-msvideo", ".ts": "video/mp2t", ".mts": "video/mp2t",
}
VIDEO_EXTENSIONS = frozenset(VIDEO_MEDIA_TYPES)
# Containers that take H.264 as written by the encoder; other video inputs are written as .mp4.
VIDEO_OUTPUT_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv")

# A job's operations: what is done to the faces it finds.
ANONYMIZE, ANALYZE, SWAP = "anonymize", "analyze", "swap"
OPERATIONS = (ANONYMIZE, ANALYZE, SWAP)

# Job ids faceflow makes (uuid4 hex).
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def image_media_type(fmt: str) -> str:
    return IMAGE_FORMATS[fmt.upper()][1]


def extension_media_type(suffix: str) -> str:
    """The media type of a file extension (".jpg", either case); octet-stream for one that
    names nothing faceflow reads."""
    suffix = suffix.lower()
    if suffix in EXTENSION_MEDIA_TYPES:
        return EXTENSION_MEDIA_TYPES[suffix]
    if suffix in IMAGE_EXTENSIONS:
        return image_media_type(IMAGE_EXTENSIONS[suffix])
    return VIDEO_MEDIA_TYPES.get(suffix, "application/octet-stream")


def media_type_for(name: str | PurePath) -> str:
    """The media type of a file name by its extension (octet-stream when it names none)."""
    return extension_media_type(PurePath(name).suffix)


def kind_of(name: str | PurePath) -> str | None:
    """"image" or "video" from a file name's extension (None when it says neither)."""
    suffix = PurePath(name).suffix.lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "video" if suffix in VIDEO_EXTENSIONS else None
