"""The machine-readable mark that an output is synthetic (a face swap), defined once.

Photos carry XMP with IPTC's DigitalSourceType (the property the IPTC photo metadata standard
and the C2PA/EU AI Act labelling practice read): `compositeSynthetic` for the landmark swap
(real pixels of two photos composed), `trainedAlgorithmicMedia` for a trained model's output
(INSwapper). The packet is spliced into the encoded file without re-encoding it:

- JPEG: an APP1 segment with Adobe's XMP namespace, after the JFIF header;
- PNG: an iTXt chunk `XML:com.adobe.xmp` before the first IDAT;
- WebP: an `XMP ` chunk, the file made extended (VP8X) when it was a simple one;
- HEIF/AVIF: written by their Pillow encoders (`xmp=`);
- GIF cannot carry it through Pillow (it writes no XMP application extension): a GIF gets the
  same statement as its comment extension.

Videos carry it as container metadata (MP4/MOV with `use_metadata_tags`, Matroska tags):
`comment` says it in words and DIGITAL_SOURCE_TYPE_TAG holds the IPTC term's URI.
Nothing here is applied to anonymised output, which stays metadata-free.
"""
from __future__ import annotations

import struct
import zlib

IPTC_DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/"
COMPOSITE_SYNTHETIC = IPTC_DIGITAL_SOURCE_TYPE + "compositeSynthetic"
TRAINED_ALGORITHMIC_MEDIA = IPTC_DIGITAL_SOURCE_TYPE + "trainedAlgorithmicMedia"
IPTC_EXT_NAMESPACE = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
XMP_JPEG_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_PNG_KEYWORD = b"XML:com.adobe.xmp"
# The video container's tags: the URI under its own key, and a sentence any player shows.
DIGITAL_SOURCE_TYPE_TAG = "digital_source_type"
COMMENT_TAG = "comment"
# Formats whose files carry the XMP packet (the rest: see the module's docstring), and of
# those the ones it is spliced into after encoding (the others' Pillow encoders write it).
XMP_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF")
SPLICED_FORMATS = ("JPEG", "PNG", "WEBP")


def statement(source_type: str) -> str:
    """The mark in words (a GIF's comment, a video's `comment` tag)."""
    return f"synthetic: face swapped by faceflow; IPTC DigitalSourceType {source_type}"


def xmp_packet(source_type: str) -> bytes:
    """An XMP packet stating the IPTC digital source type."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        f'  <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{IPTC_EXT_NAMESPACE}"\n'
        f'    Iptc4xmpExt:DigitalSourceType="{source_type}"/>\n'
        ' </rdf:RDF>\n'
        '</x:xmpmeta>\n'
        '<?xpacket end="r"?>').encode("utf-8")


def video_tags(source_type: str) -> dict[str, str]:
    return {DIGITAL_SOURCE_TYPE_TAG: source_type, COMMENT_TAG: statement(source_type)}


def embed_xmp(data: bytes, fmt: str, packet: bytes, size: tuple[int, int], alpha: bool = False) -> bytes:
    """`data` (an encoded JPEG, PNG or WebP of `size` (width, height)) with the XMP packet
    added; the pixels' bytes are left as they are."""
    fmt = fmt.upper()
    if fmt == "JPEG":
        return _jpeg_with_xmp(data, packet)
    if fmt == "PNG":
        return _png_with_xmp(data, packet)
    if fmt == "WEBP":
        return _webp_with_xmp(data, packet, size, alpha)
    raise ValueError(f"no XMP splicing for {fmt}")


def _jpeg_with_xmp(data: bytes, packet: bytes) -> bytes:
    body = XMP_JPEG_HEADER + packet
    if len(body) + 2 > 0xFFFF:
        raise ValueError("XMP packet too large for one JPEG segment")
    segment = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    at = 2  # after SOI; after the JFIF APP0 too, which must come first
    if data[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:at] + segment + data[at:]


def _png_with_xmp(data: bytes, packet: bytes) -> bytes:
    # iTXt: keyword, NUL, compression flag and method (none), language tag, NUL, translated
    # keyword, NUL, then the UTF-8 text.
    payload = XMP_PNG_KEYWORD + b"\x00\x00\x00\x00\x00" + packet
    chunk = struct.pack(">I", len(payload)) + b"iTXt" + payload + \
        struct.pack(">I", zlib.crc32(b"iTXt" + payload) & 0xFFFFFFFF)
    at = data.index(b"IDAT") - 4  # the first IDAT's length field
    return data[:at] + chunk + data[at:]


def _webp_with_xmp(data: bytes, packet: bytes, size: tuple[int, int], alpha: bool) -> bytes:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a WebP file")
    chunks = data[12:]
    xmp = b"XMP " + struct.pack("<I", len(packet)) + packet + (b"\x00" if len(packet) % 2 else b"")
    if chunks[:4] == b"VP8X":
        flags = chunks[8] | 0x04  # XMP present
        chunks = chunks[:8] + bytes([flags]) + chunks[9:]
    else:
        width, height = size
        flags = 0x04 | (0x10 if alpha else 0)
        vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0]) + \
            (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        chunks = vp8x + chunks
    body = b"WEBP" + chunks + xmp
    return b"RIFF" + struct.pack("<I", len(body)) + body
