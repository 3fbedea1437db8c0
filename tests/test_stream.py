"""The stream protocol and StreamProcessor, without a transport: messages on the wire, a face
held through an occlusion with the state through JSON between frames (as Redis keeps it),
duplicates, late frames, gaps, a lost state, drops and refusals."""
from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest

from faceflow import stream
from faceflow.face import DETECTED, TRACKED
from faceflow.stream import FrameMessage, ProtocolError, StreamOptions, StreamProcessor


# --- a synthetic live source: a face that a hand covers for a while ---------------------------

FRAME_W, FRAME_H = 640, 360


@pytest.fixture(scope="module")
def scene(astronaut_bgr, engine):
    """(frame(i, occluded) -> BGR, the face's box on frame 0). The public-domain astronaut
    face moves 2 px a frame across a plain background; occluded frames have a grey block over
    the face, which the detector does not find."""
    face = cv2.resize(astronaut_bgr[0:256, 96:352], (180, 180), interpolation=cv2.INTER_AREA)

    def frame(i: int, occluded: bool = False) -> np.ndarray:
        canvas = np.full((FRAME_H, FRAME_W, 3), (60, 90, 40), np.uint8)
        x = 200 + 2 * i
        canvas[90:270, x:x + 180] = face
        if occluded:
            canvas[90:270, x:x + 180] = (128, 128, 128)
        return canvas

    found = engine.detect(frame(0))
    assert len(found) == 1, "the scene's face must be found when visible"
    assert engine.detect(frame(5, occluded=True)) == [], "the occluded face must be missed"
    return frame, found[0].box


def jpeg(bgr: np.ndarray, quality: int = 85) -> bytes:
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def message(seq: int, bgr: np.ndarray, **options) -> FrameMessage:
    return FrameMessage(seq=seq, timestamp=seq / 25, jpeg=jpeg(bgr), **options)


def through_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def masked_fraction(original: np.ndarray, returned: bytes, box) -> float:
    """Share of the face box's pixels that changed by more than a JPEG round trip would."""
    out = cv2.imdecode(np.frombuffer(returned, np.uint8), cv2.IMREAD_COLOR)
    x, y, w, h = (int(v) for v in box)
    diff = np.abs(out[y:y + h, x:x + w].astype(int) - original[y:y + h, x:x + w].astype(int)).max(axis=2)
    return float((diff > 24).mean())


@pytest.fixture
def processor(engine):
    return StreamProcessor(engine)


# --- the wire ------------------------------------------------------------------------------------

def test_text_and_binary_forms_round_trip(scene):
    frame, _ = scene
    sent = FrameMessage(7, 0.28, jpeg(frame(0)), return_frame=False, method="pixelate", quality=60, fps=30)
    text = stream.encode_frame(sent)
    assert isinstance(text, str) and json.loads(text)["v"] == stream.PROTOCOL_VERSION
    assert stream.parse_message(text) == sent
    binary = stream.encode_frame(sent, binary=True)
    assert isinstance(binary, bytes) and binary.endswith(sent.jpeg)
    assert stream.parse_message(binary) == sent


def test_the_largest_frame_fits_api_gateways_message_and_is_sent_in_32k_fragments():
    largest = b"\xff\xd8" + bytes(stream.MAX_JPEG_BYTES - 2)
    text = stream.encode_frame(FrameMessage(2 ** 40, 1e6, largest, method="pixelate", fps=120.0))
    assert len(text.encode()) <= stream.MESSAGE_LIMIT_BYTES
    parts = stream.fragments(text)
    assert len(parts) == 4 and all(len(p.encode()) <= stream.WS_FRAME_LIMIT_BYTES for p in parts)
    assert "".join(parts) == text
    assert stream.parse_message(text).jpeg == largest


@pytest.mark.parametrize("data, code", [
    ("not json", stream.MALFORMED),
    ("[1, 2]", stream.MALFORMED),
    (json.dumps({"v": 99, "type": "frame", "seq": 1, "timestamp": 0, "jpeg": "/9g="}), stream.UNSUPPORTED_VERSION),
    (json.dumps({"v": 1, "type": "hello", "seq": 1}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "timestamp": 0, "jpeg": "/9g="}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "seq": -1, "timestamp": 0, "jpeg": "/9g="}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "seq": 1, "timestamp": "now", "jpeg": "/9g="}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "seq": 1, "timestamp": 0, "jpeg": "***"}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "seq": 1, "timestamp": 0, "jpeg": "/9g=", "colour": 1}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "seq": 1, "timestamp": 0, "jpeg": "/9g=", "method": "swirl"}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "seq": 1, "timestamp": 0, "jpeg": "/9g=", "quality": 0}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "seq": 1, "timestamp": 0, "jpeg": "/9g=", "fps": 0}), stream.MALFORMED),
    (json.dumps({"v": 1, "type": "frame", "seq": 1, "timestamp": 0, "jpeg": base64.b64encode(b"GIF89a").decode()}), stream.BAD_IMAGE),
    (b"\x00\x00\x10\x00{}", stream.MALFORMED),
    (b"\x00", stream.MALFORMED),
])
def test_malformed_messages_are_refused_with_their_code(data, code):
    with pytest.raises(ProtocolError) as refused:
        stream.parse_message(data)
    assert refused.value.code == code


def test_a_frame_too_large_is_refused_before_decoding(processor):
    big = b"\xff\xd8" + bytes(stream.MAX_JPEG_BYTES)
    for data in (stream.encode_frame(FrameMessage(3, 0.1, big)), stream.encode_frame(FrameMessage(3, 0.1, big), binary=True)):
        outcome = processor.handle(data, None)
        assert outcome.reply["type"] == stream.ERROR and outcome.reply["code"] == stream.TOO_LARGE
        assert outcome.reply["seq"] == 3 and "limit" in outcome.reply["error"]
        assert outcome.state["drops"] == {stream.TOO_LARGE: 1} and outcome.state["next_seq"] == 0


def test_a_frame_over_1080p_or_corrupt_is_refused(processor):
    huge = np.zeros((1200, 2000, 3), np.uint8)
    outcome = processor.handle(stream.encode_frame(FrameMessage(0, 0.0, jpeg(huge, 10))), None)
    assert outcome.reply["code"] == stream.TOO_LARGE and "2000x1200" in outcome.reply["error"]
    outcome = processor.handle(stream.encode_frame(FrameMessage(1, 0.0, jpeg(huge, 10)[:400])), outcome.state)
    assert outcome.reply["code"] == stream.BAD_IMAGE
    assert outcome.reply["dropped"] == 2


# --- tracks through the state ------------------------------------------------------------------

def test_an_occluded_face_stays_covered_with_the_state_through_json(scene, processor):
    frame, box = scene
    plan = [False] * 4 + [True] * 6 + [False] * 3
    state = None
    replies = []
    for seq, occluded in enumerate(plan):
        bgr = frame(seq, occluded)
        outcome = processor.process(message(seq, bgr), state)
        state = through_json(outcome.state)
        reply = stream.decode_reply(stream.encode_reply(outcome.reply))
        replies.append((bgr, reply))
    tracks = set()
    for seq, ((bgr, reply), occluded) in enumerate(zip(replies, plan)):
        assert reply["status"] == stream.OK and len(reply["faces"]) == 1, seq
        face = reply["faces"][0]
        tracks.add(face["track"])
        assert face["source"] == (TRACKED if occluded else DETECTED), seq
        true_box = (box[0] + 2 * seq, box[1], box[2], box[3])  # where the face is on this frame
        fx, fy, fw, fh = face["box"]
        assert fx <= true_box[0] + 10 and fx + fw >= true_box[0] + true_box[2] - 10, (seq, face["box"])
        assert fy <= true_box[1] + 10 and fy + fh >= true_box[1] + true_box[3] - 10, (seq, face["box"])
        if not occluded:  # the face's pixels in the returned frame are masked
            assert masked_fraction(frame(seq), reply["jpeg"], true_box) > 0.5, seq
    assert len(tracks) == 1
    assert state["next_seq"] == len(plan) and state["frames"] == len(plan)


def test_duplicates_return_the_stored_faces_and_change_no_track(scene, processor):
    frame, _ = scene
    state = None
    for seq in range(3):
        state = processor.process(message(seq, frame(seq)), state).state
    before = through_json(state)
    again = processor.process(message(1, frame(1)), state)
    assert again.reply["status"] == stream.DUPLICATE
    assert again.reply["faces"] == state["recent"][1][1]
    assert again.state["tracker"] == before["tracker"] and again.state["next_seq"] == 3
    assert again.state["duplicates"] == 1 and "jpeg" in again.reply


def test_a_late_frame_is_masked_with_its_neighbours_without_moving_tracks_back(scene, processor):
    frame, _ = scene
    state = None
    for seq in (0, 1, 3, 4):
        state = processor.process(message(seq, frame(seq)), state).state
    tracker = through_json(state["tracker"])
    # frame 2 arrives after 3 and 4, occluded: its own detector misses it, its neighbours do not
    late = processor.process(message(2, frame(2, occluded=True)), state)
    assert late.reply["status"] == stream.LATE
    assert late.reply["faces"] and all(f["source"] == TRACKED for f in late.reply["faces"])
    assert late.state["tracker"] == tracker and late.state["late"] == 1 and late.state["next_seq"] == 5


def test_a_gap_does_not_hold_the_stream_up(scene, processor):
    frame, _ = scene
    state = processor.process(message(0, frame(0)), None).state
    outcome = processor.process(message(10, frame(10, occluded=True)), state)
    assert outcome.reply["status"] == stream.OK and outcome.state["next_seq"] == 11
    assert [f["source"] for f in outcome.reply["faces"]] == [TRACKED]  # 10 frames < 1.5 s at 25 fps


def test_a_lost_state_covers_whole_frames_for_the_hold_then_detects_again(scene, processor, engine):
    frame, box = scene
    state = None
    for seq in range(3):
        state = processor.process(message(seq, frame(seq)), state).state
    # The state is gone (Redis restarted) while the face is occluded: nothing says where it is.
    hold = round(1.5 * 25)
    lost = processor.process(message(3, frame(3, occluded=True)), None, reset=stream.LOST)
    assert lost.reply["reset"] == stream.LOST and lost.reply["covered"] == "frame"
    out = cv2.imdecode(np.frombuffer(lost.reply["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    assert cv2.Laplacian(cv2.cvtColor(out, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var() < 1, "no detail left anywhere"
    assert lost.state["cover_until"] == 3 + hold and lost.state["resets"] == 1
    state = lost.state
    for seq in range(4, 4 + hold):
        outcome = processor.process(message(seq, frame(seq)), state)
        state = outcome.state
        assert outcome.reply["covered"] == "frame", seq
        shown = cv2.imdecode(np.frombuffer(outcome.reply["jpeg"], np.uint8), cv2.IMREAD_COLOR)
        assert engine.detect(shown, threshold=0.3) == [], seq
    after = processor.process(message(4 + hold, frame(4 + hold)), state)
    assert "covered" not in after.reply and after.reply["faces"][0]["source"] == DETECTED


def test_a_lost_state_still_covers_when_its_first_message_is_refused(scene, processor):
    frame, _ = scene
    refused = processor.handle("not json", None, reset=stream.LOST)
    assert refused.reply["code"] == stream.MALFORMED
    # the next frame finds a state (the refusal's), not a lost one: it is still covered
    outcome = processor.handle(stream.encode_frame(message(7, frame(7))), through_json(refused.state))
    assert outcome.reply["covered"] == "frame" and outcome.state["cover_until"] == 7 + round(1.5 * 25)
    assert outcome.reply["dropped"] == 1


def test_drops_are_counted_and_every_reply_reports_them(scene, processor):
    frame, _ = scene
    state = processor.process(message(0, frame(0)), None).state
    dropped = processor.drop(state, 1, stream.BACKLOG)
    assert dropped.reply == {"v": 1, "type": stream.DROP, "seq": 1, "reason": stream.BACKLOG, "dropped": 1}
    dropped = processor.drop(dropped.state, 2, stream.STALE)
    outcome = processor.process(message(3, frame(3)), dropped.state)
    assert outcome.reply["dropped"] == 2 and outcome.state["drops"] == {stream.BACKLOG: 1, stream.STALE: 1}
    with pytest.raises(ValueError):
        processor.drop(state, 4, "tired")


def test_a_returned_frame_is_reencoded_lower_until_the_reply_fits(engine):
    noise = np.random.default_rng(1).integers(0, 255, (360, 640, 3), dtype=np.uint8)
    sent = FrameMessage(0, 0.0, jpeg(noise, 30), quality=95)
    small = StreamProcessor(engine, StreamOptions(reply_limit_bytes=len(sent.jpeg) * 2))
    outcome = small.process(sent, None)
    assert outcome.reply["type"] == stream.RESULT and outcome.reply["quality"] < 95
    assert len(stream.encode_reply(outcome.reply)) <= len(sent.jpeg) * 2
    tiny = StreamProcessor(engine, StreamOptions(reply_limit_bytes=8 * 1024))
    outcome = tiny.process(sent, None)
    assert outcome.reply["type"] == stream.DROP and outcome.reply["reason"] == stream.REPLY_TOO_LARGE
    assert outcome.state["next_seq"] == 1  # the tracks still moved on: the frame was seen
