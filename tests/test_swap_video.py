"""Face swap on video: frame count, timestamps and audio kept, the mark in the container's
metadata (read with PyAV), and a face the detector loses (something in front of it) faded out
instead of pasted over what covers it, then faded back in."""
from __future__ import annotations

import json

import av
import cv2
import numpy as np
import pytest

from faceflow import synthetic
from faceflow.face import DETECTED, TRACKED, Face
from faceflow.swap import FADE_FRAMES, Swap, SwapOptions

from conftest import data_path

FPS = 10
FRAMES = 40
COVERED = range(15, 25)   # frames with a grey card in front of the face


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


@pytest.mark.slow
def test_real_video_keeps_frames_timing_audio_and_is_marked(engine, tmp_path):
    src = data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4")
    source = data_path("images", "pyfeat_multi_face.jpg").read_bytes()
    out = tmp_path / "out.mp4"
    summary = engine.swap_file(src, out, source, SwapOptions(face_index=1, largest=True))
    pts_in, audio_in, _ = _timeline(src)
    pts_out, audio_out, metadata = _timeline(out)
    assert len(pts_out) == len(pts_in) == 472
    assert np.allclose(pts_out, pts_in, atol=1e-4)
    assert audio_in == audio_out == 1
    assert metadata[synthetic.DIGITAL_SOURCE_TYPE_TAG] == synthetic.COMPOSITE_SYNTHETIC
    (track,) = summary["swapped_tracks"]
    assert track["frames_swapped"] >= 460


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
