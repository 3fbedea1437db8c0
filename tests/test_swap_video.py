"""Face swap on video: frame count, timestamps and audio kept, the mark in the container's
metadata (read with PyAV), and a face the detector loses (something in front of it) or still
finds with something in front of it (OcclusionCue: a hand over the mouth) faded out instead of
pasted over what covers it, then faded back in."""
from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from faceflow import synthetic
from faceflow.face import DETECTED, TRACKED, Face
from faceflow.swap import FADE_FRAMES, OcclusionCue, Swap, SwapOptions

from conftest import data_path

FPS = 10
FRAMES = 40
COVERED = range(15, 25)   # frames with a grey card in front of the face
# The Pexels clip's hand frames and clear frames, labelled by eye (coarse: see the file).
PEXELS_LABELS = json.loads((Path(__file__).parent / "data" / "pexels_hand_frames.json").read_text())


def _labelled(kind: str) -> list[int]:
    return [i for first, last in PEXELS_LABELS[kind] for i in range(first, last + 1)]


def _timeline(path):
    """(video pts in seconds, audio streams, container metadata)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        pts = sorted(float(p.pts * p.time_base) for p in c.demux(stream) if p.pts is not None)
        return pts, len(c.streams.audio), dict(c.metadata)


def _frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def card_video(tmp_path_factory, astronaut_bgr):
    """The astronaut drifting right, a grey card in front of her face on COVERED frames, and
    a mono AAC sine tone."""
    path = tmp_path_factory.mktemp("card") / "card.mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 512, 512, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for i in range(FRAMES):
            image = np.ascontiguousarray(np.roll(astronaut_bgr, i, axis=1))
            if i in COVERED:
                cv2.rectangle(image, (130 + i, 0), (330 + i, 260), (128, 128, 128), -1)
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode())
        t = np.arange(16000 * FRAMES // FPS) / 16000
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            chunk = tone[start:start + 1024]
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="fltp", layout="mono")
            frame.sample_rate = 16000
            out.mux(audio.encode(frame))
        out.mux(audio.encode())
    return path


@pytest.fixture(scope="module")
def swapped_card(engine, card_video, astronaut_bgr, tmp_path_factory):
    source = cv2.imencode(".jpg", cv2.flip(astronaut_bgr, 1))[1].tobytes()  # her mirror image
    out = tmp_path_factory.mktemp("swapped") / "card.mp4"
    report = out.with_suffix(".json")
    summary = engine.swap_file(card_video, out, source, report=report)
    return out, summary, json.loads(report.read_text())


def test_frames_timestamps_and_audio_are_kept_and_the_mark_is_in_the_container(card_video, swapped_card):
    out, summary, _ = swapped_card
    pts_in, audio_in, _ = _timeline(card_video)
    pts_out, audio_out, metadata = _timeline(out)
    assert len(pts_out) == len(pts_in) == FRAMES
    assert np.allclose(pts_out, pts_in, atol=1e-6)
    assert audio_in == audio_out == 1 and summary["audio"] is True
    assert metadata[synthetic.DIGITAL_SOURCE_TYPE_TAG] == synthetic.COMPOSITE_SYNTHETIC
    assert synthetic.COMPOSITE_SYNTHETIC in metadata["comment"]
    assert summary["marking"] == {"synthetic": True, "digital_source_type": synthetic.COMPOSITE_SYNTHETIC,
                                  "where": "container metadata"}


def test_a_covered_face_is_faded_out_not_pasted_over_the_cover(card_video, swapped_card):
    out, summary, report = swapped_card
    before, after = _frames(card_video), _frames(out)
    frames = report["frames"]

    def change(i, region):
        return np.abs(after[i][region].astype(int) - before[i][region].astype(int)).mean()
    for i in range(2, COVERED.start):
        assert frames[i]["faces"][0]["swap"]["swapped"], i
        assert change(i, np.s_[60:200, 180 + i:300 + i]) > 6, f"frame {i} not swapped"
    for i in COVERED:
        card = np.s_[0:260, 130 + i:330 + i]
        records = [f["swap"] for f in frames[i]["faces"]]
        assert all(f["source"] != DETECTED for f in frames[i]["faces"]), f"frame {i}: the card hides the face"
        if i >= COVERED.start + FADE_FRAMES - 1:
            assert not any(r["swapped"] for r in records), i
            # the card stays a flat grey (a face pasted on it would not be), up to coding noise
            assert after[i][card].std() < 3 and change(i, card) < 4, f"frame {i}: pasted over the card"
    faded = [frames[i]["faces"][0]["swap"]["opacity"] for i in COVERED[:FADE_FRAMES - 1] if frames[i]["faces"]]
    assert faded == sorted(faded, reverse=True) and faded[0] < 1.0
    back = COVERED.stop + FADE_FRAMES
    assert frames[back]["faces"][0]["swap"] == {"engine": "landmark", "swapped": True, "opacity": 1.0}
    assert change(back, np.s_[60:200, 180 + back:300 + back]) > 6
    (track,) = summary["swapped_tracks"]
    assert track["frames_faded"] >= FADE_FRAMES - 1 and track["frames_not_swapped"] >= len(COVERED) - FADE_FRAMES


def test_fade_and_smoothing_state_per_track(astronaut_bgr):
    """Without a model: a stand-in engine records what the Swap operation asks it to paste."""
    class Recorder:
        name, digital_source_type, needs_mesh = "landmark", synthetic.COMPOSITE_SYNTHETIC, True

        def __init__(self):
            self.pasted = []

        def meshes(self, bgr, faces):
            return [np.full((468, 2), f.box[0], np.float32) for f in faces]

        def paste(self, bgr, source, points, opacity, still):
            self.pasted.append((float(points[0, 0]), opacity))
            return True

    recorder = Recorder()
    swap = Swap(recorder, source=None, options=SwapOptions(), fps=25)
    image = astronaut_bgr.copy()
    for i in range(3):
        swap.apply(image, [Face(box=(100 + i, 100, 80, 80), score=0.9, track=1)])
    for i in range(FADE_FRAMES + 2):
        swap.apply(image, [Face(box=(103 + i, 100, 80, 80), score=0.5, track=1, source=TRACKED)])
    opacities = [o for _, o in recorder.pasted]
    assert opacities[:3] == [1.0, 1.0, 1.0]
    assert opacities[3:] == pytest.approx([1 - k / FADE_FRAMES for k in range(1, FADE_FRAMES)])
    # the lost face's points follow its box
    assert recorder.pasted[4][0] - recorder.pasted[3][0] == pytest.approx(1.0)
    assert swap.tracks()[0]["frames_not_swapped"] == 3
    # selected tracks only
    only = Swap(Recorder(), None, SwapOptions(tracks={2}))
    faces = [Face(box=(0, 0, 50, 50), score=0.9, track=1), Face(box=(60, 0, 50, 50), score=0.9, track=2)]
    only.apply(image, faces)
    assert [f.attributes["swap"]["swapped"] for f in faces] == [False, True]


def test_smoothing_reduces_jitter():
    from faceflow.smoothing import OneEuroFilter
    rng = np.random.default_rng(3)
    still = np.full((468, 2), 200.0, np.float32)
    smooth = OneEuroFilter(25)
    raw = [still + rng.normal(0, 1.5, still.shape).astype(np.float32) for _ in range(50)]
    out = [smooth(p, scale=200) for p in raw]
    jitter = lambda seq: np.sqrt(np.mean(np.diff(np.stack(seq), axis=0) ** 2))  # noqa: E731
    assert jitter(out[10:]) < 0.35 * jitter(raw[10:])
    # a steady move is followed, not left behind
    moving = OneEuroFilter(25)
    for k in range(50):
        last = moving(still + 4.0 * k, scale=200)
    assert np.abs(last - (still + 4.0 * 49)).max() < 8


@pytest.fixture(scope="module")
def swapped_pexels(engine, tmp_path_factory):
    """The Pexels clip (a hand over her mouth on frames 58-228) swapped, with its report."""
    src = data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4")
    source = data_path("images", "pyfeat_multi_face.jpg").read_bytes()
    out = tmp_path_factory.mktemp("pexels") / "out.mp4"
    report = out.with_suffix(".json")
    summary = engine.swap_file(src, out, source, SwapOptions(face_index=1, largest=True), report=report)
    return src, out, summary, json.loads(report.read_text())


@pytest.mark.slow
def test_real_video_keeps_frames_timing_audio_and_is_marked(swapped_pexels):
    src, out, summary, _ = swapped_pexels
    pts_in, audio_in, _ = _timeline(src)
    pts_out, audio_out, metadata = _timeline(out)
    assert len(pts_out) == len(pts_in) == 472
    assert np.allclose(pts_out, pts_in, atol=1e-4)
    assert audio_in == audio_out == 1
    assert metadata[synthetic.DIGITAL_SOURCE_TYPE_TAG] == synthetic.COMPOSITE_SYNTHETIC
    (track,) = summary["swapped_tracks"]
    assert track["frames_swapped"] >= len(_labelled("clear"))


@pytest.mark.slow
def test_real_video_hand_frames_are_not_pasted_over_and_clear_frames_are_swapped(swapped_pexels):
    """YuNet finds her face at ~0.9 with the hand over it: the mesh's presence cue fades the
    paste out within FADE_FRAMES of the hand's arrival, and the output's face box is the
    input's (up to re-encoding) until the hand has gone."""
    src, out, _, report = swapped_pexels
    frames = report["frames"]
    before, after = _frames(src), _frames(out)

    def record(i):
        (face,) = frames[i]["faces"]
        return face

    def change(i):
        x, y, w, h = (int(v) for v in record(i)["box"])
        box = np.s_[max(0, y):y + h, max(0, x):x + w]
        return np.abs(after[i][box].astype(int) - before[i][box].astype(int)).mean()
    hand = _labelled("hand")
    # The labels are coarse (the first hand frame shows fingertips at the chin): the cue may
    # catch the hand a frame late, and the paste has faded out FADE_FRAMES - 1 frames later.
    assert record(hand[1])["swap"]["occluded"] and record(hand[1])["swap"]["opacity"] < 1.0
    settled = hand[FADE_FRAMES:]
    assert all(record(i)["source"] == DETECTED for i in settled)  # the detector did not lose it
    pasted = [i for i in settled if record(i)["swap"]["swapped"]]
    assert not pasted, f"pasted over the hand on frames {pasted}"
    # re-encoding only: its mean difference in the box is ~2.5 here, a swapped face's 12 or more
    assert max(change(i) for i in settled) < 4
    clear = _labelled("clear")
    full = [i for i in clear if record(i)["swap"].get("opacity") == 1.0]
    assert len(full) == len(clear), sorted(set(clear) - set(full))
    assert min(change(i) for i in clear) > 6


def test_occlusion_cue_compares_a_face_with_its_own_earlier_frames():
    rng = np.random.default_rng(5)
    # a face whose presence logit sits near 50, then a hand (a drop to ~35), lingering at the
    # lips (~42: still covered, the cue holds until the face is back near its own level)
    cue = OcclusionCue()
    clear = [cue.update(v) for v in 50 + rng.uniform(-6, 6, 60)]
    assert not any(clear)
    assert all(cue.update(v) for v in [35, 30, 20, 38, 42, 43, 41])
    assert cue.update(None)   # no cue this frame: the state holds
    assert not cue.update(49.0)
    # another face, whose clear level is 8: the same drops in logits are relative to it
    low = OcclusionCue()
    assert not any(low.update(v) for v in 8 + rng.uniform(-2, 2, 60))
    assert low.update(1.0)
    assert not OcclusionCue().update(-10.0)   # a first frame is its own reference


def test_presence_drops_when_a_patch_covers_the_mouth_and_the_detector_still_finds_the_face(
        engine, astronaut_bgr):
    """The cue's signal on a real model: a skin-coloured card over her mouth and chin (the
    detector still scores the face ~0.9) lowers the mesh's presence logit far past
    OcclusionCue's threshold."""
    from faceflow.facemesh import FaceMesh
    from faceflow.swap import OCCLUSION_ENTER_DROP
    face = max(engine.detect(astronaut_bgr), key=lambda f: f.size)
    mesh = FaceMesh()
    (points,), (clear,) = mesh.run_with_presence(astronaut_bgr, [face])
    assert np.allclose(mesh.run(astronaut_bgr, [face])[0], points)
    covered = _patch_over_mouth(astronaut_bgr, face)
    (hidden,) = engine.detect(covered)
    assert hidden.score > 0.6
    (_,), (presence,) = mesh.run_with_presence(covered, [hidden])
    assert presence < clear * (1 - 2 * OCCLUSION_ENTER_DROP)


def _patch_over_mouth(bgr, face) -> np.ndarray:
    """A skin-coloured card from just under the nose to below the chin (a hand's place)."""
    x, y, w, h = (int(v) for v in face.box)
    nose = face.landmarks[2]
    out = bgr.copy()
    cv2.rectangle(out, (x - 10, int(nose[1]) + 5), (x + w + 10, y + h + 20), (175, 197, 234), -1)
    return out


def test_a_detected_face_with_a_hand_over_the_mouth_is_faded_out_and_back_in(astronaut_bgr):
    """Without a model: a stand-in engine gives presence logits; the paste fades out over
    FADE_FRAMES while the face is judged covered and back in once it is clear."""
    class Recorder:
        name, digital_source_type, needs_mesh = "landmark", synthetic.COMPOSITE_SYNTHETIC, True

        def __init__(self, presence):
            self.presence, self.pasted = iter(presence), []

        def meshes_with_presence(self, bgr, faces):
            return [np.full((468, 2), f.box[0], np.float32) for f in faces], [next(self.presence) for _ in faces]

        def paste(self, bgr, source, points, opacity, still):
            self.pasted.append(opacity)
            return True

    presence = [50.0] * 10 + [30.0] * 10 + [50.0] * 10
    recorder = Recorder(presence)
    swap = Swap(recorder, source=None, options=SwapOptions(), fps=25)
    records = []
    for i in range(len(presence)):
        face = Face(box=(100 + i, 100, 80, 80), score=0.9, track=1)
        swap.apply(astronaut_bgr, [face])
        records.append(face.attributes["swap"])
    assert all(r == {"engine": "landmark", "swapped": True, "opacity": 1.0} for r in records[:10])
    assert [r["opacity"] for r in records[10:10 + FADE_FRAMES - 1]] == pytest.approx(
        [1 - k / FADE_FRAMES for k in range(1, FADE_FRAMES)])
    assert all(r["occluded"] for r in records[10:20])
    assert all(r == {"engine": "landmark", "swapped": False, "opacity": 0.0, "occluded": True,
                     "reason": "occluded"} for r in records[10 + FADE_FRAMES - 1:20])
    assert [r["opacity"] for r in records[20:20 + FADE_FRAMES]] == pytest.approx(
        [k / FADE_FRAMES for k in range(1, FADE_FRAMES + 1)])
    (track,) = swap.tracks()
    assert track["frames_occluded"] == 10 and track["frames_swapped"] == 10 + FADE_FRAMES - 1 + 10


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_swapping_on_the_planes_matches_swapping_in_bgr(engine, astronaut_bgr, pix_fmt):
    """The video path converts only the region around the faces; the result is the full-frame
    BGR path's up to conversion rounding, and no pixel away from the face changes."""
    from faceflow.pipeline import Layout
    source = cv2.imencode(".jpg", cv2.flip(astronaut_bgr, 1))[1].tobytes()
    # odd sizes are written in 4:4:4; 510 rows: chroma planes that do not fill whole rows
    image = np.ascontiguousarray(astronaut_bgr[:511, :511] if pix_fmt == "yuv444p" else astronaut_bgr[:510, :])
    layout = Layout.of(image.shape[1], image.shape[0], 0, 640)
    assert layout.pix_fmt == pix_fmt
    data = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format=layout.pix_fmt).to_ndarray()
    faces = engine.detect(image)
    for face in faces:
        face.track = 1
    on_planes, in_bgr = engine.swap_operation(source), engine.swap_operation(source)
    planes_data = data.copy()
    on_planes.apply_planes(layout.planes(planes_data), layout.subsampling, faces)
    bgr = av.VideoFrame.from_ndarray(data, format=layout.pix_fmt).to_ndarray(format="bgr24")
    expected = in_bgr.apply(bgr.copy(), [Face(box=f.box, score=f.score, landmarks=f.landmarks, track=1)
                                        for f in faces])
    got = av.VideoFrame.from_ndarray(planes_data, format=layout.pix_fmt).to_ndarray(format="bgr24")
    x, y, w, h = (int(v) for v in faces[0].box)
    face_area = np.s_[y:y + h, x:x + w]
    assert np.abs(got[face_area].astype(int) - bgr[face_area].astype(int)).mean() > 6   # swapped
    assert np.abs(got[face_area].astype(int) - expected[face_area].astype(int)).mean() < 1.5
    y_before, y_after = layout.planes(data)[0], layout.planes(planes_data)[0]
    far = np.ones(y_before.shape, bool)
    far[max(0, y - h):y + 2 * h, max(0, x - w):x + 2 * w] = False
    assert np.array_equal(y_before[far], y_after[far])


def test_frames_whose_height_is_4k_plus_2_are_processed(engine, tmp_path, astronaut_bgr):
    """A 4:2:0 frame 270 or 510 rows high: its chroma planes do not fill whole rows of the
    decoder's array (was: "cannot reshape array" from pipeline.Layout.planes, for anonymize
    and swap alike)."""
    from faceflow.pipeline import Layout
    data = av.VideoFrame.from_ndarray(np.zeros((510, 512, 3), np.uint8), format="bgr24") \
        .reformat(format="yuv420p").to_ndarray()
    planes = Layout.of(512, 510, 0, 640).planes(data)
    assert [p.shape for p in planes] == [(510, 512), (255, 256), (255, 256)]
    planes[2][-1, -1] = 7
    assert data.reshape(-1)[-1] == 7  # views: operations write into the frame
    src = tmp_path / "in.mp4"
    with av.open(str(src), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 480, 270, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(cv2.resize(astronaut_bgr, (480, 270)), format="bgr24")
            frame.pts = i
            out.mux(s.encode(frame))
        out.mux(s.encode())
    summary = engine.anonymize_file(src, tmp_path / "anonymized.mp4")
    assert summary["frames"] == 4 and summary["faces"] == 4
    source = cv2.imencode(".jpg", astronaut_bgr)[1].tobytes()
    summary = engine.swap_file(src, tmp_path / "swapped.mp4", source)
    assert summary["frames"] == 4 and summary["swapped_tracks"][0]["frames_swapped"] == 4
