"""The stream protocol (faceflow.stream) as the protobuf messages of stream.proto, both ways.

The gRPC server (functions/gpu/stream_server.py) and the client (faceflow.streamclient) use
these so that a reply reads the same whatever the transport: the dict faceflow.stream's
StreamProcessor makes and `stream.decode_reply` reads. Needs protobuf (the `stream` extra).
"""
from __future__ import annotations

from typing import Any

from . import stream
from .stream_pb2 import Face as FaceProto
from .stream_pb2 import Frame, Reply

_KINDS = {stream.RESULT: Reply.RESULT, stream.DROP: Reply.DROP, stream.ERROR: Reply.ERROR}
_TYPES = {kind: name for name, kind in _KINDS.items()}
# Reply fields copied as they are when present (the rest: kind, seq, faces, jpeg).
_PLAIN = ("timestamp", "status", "width", "height", "dropped", "ms", "quality", "reset", "covered",
          "reason", "code", "error")


def frame_to_proto(message: stream.FrameMessage) -> Frame:
    return Frame(seq=message.seq, timestamp=message.timestamp, jpeg=message.jpeg,
                 return_frame=message.return_frame, method=message.method, quality=message.quality,
                 fps=message.fps)


def frame_from_proto(frame: Frame) -> stream.FrameMessage:
    """A FrameMessage; the values are checked later, as the wire form's are (StreamHub.submit).
    Optional fields left out take the protocol's defaults."""
    defaults = stream.FrameMessage(0, 0.0, b"")
    return stream.FrameMessage(
        seq=frame.seq, timestamp=frame.timestamp, jpeg=frame.jpeg,
        return_frame=frame.return_frame if frame.HasField("return_frame") else defaults.return_frame,
        method=frame.method if frame.HasField("method") else defaults.method,
        quality=frame.quality if frame.HasField("quality") else defaults.quality,
        fps=frame.fps if frame.HasField("fps") else defaults.fps)


def reply_to_proto(reply: dict[str, Any]) -> Reply:
    out = Reply(kind=_KINDS.get(reply.get("type"), Reply.KIND_UNSPECIFIED))
    if reply.get("seq") is not None:
        out.seq = int(reply["seq"])
    for name in _PLAIN:
        value = reply.get(name)
        if value is not None:
            setattr(out, name, value)
    if reply.get("jpeg"):
        out.jpeg = reply["jpeg"]
    for face in reply.get("faces", ()):
        x, y, w, h = face["box"]
        out.faces.append(FaceProto(x=x, y=y, width=w, height=h, track=face.get("track") or 0,
                                   source=face.get("source") or "", score=face.get("score", 0.0)))
    return out


def reply_from_proto(reply: Reply) -> dict[str, Any]:
    """The reply as faceflow.stream.decode_reply gives it (`jpeg` bytes when there is one)."""
    out: dict[str, Any] = {"v": stream.PROTOCOL_VERSION, "type": _TYPES.get(reply.kind, "unknown"),
                           "seq": reply.seq if reply.HasField("seq") else None}
    for name in _PLAIN:
        value = getattr(reply, name)
        if value or name == "dropped":
            out[name] = value
    if reply.kind == Reply.RESULT:
        out["faces"] = [{"box": [round(f.x, 1), round(f.y, 1), round(f.width, 1), round(f.height, 1)],
                         "track": f.track or None, "source": f.source, "score": round(f.score, 3)}
                        for f in reply.faces]
    if reply.jpeg:
        out["jpeg"] = reply.jpeg
    return out
