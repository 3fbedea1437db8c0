"""Acceptance on real videos: coverage through occlusion, scene cuts, audio, frame count."""
from __future__ import annotations

import json

import av
import pytest

from conftest import data_path

pytestmark = pytest.mark.slow


def streams(path):
    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        end = max((p.pts + (p.duration or 0)) * p.time_base for p in c.demux(video=0) if p.pts is not None)
        return {"frames": frames, "end": float(end), "audio": len(c.streams.audio),
                "codec": v.codec_context.name}


@pytest.fixture(scope="module")
def pexels(engine, tmp_path_factory):
    src = data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4")
    out = tmp_path_factory.mktemp("pexels") / "out.mp4"
    report = out.with_suffix(".json")
    summary = engine.anonymize_file(src, out, report=report)
    return src, out, json.loads(report.read_text()), summary


def test_face_covered_on_every_frame_even_under_the_hand(pexels):
    src, out, report, summary = pexels
    frames = report["frames"]
    assert len(frames) == 472
    covered = [bool(f["faces"]) for f in frames]
    assert sum(covered) / len(covered) >= 0.99
    assert all(covered[100:231])
    for f in frames:
        for face in f["faces"]:
            assert face["source"] in ("detected", "tracked", "interpolated")
            assert isinstance(face["track"], int)


def test_output_keeps_audio_frames_and_duration(pexels):
    src, out, report, summary = pexels
    a, b = streams(src), streams(out)
    assert b["codec"] == "h264"
    assert b["frames"] == a["frames"]
    assert b["audio"] == a["audio"] == 1
    assert abs(b["end"] - a["end"]) < 1 / 23.976 + 1e-3
    assert summary["audio"] is True


def test_hevc_scene_cut_and_audio(engine, tmp_path):
    src = data_path("video", "pyfeat_face_noface.mov")
    out, report = tmp_path / "out.mp4", tmp_path / "out.json"
    engine.anonymize_file(src, out, report=report)
    frames = json.loads(report.read_text())["frames"]
    assert len(frames) == 169
    assert all(f["faces"] for f in frames[:60])
    assert not any(f["faces"] for f in frames[80:])
    a, b = streams(src), streams(out)
    assert a["codec"] == "hevc" and b["codec"] == "h264"
    assert b["frames"] == a["frames"] and b["audio"] == 1
    assert abs(b["end"] - a["end"]) < 2 / 26.4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_video_report_is_written_only_when_complete(engine, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    with pytest.raises(Exception):
        engine.anonymize_file(bad, tmp_path / "out.mp4", report=tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4"]


def test_display_rotation_is_applied(engine, tmp_path, astronaut_bgr):
    """A phone video stores frames sideways with a display rotation: faceflow works on, and
    writes, the upright picture."""
    import numpy as np
    upright = np.ascontiguousarray(astronaut_bgr[:384])           # 512 wide, 384 high
    stored = np.ascontiguousarray(np.rot90(upright, k=-1))         # sideways, 384 x 512
    src = tmp_path / "phone.mp4"
    with av.open(str(src), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        s.set_display_rotation(90)  # the player turns it 90° counter-clockwise: upright
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(stored, format="bgr24")
            frame.pts = i
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    report = tmp_path / "r.json"
    summary = engine.anonymize_file(src, tmp_path / "out.mp4", report=report)
    assert (summary["width"], summary["height"]) == (512, 384)
    frames = json.loads(report.read_text())["frames"]
    assert all(len(f["faces"]) == 1 for f in frames)
    with av.open(str(tmp_path / "out.mp4")) as c:
        first = next(c.decode(video=0))
        assert (first.width, first.height) == (512, 384) and first.rotation == 0
    x, y, w, h = frames[0]["faces"][0]["box"]
    expected = engine.detect(upright)[0].box
    assert abs(x - expected[0]) < 10 and abs(y - expected[1]) < 10


@pytest.mark.parametrize("width, height, pix_fmt, written", [
    (383, 287, "yuv420p", "yuv444p"),       # odd width and height: 4:2:0 cannot hold them
    (384, 287, "yuv444p", "yuv444p"),       # odd height, 4:4:4 input
    (384, 288, "yuv422p10le", "yuv420p"),   # 4:2:2, 10 bit
    (383, 288, "yuv422p10le", "yuv444p"),
    (384, 288, "yuv444p", "yuv420p"),
])
def test_any_decodable_size_and_pixel_format_is_processed(engine, low_engine, tmp_path, astronaut_bgr,
                                                          width, height, pix_fmt, written):
    """H.264 in 4:2:0 takes even sizes only: odd sizes are written in 4:4:4 at the same size,
    other pixel formats converted; the summary names the format written. (Was: "Generic
    error in an external library" from the encoder.)"""
    import cv2
    import numpy as np
    picture = cv2.resize(astronaut_bgr, (width, height), interpolation=cv2.INTER_AREA)
    src = tmp_path / f"in_{pix_fmt}.mkv"
    with av.open(str(src), "w") as out:
        s = out.add_stream("ffv1", rate=10)  # lossless, takes any size and format
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(np.roll(picture, i, axis=1), format="bgr24")
            frame.pts = i
            out.mux(s.encode(frame))
        out.mux(s.encode())
    dst = tmp_path / "out.mp4"
    summary = engine.anonymize_file(src, dst, report=tmp_path / "r.json")
    assert summary["pix_fmt"] == written
    frames = json.loads((tmp_path / "r.json").read_text())["frames"]
    assert len(frames) == 6 and all(len(f["faces"]) == 1 for f in frames)
    with av.open(str(dst)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.name, v.codec_context.format.name) == ("h264", written)
        decoded = [f.to_ndarray(format="bgr24") for f in c.decode(v)]
    assert len(decoded) == 6 and decoded[0].shape == (height, width, 3)
    for masked in decoded:
        assert low_engine.detect(masked) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_" + pix_fmt + ".mkv", "out.mp4", "r.json"]


def test_a_failing_operation_stops_every_thread_and_leaves_nothing(engine, tmp_path, astronaut_bgr):
    """The pipeline's threads (decode, encode) end when the main loop fails; no part file."""
    import threading
    import numpy as np
    from faceflow.video import process_video

    src = tmp_path / "in.mp4"
    with av.open(str(src), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 512, 512, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(astronaut_bgr, i, 1)), format="bgr24")
            frame.pts = i
            out.mux(s.encode(frame))
        out.mux(s.encode())

    class Broken:
        def __init__(self):
            self.calls = 0

        def apply(self, pixels, faces):
            self.calls += 1
            if self.calls == 12:
                raise RuntimeError("operation failed")
            return pixels

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="operation failed"):
        process_video(engine, src, tmp_path / "out.mp4", Broken())
    left = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("faceflow")]
    for t in left:
        t.join(timeout=10)
    assert not [t.name for t in left if t.is_alive()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_masks_on_yuv_planes_cover_what_masks_on_bgr_cover(pix_fmt):
    """Video frames are masked on their YUV planes: the same pixels as on BGR, every plane."""
    import numpy as np
    from faceflow.anonymize import MaskOptions, apply_masks
    from faceflow.face import Face
    from faceflow.operations import Mask
    from faceflow.pipeline import Layout

    layout = Layout(320, 240, 0, pix_fmt, 320, 240)
    rng = np.random.default_rng(1)
    data = (rng.integers(30, 220, (3, 240, 320)) if pix_fmt == "yuv444p"
            else rng.integers(30, 220, (360, 320))).astype(np.uint8)
    before = data.copy()
    faces = [Face((40.0, 50.0, 60.0, 70.0), 0.9), Face((250.0, 180.0, 50.0, 80.0), 0.9)]  # one at the edge
    opts = MaskOptions(method="solid")
    Mask(opts).apply_planes(layout.planes(data), layout.subsampling, faces)
    painted = apply_masks(np.zeros((240, 320), np.uint8), faces, MaskOptions(method="solid", color=(1, 1, 1)))
    y_before, y_after = layout.planes(before)[0], layout.planes(data)[0]
    assert np.array_equal(y_after != y_before, painted.astype(bool) & (y_before != 16))
    assert (y_after[painted.astype(bool)] == 16).all()         # black in limited-range YUV
    sx, sy = layout.subsampling
    for k in (1, 2):
        chroma = layout.planes(data)[k]
        inside = painted[::sy, ::sx].astype(bool)               # chroma samples inside the masks
        assert (chroma[inside] == 128).all()
