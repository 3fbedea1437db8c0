"""Real-time streams: the message protocol and the per-frame step every transport shares.

A client sends frames (JPEG, a sequence number, a timestamp, options); for each it gets back
the faces (box, track id, source) and, if asked, the anonymised JPEG. The stream's tracks live
in a plain JSON-safe state (`StreamProcessor.process(message, state) -> Outcome`), so a
transport may keep it in memory (a WebSocket server, a gRPC stream) or in Redis between
invocations (the Lambda function behind API Gateway). Nothing here knows of a transport.

Wire format (one definition for every transport):

* Text: a JSON object; a frame's JPEG is base64 in `jpeg`. API Gateway WebSocket APIs take
  text frames only (a binary frame closes the connection with 1003) and at most 128 KiB a
  message (sent as WebSocket frames of at most 32 KiB each; over that closes with 1009), so
  over API Gateway a frame's JPEG is at most `MAX_JPEG_BYTES` (95 KiB).
* Binary (transports that pass binary frames: `faceflow serve`, gRPC): a 4-byte big-endian
  length, that many bytes of the same JSON object without `jpeg`, then the raw JPEG.

Client → server, `type` "frame": `v` (PROTOCOL_VERSION), `seq` (int ≥ 0, one per frame, in
capture order), `timestamp` (seconds, the frame's time in the stream), `jpeg`, and optionally
`return_frame` (default true), `method` (blur | pixelate | solid), `quality` (1-100, of the
returned JPEG), `fps` (the stream's frame rate, read on its first frame: how long a lost face
stays covered is counted in frames).

Server → client: `type` "result" (per frame: `seq`, `timestamp`, `status` ok | duplicate |
late, `faces` [{box [x, y, w, h], track, source detected | tracked | interpolated, score}],
`width`, `height`, `dropped`, `ms`, optionally `jpeg`, `quality`, `reset`, `covered`),
"drop" (a frame not processed: `seq`, `reason`, `dropped`) or "error" (a message refused:
`seq` when known, `code`, `error`, `dropped`).

Frames arrive out of order or twice (retries, two execution environments): as the chunk
sessions do, a frame already done is a duplicate (its stored faces again, nothing changes);
a frame older than the newest one done is "late" and is masked with its own detections plus
the faces of the nearest frames done, without moving the tracks back; a frame past a gap is
processed (frames lost on the way do not hold the stream up). Every frame that gets no result
is counted by reason in the state and each reply says the total.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from . import images
from .anonymize import METHODS, MaskOptions, apply_masks
from .face import DETECTED, TRACKED, Face
from .tracker import Tracker

PROTOCOL_VERSION = 1
READABLE_VERSIONS = (1,)
STATE_VERSION = 1

# API Gateway WebSocket quotas (not adjustable): a message's payload, and each WebSocket frame
# of it (a longer message is sent fragmented). The replies posted to @connections obey both.
MESSAGE_LIMIT_BYTES = 128 * 1024
WS_FRAME_LIMIT_BYTES = 32 * 1024
# Room for the JSON fields around the base64 JPEG.
ENVELOPE_BYTES = 1024
# The largest JPEG a frame message may carry: base64 makes 4 bytes of 3.
MAX_JPEG_BYTES = (MESSAGE_LIMIT_BYTES - ENVELOPE_BYTES) * 3 // 4 // 1024 * 1024   # 95 KiB
# Bounded work per message: the largest frame decoded (1080p).
MAX_FRAME_PIXELS = 1920 * 1088
DEFAULT_QUALITY = 80
MIN_QUALITY = 30            # a returned JPEG that does not fit is re-encoded down to this
DEFAULT_FPS = 25.0
MAX_FPS = 120.0
RECENT_FRAMES = 32          # results kept for duplicates and late frames

# Message types and reply statuses.
FRAME, RESULT, DROP, ERROR = "frame", "result", "drop", "error"
OK, DUPLICATE, LATE = "ok", "duplicate", "late"
# How the stream's state came to be lost (Outcome.reset): rebuilt from an older copy, or lost.
REBUILT, LOST = "rebuilt", "lost"

# Error codes, for a message refused.
MALFORMED, UNSUPPORTED_VERSION, TOO_LARGE, BAD_IMAGE, UNAUTHORIZED = (
    "malformed", "unsupported_version", "too_large", "bad_image", "unauthorized")
# Why a frame got no result: the transport's (backlog: the client sends faster than frames are
# processed; stale: waited too long to be worth sending; conflict: the stream's state kept
# changing under it) and the refusals above.
BACKLOG, STALE, CONFLICT, REPLY_TOO_LARGE = "backlog", "stale", "conflict", "reply_too_large"
DROP_REASONS = (BACKLOG, STALE, CONFLICT, REPLY_TOO_LARGE, MALFORMED, UNSUPPORTED_VERSION,
                TOO_LARGE, BAD_IMAGE)

_FRAME_FIELDS = {"v", "type", "seq", "timestamp", "jpeg", "return_frame", "method", "quality", "fps"}
_HEADER = struct.Struct(">I")
_MAX_HEADER_BYTES = ENVELOPE_BYTES


class ProtocolError(ValueError):
    """A message refused: `code` (one of the error codes) and, when it could be read, `seq`."""

    def __init__(self, code: str, message: str, seq: int | None = None):
        super().__init__(message)
        self.code, self.seq = code, seq


@dataclass(frozen=True)
class FrameMessage:
    seq: int
    timestamp: float
    jpeg: bytes
    return_frame: bool = True
    method: str = "blur"
    quality: int = DEFAULT_QUALITY
    fps: float = DEFAULT_FPS


# --- the wire ---------------------------------------------------------------------------------

def encode_frame(message: FrameMessage, binary: bool = False) -> str | bytes:
    """A frame message as a client sends it: JSON text (API Gateway) or the binary form."""
    fields = {"v": PROTOCOL_VERSION, "type": FRAME, "seq": message.seq, "timestamp": message.timestamp,
              "return_frame": message.return_frame, "method": message.method,
              "quality": message.quality, "fps": message.fps}
    return _encode(fields, message.jpeg, binary)


def encode_reply(reply: dict[str, Any], binary: bool = False) -> str | bytes:
    """A reply (Outcome.reply) on the wire; its `jpeg` (bytes), if any, base64 in text."""
    fields = {k: v for k, v in reply.items() if k != "jpeg"}
    return _encode(fields, reply.get("jpeg"), binary)


def _encode(fields: dict[str, Any], jpeg: bytes | None, binary: bool) -> str | bytes:
    if binary:
        head = json.dumps(fields, separators=(",", ":")).encode()
        return _HEADER.pack(len(head)) + head + (jpeg or b"")
    if jpeg is not None:
        fields = {**fields, "jpeg": base64.b64encode(jpeg).decode("ascii")}
    return json.dumps(fields, separators=(",", ":"))


def decode_reply(data: str | bytes) -> dict[str, Any]:
    """A reply as a client reads it: `jpeg` as bytes when there is one."""
    fields, jpeg = _split(data)
    if isinstance(fields.get("jpeg"), str):
        jpeg = base64.b64decode(fields["jpeg"])
    if jpeg:
        fields["jpeg"] = jpeg
    return fields


def fragments(text: str, limit: int = WS_FRAME_LIMIT_BYTES) -> list[str]:
    """A text message cut into WebSocket frames of at most `limit` bytes (API Gateway closes
    the connection on a longer frame); a client sends them as one fragmented message. Safe to
    cut anywhere: the protocol's JSON is ASCII."""
    return [text[i:i + limit] for i in range(0, len(text), limit)] or [""]


def _split(data: str | bytes) -> tuple[dict[str, Any], bytes | None]:
    """(the JSON fields, the binary form's JPEG) of a message; ProtocolError if unreadable."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise ProtocolError(MALFORMED, "binary message shorter than its header")
        (length,) = _HEADER.unpack_from(data)
        if length > _MAX_HEADER_BYTES or _HEADER.size + length > len(data):
            raise ProtocolError(MALFORMED, f"binary message header of {length} bytes does not fit")
        text, jpeg = data[_HEADER.size:_HEADER.size + length], data[_HEADER.size + length:]
    else:
        text, jpeg = data, None
    try:
        fields = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(MALFORMED, "message is not JSON") from None
    if not isinstance(fields, dict):
        raise ProtocolError(MALFORMED, "message is not a JSON object")
    return fields, jpeg


def parse_message(data: str | bytes, max_jpeg_bytes: int = MAX_JPEG_BYTES) -> FrameMessage:
    """A client's frame message, checked; ProtocolError says what is wrong."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MESSAGE_LIMIT_BYTES + ENVELOPE_BYTES and isinstance(data, str):
        # Refused before parsing: the JSON of a huge message is not worth reading.
        raise ProtocolError(TOO_LARGE, f"message of {size} bytes is over the {MESSAGE_LIMIT_BYTES} byte limit")
    fields, jpeg = _split(data)
    seq = fields.get("seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None
    version = fields.get("v")
    if version not in READABLE_VERSIONS:
        raise ProtocolError(UNSUPPORTED_VERSION,
                            f"protocol version {version!r} is not one of {list(READABLE_VERSIONS)}", seq)
    if fields.get("type") != FRAME:
        raise ProtocolError(MALFORMED, f"message type {fields.get('type')!r} is not {FRAME!r}", seq)
    unknown = set(fields) - _FRAME_FIELDS
    if unknown:
        raise ProtocolError(MALFORMED, f"unknown fields {sorted(unknown)}", seq)
    if seq is None:
        raise ProtocolError(MALFORMED, "seq must be an integer >= 0")
    timestamp = fields.get("timestamp")
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool) or not math.isfinite(timestamp):
        raise ProtocolError(MALFORMED, "timestamp must be a number (seconds)", seq)
    if jpeg is None:
        encoded = fields.get("jpeg")
        if not isinstance(encoded, str) or not encoded:
            raise ProtocolError(MALFORMED, "jpeg (base64) is missing", seq)
        if len(encoded) > (max_jpeg_bytes + 2) // 3 * 4:
            raise ProtocolError(TOO_LARGE, f"frame of over {max_jpeg_bytes} bytes of JPEG is over the limit", seq)
        try:
            jpeg = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(MALFORMED, "jpeg is not base64", seq) from None
    elif "jpeg" in fields:
        raise ProtocolError(MALFORMED, "a binary message carries its JPEG after the header, not in it", seq)
    if len(jpeg) > max_jpeg_bytes:
        raise ProtocolError(TOO_LARGE, f"frame of {len(jpeg)} bytes is over the {max_jpeg_bytes} byte limit", seq)
    if not jpeg.startswith(b"\xff\xd8"):
        raise ProtocolError(BAD_IMAGE, "frame is not a JPEG", seq)
    return_frame = fields.get("return_frame", True)
    method = fields.get("method", "blur")
    quality = fields.get("quality", DEFAULT_QUALITY)
    fps = fields.get("fps", DEFAULT_FPS)
    if not isinstance(return_frame, bool):
        raise ProtocolError(MALFORMED, "return_frame must be true or false", seq)
    if method not in METHODS:
        raise ProtocolError(MALFORMED, f"method must be one of {', '.join(METHODS)}", seq)
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise ProtocolError(MALFORMED, "quality must be an integer from 1 to 100", seq)
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps <= MAX_FPS:
        raise ProtocolError(MALFORMED, f"fps must be a number above 0 and at most {MAX_FPS:g}", seq)
    return FrameMessage(seq, float(timestamp), jpeg, return_frame, method, quality, float(fps))


# --- the per-frame step -----------------------------------------------------------------------

@dataclass
class Outcome:
    """What one message gives: the reply to send and the stream's state to keep."""
    reply: dict[str, Any]
    state: dict[str, Any]


@dataclass
class StreamOptions:
    max_missing_s: float = 1.5          # how long a face the detector lost stays covered
    mask_scale: float = MaskOptions.mask_scale
    max_jpeg_bytes: int = MAX_JPEG_BYTES
    reply_limit_bytes: int = MESSAGE_LIMIT_BYTES  # a reply with its JPEG must fit (API Gateway)
    cut_detection: bool = False         # a live camera does not cut; a cut would drop held faces


@dataclass
class StreamProcessor:
    """The per-frame step: decode → detect → track → mask → encode, against the stream's state.

    `engine` only needs `detect(bgr)`. A transport that batches detection across streams
    (gRPC) decodes with `decode`, detects itself and passes `bgr` and `detections`.
    """
    engine: Any
    options: StreamOptions = field(default_factory=StreamOptions)

    # --- state ---------------------------------------------------------------------------
    def new_state(self, fps: float = DEFAULT_FPS) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fps": fps, "next_seq": 0, "frames": 0,
                "tracker": Tracker(fps=fps, max_missing_s=self.options.max_missing_s).state(),
                "recent": [], "drops": {}, "duplicates": 0, "late": 0,
                "cover_until": None, "resets": 0}

    def check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}")
        return state

    # --- messages ------------------------------------------------------------------------
    def handle(self, data: str | bytes, state: dict[str, Any] | None, reset: str | None = None) -> Outcome:
        """A message off the wire: its result, or an error reply (counted as a drop)."""
        if reset == LOST:
            # Whole frames are covered from the first frame processed, even if this message
            # is refused: the state it leaves must still say so.
            state = {**self.new_state(), "cover_pending": True}
        state = self.check_state(state) if state is not None else self.new_state()
        try:
            message = parse_message(data, self.options.max_jpeg_bytes)
            return self.process(message, state, reset=reset)
        except ProtocolError as exc:
            return self.refuse(state, exc)

    def refuse(self, state: dict[str, Any], error: ProtocolError) -> Outcome:
        state = _counted(state, error.code)
        return Outcome({"v": PROTOCOL_VERSION, "type": ERROR, "seq": error.seq, "code": error.code,
                        "error": str(error), "dropped": _dropped(state)}, state)

    def drop(self, state: dict[str, Any], seq: int | None, reason: str) -> Outcome:
        """A frame the transport will not process (backpressure, a lost race): counted, and
        the reply that tells the client."""
        if reason not in DROP_REASONS:
            raise ValueError(f"drop reason {reason!r} is not one of {DROP_REASONS}")
        state = _counted(state, reason)
        return Outcome({"v": PROTOCOL_VERSION, "type": DROP, "seq": seq, "reason": reason,
                        "dropped": _dropped(state)}, state)

    def decode(self, message: FrameMessage) -> np.ndarray:
        """The frame's pixels (BGR); ProtocolError for what is not a readable, bounded JPEG."""
        try:
            head = images.header(message.jpeg)
        except images.BadInput as exc:
            raise ProtocolError(BAD_IMAGE, str(exc), message.seq) from None
        if head.format != "JPEG":
            raise ProtocolError(BAD_IMAGE, f"frame is {head.format}, not JPEG", message.seq)
        if head.width * head.height > MAX_FRAME_PIXELS:
            raise ProtocolError(TOO_LARGE, f"frame of {head.width}x{head.height} is over the "
                                           f"{MAX_FRAME_PIXELS} pixel limit (1080p)", message.seq)
        bgr = cv2.imdecode(np.frombuffer(message.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ProtocolError(BAD_IMAGE, "frame could not be decoded (corrupt JPEG?)", message.seq)
        return bgr

    def process(self, message: FrameMessage, state: dict[str, Any] | None, *, reset: str | None = None,
                bgr: np.ndarray | None = None, detections: list[Face] | None = None) -> Outcome:
        """One frame against the stream's `state` (None: a new stream). `reset` says the
        transport lost the stream's state: REBUILT (`state` is an older copy) or LOST (`state`
        is None; until the tracker could have held a face that far, whole frames are covered)."""
        start = time.perf_counter()
        state = self.check_state(state) if state is not None else self.new_state(message.fps)
        if reset == LOST or state.get("cover_pending"):
            state = _lost({**self.new_state(message.fps), "drops": state["drops"]}, message.seq,
                          self.options.max_missing_s)
        if bgr is None:
            bgr = self.decode(message)
        state = {**state, "recent": [list(r) for r in state["recent"]], "drops": dict(state["drops"])}
        height, width = bgr.shape[:2]
        recent = {seq: faces for seq, faces in state["recent"]}
        if message.seq in recent:
            status, faces = DUPLICATE, [Face.from_dict(f) for f in recent[message.seq]]
            state["duplicates"] += 1
        elif message.seq < state["next_seq"]:
            status = LATE
            found = self.engine.detect(bgr) if detections is None else detections
            faces = found + _nearest(state["recent"], message.seq)
            state["late"] += 1
        else:
            status = OK
            found = self.engine.detect(bgr) if detections is None else detections
            tracker = Tracker.from_state(state["tracker"])
            faces = tracker.update(message.seq, found, bgr if self.options.cut_detection else None)
            state["tracker"] = tracker.state()
            state["next_seq"] = message.seq + 1
            state["frames"] += 1
            state["recent"] = (state["recent"] + [[message.seq, [_record(f) for f in faces]]])[-RECENT_FRAMES:]
        # After a lost state, every frame up to `cover_until` (older ones too) is covered whole.
        cover = state["cover_until"] is not None and message.seq <= state["cover_until"]
        reply: dict[str, Any] = {
            "v": PROTOCOL_VERSION, "type": RESULT, "seq": message.seq, "timestamp": message.timestamp,
            "status": status, "faces": [_record(f) for f in faces], "width": width, "height": height}
        if reset:
            reply["reset"] = reset
        if cover:
            reply["covered"] = "frame"
        if message.return_frame:
            masked = self._masked(bgr, faces, message.method, cover)
            jpeg, quality = self._encoded(masked, message.quality)
            if jpeg is None:
                return self.drop(state, message.seq, REPLY_TOO_LARGE)
            reply["jpeg"], reply["quality"] = jpeg, quality
        reply["dropped"] = _dropped(state)
        reply["ms"] = round((time.perf_counter() - start) * 1000, 1)
        return Outcome(reply, state)

    # --- pixels --------------------------------------------------------------------------
    def _masked(self, bgr: np.ndarray, faces: list[Face], method: str, cover: bool) -> np.ndarray:
        height, width = bgr.shape[:2]
        if cover:  # the whole frame: where a lost track's face is cannot be known
            faces = [Face(box=(0.0, 0.0, float(width), float(height)), score=1.0)]
            return apply_masks(bgr, faces, MaskOptions(method=method, shape="box", mask_scale=1.0))
        return apply_masks(bgr, faces, MaskOptions(method=method, mask_scale=self.options.mask_scale))

    def _encoded(self, bgr: np.ndarray, quality: int) -> tuple[bytes | None, int]:
        """The JPEG at `quality`, or lower (to MIN_QUALITY) until the reply fits."""
        budget = (self.options.reply_limit_bytes - ENVELOPE_BYTES) * 3 // 4
        while True:
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and buf.size <= budget:
                return buf.tobytes(), quality
            if quality <= MIN_QUALITY:
                return None, quality
            quality = max(MIN_QUALITY, quality - 15)


def _record(face: Face) -> dict[str, Any]:
    """A face as a reply lists it (and the state's recent results keep it)."""
    return {"box": [round(float(v), 1) for v in face.box], "track": face.track,
            "source": face.source if face.track is not None else DETECTED,
            "score": round(float(face.score), 3)}


def _nearest(recent: list, seq: int) -> list[Face]:
    """The faces of the frames done nearest `seq` on either side, as held (tracked) boxes:
    a late frame keeps them covered without moving the tracks back."""
    if not recent:
        return []
    before = [r for r in recent if r[0] < seq]
    after = [r for r in recent if r[0] > seq]
    chosen = ([max(before, key=lambda r: r[0])] if before else []) + \
             ([min(after, key=lambda r: r[0])] if after else [])
    faces = []
    for _, records in chosen:
        for record in records:
            face = Face.from_dict(record)
            face.source = TRACKED if face.source == DETECTED else face.source
            faces.append(face)
    return faces


def _lost(state: dict[str, Any], seq: int, max_missing_s: float) -> dict[str, Any]:
    """A new state for a stream whose state is gone: whole frames are covered for as long as a
    track could have held a face the detector now misses."""
    hold = max(1, int(round(max_missing_s * state["fps"])))
    return {**state, "next_seq": seq, "cover_until": seq + hold, "resets": state["resets"] + 1}


def _counted(state: dict[str, Any], reason: str) -> dict[str, Any]:
    drops = dict(state.get("drops", {}))
    drops[reason] = drops.get(reason, 0) + 1
    return {**state, "drops": drops}


def _dropped(state: dict[str, Any]) -> int:
    return sum(state.get("drops", {}).values())


__all__ = ["PROTOCOL_VERSION", "MESSAGE_LIMIT_BYTES", "WS_FRAME_LIMIT_BYTES", "MAX_JPEG_BYTES",
           "MAX_FRAME_PIXELS", "FrameMessage", "ProtocolError", "StreamOptions", "StreamProcessor",
           "Outcome", "encode_frame", "encode_reply", "decode_reply", "parse_message", "fragments",
           "DROP_REASONS"]
