"""Video in chunks: split at keyframes, chunks processed in parallel (warm-up) or in order
(state carried as JSON), merged without re-encoding. The chunked result must be the one-pass
result, frame for frame, with one track id per face across chunks."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import DATA, data_path
from faceflow import chunks as C
from faceflow.face import Face, iou
from faceflow.images import BadInput
from faceflow.tracker import Tracker
from faceflow.video import VideoOptions, anonymize_video

VIDEOS = sorted(p.name for p in (DATA / "video").glob("*") if p.is_file()) if (DATA / "video").is_dir() \
    else ["(no test videos)"]
PEXELS = "pyfeat_WolfgangLanger_Pexels.mp4"


# --- helpers ---------------------------------------------------------------------------------
def compare(one: list[dict], other: list[dict]) -> dict:
    """Frame for frame: frames where one covered a face the other did not (`differ`), frames
    whose faces do not all pair up with IoU >= 0.9 (`low`), and one-pass id -> chunked ids."""
    assert len(one) == len(other)
    differ, low, ids, back = [], [], {}, {}
    for i, (a, b) in enumerate(zip(one, other)):
        pairs = C._pairs(a["faces"], b["faces"], 0.05)
        if len(pairs) != len(a["faces"]) or len(pairs) != len(b["faces"]):
            differ.append(i)
        if i in differ or any(iou(fa["box"], fb["box"]) < 0.9 for fa, fb in pairs):
            low.append(i)
        for fa, fb in pairs:
            ids.setdefault(fa["track"], set()).add(fb["track"])
            back.setdefault(fb["track"], set()).add(fa["track"])
    return {"differ": differ, "low": low, "ids": ids, "back": back}


def assert_same_faces(one: list[dict], other: list[dict], starts: list[int]) -> dict:
    cmp = compare(one, other)
    assert cmp["differ"] == [], f"frames covered differently: {cmp['differ'][:20]}"
    assert len(cmp["low"]) <= 0.01 * len(one), f"boxes apart (IoU < 0.9) on frames {cmp['low'][:20]}"
    # the first frames of every chunk, where a worker starts
    for s in starts:
        for k in range(s, min(s + 3, len(one))):
            assert len(one[k]["faces"]) == len(other[k]["faces"]), f"chunk start frame {k}"
    # one id per face: the one-pass ids and the merged ids correspond one to one
    assert all(len(v) == 1 for v in cmp["ids"].values()), cmp["ids"]
    assert all(len(v) == 1 for v in cmp["back"].values()), cmp["back"]
    return cmp


def packets(path, kind="video"):
    with av.open(str(path)) as c:
        s = c.streams.video[0] if kind == "video" else c.streams.audio[0]
        return [(p.pts, p.dts, bytes(p)) for p in c.demux(s) if p.size]


def frame_pts(path) -> list[int]:
    with av.open(str(path)) as c:
        return [f.pts for f in c.decode(video=0)]


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def one_pass(engine, tmp_path_factory):
    """The existing one-pass pipeline's report (and output) per video, computed once."""
    cache = {}

    def run(name: str):
        if name not in cache:
            src = data_path("video", name)
            out = tmp_path_factory.mktemp("one") / "out.mp4"
            anonymize_video(engine, src, out, report=out.with_suffix(".json"))
            cache[name] = (src, out, json.loads(out.with_suffix(".json").read_text()))
        return cache[name]
    return run


@pytest.fixture(scope="module")
def chunked(engine, one_pass, tmp_path_factory):
    """process_video_in_chunks per (video, mode), 2 s chunks, work files kept: warm-up mode
    on two worker processes (parallel), state mode in order. Computed once."""
    cache = {}

    def run(name: str, mode: str):
        if (name, mode) not in cache:
            src, _, _ = one_pass(name)
            work = tmp_path_factory.mktemp(mode)
            out, report = work / "out.mp4", work / "out.json"
            summary = C.process_video_in_chunks(engine, src, out, workers=2 if mode == "warmup" else 1,
                                                mode=mode, target_seconds=2.0, report=report,
                                                keep=True, work_dir=work)
            cache[name, mode] = (src, out, json.loads(report.read_text()), summary)
        return cache[name, mode]
    return run


@pytest.fixture(scope="module")
def pexels_parallel(chunked):
    return chunked(PEXELS, "warmup")


# --- 1. parallel chunks = one pass -------------------------------------------------------------
def test_pexels_parallel_matches_one_pass(one_pass, pexels_parallel):
    src, _, ref = one_pass(PEXELS)
    _, out, merged, summary = pexels_parallel
    assert summary["mode"] == "warmup" and summary["chunks"] >= 5
    split = C.split_video(src, Path(summary["work_dir"]) / "again", 2.0)
    starts = [c.start_frame for c in split.chunks]
    assert all(ref["frames"][s]["faces"] for s in starts)  # a face on every chunk's first frame
    cmp = assert_same_faces(ref["frames"], merged["frames"], starts)
    # the face crosses every boundary and keeps one id in the merged report
    assert len(cmp["back"]) == 1 and merged["summary"]["tracks"] == ref["summary"]["tracks"] == 1
    assert [f["frame"] for f in merged["frames"]] == list(range(len(ref["frames"])))


@pytest.mark.parametrize("name", VIDEOS)
def test_every_video_chunked_matches_one_pass(one_pass, chunked, tmp_path, name):
    """Every test video, 2 s chunks, both modes: warm-up (parallel) and state (stream)."""
    src, _, ref = one_pass(name)
    split = C.split_video(src, tmp_path / "split", 2.0)
    assert len(split.chunks) >= 2
    starts = [c.start_frame for c in split.chunks]
    for mode in ("warmup", "state"):
        _, out, merged, summary = chunked(name, mode)
        assert summary["mode"] == mode and summary["chunks"] == len(split.chunks)
        assert summary["frames"] == len(ref["frames"]) == len(frame_pts(out))
        assert_same_faces(ref["frames"], merged["frames"], starts)
        assert merged["summary"]["tracks"] == ref["summary"]["tracks"]
    with_faces = [s for s in starts[1:] if ref["frames"][s]["faces"]]
    assert with_faces, "some chunk after the first must start on a face"


def make_occlusion_clip(engine, path: Path) -> list[int]:
    """640x360, 24 fps, 10 s, a keyframe every second: a slow pan over five faces; faces
    hidden behind grey boxes across chunk boundaries (shorter and longer than the 1.5 s
    hold), and a cut to a faceless picture and back. Returns the keyframe indexes."""
    photo = cv2.imread(str(data_path("images", "pyfeat_multi_face.jpg")))
    other = cv2.resize(cv2.imread(str(data_path("noface", "sklearn_china.jpg"))),
                       (photo.shape[1], photo.shape[0]))
    faces = sorted((f.box for f in engine.detect(photo)), key=lambda b: b[0])
    assert len(faces) == 5
    hidden = {0: (44, 53), 1: (90, 141), 2: (138, 151), 3: (92, 100)}
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 640, 360, "yuv420p"
        s.options = {"crf": "18", "preset": "veryfast", "x264-params": "keyint=24:min-keyint=24:scenecut=0"}
        for i in range(240):
            x0, y0, sc = 60 + i * 0.8, 80 + i * 0.3, 0.75
            src = other if 180 <= i < 200 else photo
            warp = np.float32([[sc, 0, -sc * x0], [0, sc, -sc * y0]])
            bgr = cv2.warpAffine(src, warp, (640, 360), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            for k, (a, b) in hidden.items():
                if src is photo and a <= i < b:
                    x, y, w, h = faces[k]
                    cx, cy, r = sc * (x + w / 2 - x0), sc * (y + h / 2 - y0), sc * max(w, h) * 0.9
                    cv2.rectangle(bgr, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), (128, 128, 128), -1)
            frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
            frame.pts = i
            out.mux(s.encode(frame))
        out.mux(s.encode())
    return list(range(0, 240, 24))


def test_occlusions_and_cuts_across_boundaries(engine, tmp_path):
    """Five faces, holds and interpolations spanning chunk boundaries, a scene cut; 1 s
    chunks. Warm-up mode and state mode give the one-pass boxes; without the look-ahead into
    the next chunk, state mode still covers every face on every frame (the last frames of a
    chunk keep the predicted boxes instead of the interpolated ones)."""
    clip = tmp_path / "clip.mp4"
    make_occlusion_clip(engine, clip)
    anonymize_video(engine, clip, tmp_path / "one.mp4", report=tmp_path / "one.json")
    ref = json.loads((tmp_path / "one.json").read_text())["frames"]
    sources = {f["source"] for e in ref for f in e["faces"]}
    assert {"detected", "tracked", "interpolated"} <= sources
    split = C.split_video(clip, tmp_path / "split", 1.0)
    starts = [c.start_frame for c in split.chunks]
    assert starts == list(range(0, 240, 24))
    for mode in ("warmup", "state"):
        report = tmp_path / f"{mode}.json"
        C.process_video_in_chunks(engine, clip, tmp_path / f"{mode}.mp4", mode=mode,
                                  target_seconds=1.0, report=report)
        got = json.loads(report.read_text())["frames"]
        cmp = assert_same_faces(ref, got, starts)
        assert cmp["low"] == []
        assert sorted(cmp["ids"]) == sorted(v for s in cmp["ids"].values() for v in s)  # same ids
    # state mode without look-ahead: covered alike everywhere, boxes apart only near ends
    state, reports = None, []
    for k, chunk in enumerate(split.chunks):
        _, state = C.process_chunk(engine, chunk, tmp_path / f"n{k}.mp4", state, info=split.info,
                                   report=tmp_path / f"n{k}.json")
        state = json.loads(json.dumps(state))
        reports.append(tmp_path / f"n{k}.json")
    cmp = compare(ref, C.merge_reports(reports)["frames"])
    assert cmp["differ"] == []
    ends = {s - k for s in starts[1:] for k in range(1, VideoOptions().lookahead + 1)}
    assert set(cmp["low"]) <= ends


# --- 2. stream mode: state through JSON, repeatable ---------------------------------------------
def run_stream(engine, split, out_dir: Path, lookahead: bool = True):
    state, outs, reports, states = None, [], [], []
    for k, chunk in enumerate(split.chunks):
        nxt = split.chunks[k + 1] if lookahead and k + 1 < len(split.chunks) else None
        out, rep = out_dir / f"c{k}.mp4", out_dir / f"c{k}.json"
        summary, state = C.process_chunk(engine, chunk, out, state, lookahead=nxt, info=split.info, report=rep)
        text = json.dumps(state)           # what Redis would hold
        assert json.loads(text) == state   # exactly
        states.append(text)
        state = json.loads(text)
        assert summary["frames"] == chunk.frames and summary["mode"] == ("first" if k == 0 else "state")
        outs.append(out)
        reports.append(rep)
    return outs, reports, states


def test_stream_mode_pexels_is_one_pass_and_repeatable(engine, one_pass, tmp_path):
    src, _, ref = one_pass(PEXELS)
    split = C.split_video(src, tmp_path / "split", 2.0)
    runs = []
    for r in range(2):
        d = tmp_path / f"run{r}"
        outs, reports, states = run_stream(engine, split, d)
        merge = C.merge_chunks(outs, d / "out.mp4", audio=split.audio, info=split.info)
        runs.append({"chunks": [digest(o) for o in outs], "out": digest(d / "out.mp4"),
                     "report": C.merge_reports(reports), "states": states, "merge": merge})
    a, b = runs
    assert a["chunks"] == b["chunks"] and a["out"] == b["out"]
    assert a["report"] == b["report"] and a["states"] == b["states"]
    assert_same_faces(ref["frames"], a["report"]["frames"], [c.start_frame for c in split.chunks])
    assert a["report"]["frames"] == [{**e, "frame": i} for i, e in enumerate(ref["frames"])]
    last = json.loads(a["states"][-1])
    assert last["next_frame"] == len(ref["frames"]) and last["chunks"] == len(split.chunks)


def test_stream_of_uploads_restarting_at_zero(engine, tmp_path, astronaut_bgr):
    """Uploaded pieces whose clocks each start at 0 (with audio): the report's times and the
    merged file continue; the chunks' own audio is joined."""
    pieces = []
    for k in range(3):
        path = tmp_path / f"up{k}.mp4"
        with av.open(str(path), "w") as out:
            v = out.add_stream("libx264", rate=10)
            v.width, v.height, v.pix_fmt = 512, 384, "yuv420p"
            a = out.add_stream("aac", rate=48000)
            a.layout = "mono"
            for i in range(20):
                img = np.ascontiguousarray(np.roll(astronaut_bgr[:384], 4 * (20 * k + i), axis=1))
                f = av.VideoFrame.from_ndarray(img, format="bgr24")
                f.pts = i
                out.mux(v.encode(f))
            for j in range(0, 96000, 1024):
                t = (j + np.arange(1024)) / 48000
                af = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                                format="fltp", layout="mono")
                af.sample_rate, af.pts = 48000, j
                out.mux(a.encode(af))
            out.mux(v.encode())
            out.mux(a.encode())
        pieces.append(path)
    state, outs, reports = None, [], []
    for k, p in enumerate(pieces):
        summary, state = C.process_chunk(engine, p, tmp_path / f"o{k}.mp4", state, report=tmp_path / f"o{k}.json")
        state = json.loads(json.dumps(state))
        outs.append(tmp_path / f"o{k}.mp4")
        reports.append(tmp_path / f"o{k}.json")
    report = C.merge_reports(reports)
    times = [e["time"] for e in report["frames"]]
    assert len(times) == 60 and all(b > a for a, b in zip(times, times[1:]))
    assert abs(times[20] - 2.0) < 1e-3 and abs(times[40] - 4.0) < 1e-3
    assert all(len(e["faces"]) == 1 for e in report["frames"])
    assert {f["track"] for e in report["frames"] for f in e["faces"]} == {1}
    merged = C.merge_chunks(outs, tmp_path / "all.mp4")
    assert merged["frames"] == 60 and merged["moved"] == [1, 2] and merged["audio"]
    assert abs(merged["duration"] - 6.0) < 1e-6
    pts = frame_pts(tmp_path / "all.mp4")
    assert len(pts) == 60 and pts == sorted(pts) and len(set(pts)) == 60
    # every piece's audio, less the priming packet that overlaps the piece before
    audio = packets(tmp_path / "all.mp4", "audio")
    assert len(audio) == merged["audio_packets"] == sum(len(packets(o, "audio")) for o in outs) - 2
    assert [p[0] for p in audio] == sorted({p[0] for p in audio})
    assert abs(audio[-1][0] / 48000 - 6.0) < 0.05


# --- 3. split and merge are remuxes; audio, frames, duration --------------------------------------
def test_split_is_a_remux_at_keyframes(tmp_path):
    src = data_path("video", PEXELS)
    split = C.split_video(src, tmp_path, 2.0)
    source = packets(src)
    joined = [p for c in split.chunks for p in packets(c.path)]
    assert joined == source  # same bytes, same timestamps
    for c in split.chunks:
        with av.open(c.path) as f:
            first = next(p for p in f.demux(video=0) if p.size)
            assert first.is_keyframe and not f.streams.audio
        assert abs(c.start_time - c.start_frame * 1001 / 24000) < 1e-9
    assert sum(c.frames for c in split.chunks) == split.info["frames"] == 472
    assert abs(sum(c.duration for c in split.chunks) - split.info["duration"]) < 1e-9
    assert packets(split.audio, "audio") == packets(src, "audio")
    again = C.SplitResult.from_dict(json.loads(json.dumps(split.to_dict())))
    assert again == split
    # a chunk decodes to the very pixels of those frames in the source
    k = split.chunks[2]
    with av.open(k.path) as c:
        mine = next(c.decode(video=0)).to_ndarray(format="bgr24")
    with av.open(str(src)) as c:
        theirs = next(f for i, f in enumerate(c.decode(video=0)) if i == k.start_frame).to_ndarray(format="bgr24")
    assert np.array_equal(mine, theirs)


def test_merge_keeps_audio_frames_duration_and_does_not_reencode(pexels_parallel):
    src, out, merged, summary = pexels_parallel
    work = Path(summary["work_dir"])
    chunk_outs = sorted((work / "out").glob("chunk_*.mp4"))
    assert len(chunk_outs) == summary["chunks"]
    # the video packets are the chunks' packets, byte for byte (no re-encode)
    assert [p[2] for p in packets(out)] == [p[2] for c in chunk_outs for p in packets(c)]
    # the original audio, packet for packet
    assert packets(out, "audio") == packets(src, "audio")
    # frame count, timestamps and duration of the source
    assert frame_pts(out) == frame_pts(src)
    with av.open(str(src)) as a, av.open(str(out)) as b:
        end = lambda c: max((p.pts + p.duration) * p.time_base for p in c.demux(video=0) if p.size)
        assert abs(float(end(a)) - float(end(b))) <= 1001 / 24000 + 1e-6
        assert b.streams.video[0].codec_context.name == "h264"
    # it decodes cleanly: every frame as the chunks decode on their own, boundaries included
    def frame_hashes(paths):
        out = []
        for p in paths:
            with av.open(str(p)) as c:
                out += [hashlib.md5(f.to_ndarray(format="yuv420p").tobytes()).hexdigest() for f in c.decode(video=0)]
        return out
    assert frame_hashes([out]) == frame_hashes(chunk_outs)
    # merging is a copy: a small share of the time
    t = summary["timing"]
    assert t["merge_s"] < 0.1 * t["process_s"]
    assert summary["frames"] == 472 and summary["audio"]


def test_rotated_video_in_chunks(engine, tmp_path, astronaut_bgr):
    upright = np.ascontiguousarray(astronaut_bgr[:384])
    stored = np.ascontiguousarray(np.rot90(upright, k=-1))
    src = tmp_path / "phone.mp4"
    with av.open(str(src), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        s.options = {"x264-params": "keyint=10:min-keyint=10:scenecut=0"}
        s.set_display_rotation(90)
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.roll(stored, 3 * i, axis=0), format="bgr24")
            frame.pts = i
            out.mux(s.encode(frame))
        out.mux(s.encode())
    anonymize_video(engine, src, tmp_path / "one.mp4", report=tmp_path / "one.json")
    ref = json.loads((tmp_path / "one.json").read_text())["frames"]
    summary = C.process_video_in_chunks(engine, src, tmp_path / "out.mp4", mode="warmup",
                                        target_seconds=1.0, report=tmp_path / "out.json")
    assert summary["chunks"] == 4
    got = json.loads((tmp_path / "out.json").read_text())["frames"]
    assert_same_faces(ref, got, [0, 10, 20, 30])
    assert all(len(e["faces"]) == 1 for e in got)
    with av.open(str(tmp_path / "out.mp4")) as c:
        first = next(c.decode(video=0))
        assert (first.width, first.height) == (512, 384) and first.rotation == 0


# --- 4. bad input -----------------------------------------------------------------------------
def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".part" in p.name)


def test_bad_chunk_is_refused_and_nothing_is_written(engine, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    out = tmp_path / "out"
    out.mkdir()
    for src in (bad, text, tmp_path / "absent.mp4"):
        with pytest.raises(BadInput):
            C.process_chunk(engine, src, out / "c.mp4", report=out / "c.json")
    with pytest.raises(BadInput):
        C.split_video(text, out / "split")
    assert list(out.rglob("*")) == []
    with pytest.raises(BadInput):
        C.check_state({"format": "something else"})


def test_bad_neighbours_fail_before_writing(engine, tmp_path):
    src = data_path("video", "pyfeat_face_noface.mov")
    split = C.split_video(src, tmp_path / "split", 2.0)
    bad = tmp_path / "bad.mp4"
    bad.write_text("no")
    out = tmp_path / "out"
    out.mkdir()
    for kwargs in ({"warmup": bad}, {"lookahead": bad}):
        with pytest.raises(BadInput):
            C.process_chunk(engine, split.chunks[1], out / "c.mp4", info=split.info,
                            report=out / "c.json", **kwargs)
    assert list(out.iterdir()) == []


def test_merge_refuses_missing_bad_or_mismatched_chunks(engine, tmp_path):
    src = data_path("video", "pyfeat_face_noface.mov")
    split = C.split_video(src, tmp_path / "split", 2.0)
    outs = []
    for k, c in enumerate(split.chunks):
        C.process_chunk(engine, c, tmp_path / f"c{k}.mp4", info=split.info, video_options=VideoOptions(lookahead=0))
        outs.append(tmp_path / f"c{k}.mp4")
    dst = tmp_path / "merged" / "out.mp4"
    dst.parent.mkdir()
    missing = [outs[0], tmp_path / "gone.mp4", *outs[2:]]
    with pytest.raises(BadInput, match="chunk 1 is missing"):
        C.merge_chunks(missing, dst, audio=split.audio, info=split.info)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 500)
    with pytest.raises(BadInput, match="chunk 1"):
        C.merge_chunks([outs[0], junk, *outs[2:]], dst, audio=split.audio)
    with pytest.raises(BadInput, match="missing or incomplete"):
        C.merge_chunks(outs[:-1], dst, audio=split.audio, info=split.info)   # the last left out
    with pytest.raises(BadInput, match="gap between chunk 0"):
        C.merge_chunks([outs[0], outs[2]], dst, audio=split.audio, info=split.info)
    with pytest.raises(BadInput, match="audio"):
        C.merge_chunks(outs, dst, audio=tmp_path / "no-audio.m4a")
    # a chunk from another video (other size): cannot be joined without re-encoding
    other = C.split_video(data_path("video", PEXELS), tmp_path / "other", 2.0)
    C.process_chunk(engine, other.chunks[0], tmp_path / "x.mp4", info=other.info)
    with pytest.raises(BadInput, match="not encoded like"):
        C.merge_chunks([outs[0], tmp_path / "x.mp4"], dst)
    with pytest.raises(BadInput):
        C.merge_chunks([], dst)
    assert list(dst.parent.iterdir()) == []
    # and the good list merges, keeping the audio and the frame count
    summary = C.merge_chunks(outs, dst, audio=split.audio, info=split.info)
    assert summary["frames"] == 169 and summary["audio"] and leftovers(dst.parent) == []
    assert packets(dst, "audio") == packets(src, "audio")


# --- state and report merging, without video ------------------------------------------------------
def test_state_is_plain_json_and_round_trips_exactly():
    tr = Tracker(fps=10)
    rng = np.random.default_rng(1)
    for i in range(12):
        dets = [Face((10.0 + 3.3 * i, 20.0, 40.0 - i, 40.0), 0.9)] if i < 8 else []  # held at the end
        tr.update(i, dets, rng.integers(0, 255, (36, 64, 3), dtype=np.uint8))
    state = tr.state()
    assert len(state["tracks"][0]["pending"]) == 4
    assert json.loads(json.dumps(state)) == state
    again = Tracker.from_state(json.loads(json.dumps(state)))
    assert again.state() == state
    # found again: the restored held boxes line up with their frames
    a, b = Tracker.from_state(state), Tracker.from_state(state)
    del b.tracks[0].pending[:2]  # an older state without them still interpolates right
    fa = a.update(12, [Face((60.0, 20.0, 30.0, 40.0), 0.9)])
    fb = b.update(12, [Face((60.0, 20.0, 30.0, 40.0), 0.9)])
    assert fa[0].box == fb[0].box and fa[0].track == fb[0].track == 1


def test_held_box_never_shrinks_to_nothing():
    tr = Tracker(fps=25)
    for i, w in enumerate([100.0, 80.0, 60.0, 40.0]):   # a hand slides in: the box shrinks
        tr.update(i, [Face((100.0, 100.0, w, 100.0), 0.9)])
    held = [tr.update(i, [])[0] for i in range(4, 20)]
    assert all(f.box[2] >= 40.0 and f.box[3] >= 100.0 for f in held)


def test_merge_reports_relabels_through_the_warmup():
    def face(x, track):
        return {"box": [x, 10.0, 50.0, 50.0], "score": 0.9, "track": track, "source": "detected"}
    first = {"source": "a", "chunk": {"index": 0, "mode": "first"}, "warmup": [],
             "frames": [{"frame": i, "time": i / 10, "faces": [face(0, 1), face(100, 2)]} for i in range(5)]}
    # chunk 1's worker saw the last 3 frames of chunk 0 in its warm-up, with its own ids
    second = {"source": "b", "chunk": {"index": 1, "mode": "warmup"},
              "warmup": [{"frame": i, "time": i / 10, "faces": [face(100.5, 1), face(0.5, 2)]} for i in range(2, 5)],
              "frames": [{"frame": i, "time": i / 10, "faces": [face(100, 1), face(0, 2), face(300, 3)]}
                         for i in range(5, 8)]}
    merged = C.merge_reports([first, second])
    tracks = [sorted((f["box"][0], f["track"]) for f in e["faces"]) for e in merged["frames"]]
    assert tracks[4] == [(0, 1), (100, 2)]
    assert tracks[5] == [(0, 1), (100, 2), (300, 3)]
    assert [e["frame"] for e in merged["frames"]] == list(range(8))
    assert merged["summary"]["tracks"] == 3
    assert second["frames"][0]["faces"][0]["track"] == 1  # inputs left alone


def test_warmup_reaches_back_over_short_chunks():
    chunks = [C.Chunk(k, f"c{k}.mp4", k * 1.0, 24, 1.0, start_frame=24 * k) for k in range(4)]
    split = C.SplitResult(chunks, None, {"fps": 24.0})
    need = C.warmup_frames(24.0)
    assert need == 36 + 12
    assert C.warmup_for(split, 0) == []
    assert [c.index for c in C.warmup_for(split, 1)] == [0]
    assert [c.index for c in C.warmup_for(split, 3)] == [1, 2]


def test_chunk_report_names_what_the_caller_says(engine, tmp_path):
    """The report is written once with the names given (not rewritten after the fact)."""
    src = data_path("video", "pyfeat_face_noface.mov")
    split = C.split_video(src, tmp_path / "split", 2.0)
    report = tmp_path / "c.json"
    summary, _ = C.process_chunk(engine, split.chunks[0], tmp_path / "c.mp4", info=split.info, report=report,
                                 names=("store://in/chunk-0.mov", "store://out/chunk-0.mp4"))
    written = json.loads(report.read_text())
    assert written["source"] == summary["source"] == written["summary"]["source"] == "store://in/chunk-0.mov"
    assert summary["output"] == written["summary"]["output"] == "store://out/chunk-0.mp4"
