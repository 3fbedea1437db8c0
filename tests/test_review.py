"""Review: an edited report rendered exactly (faceflow.review, `anonymize --from-report`):
faces removed, exempted or drawn by hand on photos; tracks dropped or exempted and boxes drawn
by hand, then followed, on videos; bad reports refused with the field named."""
from __future__ import annotations

import copy
import json

import av
import numpy as np
import pytest

from conftest import data_path, run_cli
from faceflow import images, review
from faceflow.anonymize import MaskOptions, mask_region
from faceflow.face import Face, iou


@pytest.fixture()
def no_detector(monkeypatch):
    """Any detection fails the test: the render must not detect."""
    from faceflow import detectors

    def refuse(*args, **kwargs):
        raise AssertionError("the detector ran")
    for cls in {detectors.Detector, *detectors.Detector.__subclasses__()}:
        monkeypatch.setattr(cls, "detect", refuse, raising=False)
        monkeypatch.setattr(cls, "detect_batch", refuse, raising=False)
    monkeypatch.setattr("faceflow.engine.Engine.__init__", refuse)


# --- photos ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(engine):
    """pyfeat_multi_face.jpg (1000x667, 5 faces) and the report `anonymize` writes for it."""
    data = data_path("images", "pyfeat_multi_face.jpg").read_bytes()
    report = engine.anonymize_bytes(data, out_format="PNG").report
    assert len(report["faces"]) == 5
    return data, report


def mask_box(box, width, height, scale=MaskOptions().mask_scale):
    return mask_region(Face(tuple(box), 1.0), scale, width, height)


def test_photo_renders_exactly_the_edited_faces(photo, no_detector, tmp_path):
    data, report = photo
    edited = copy.deepcopy(report)
    faces = sorted(edited["faces"], key=lambda f: f["box"][0])
    removed, exempt, kept = faces[0], faces[1], faces[2:]
    exempt["exempt"] = True
    added = {"box": [20, 560, 70, 80], "source": "manual"}  # floor, no face: a box the detector missed
    edited["faces"] = [exempt, *kept, added]
    result = review.render_photo(data, json.dumps(edited), out_format="PNG")

    before = images.decode(data).pixels.astype(int)
    after = images.decode(result.data).pixels.astype(int)
    w, h = report["width"], report["height"]
    changed = np.abs(after - before).max(axis=2) > 0
    inside = np.zeros_like(changed)
    for face in [*kept, added]:
        x1, y1, x2, y2 = mask_box(face["box"], w, h)
        inside[y1:y2, x1:x2] = True
        assert changed[y1:y2, x1:x2].mean() > 0.3, face  # masked
    assert not changed[~inside].any()                        # nothing else changed
    for face in (removed, exempt):                           # left as they were
        x, y, bw, bh = (int(v) for v in face["box"])
        assert not changed[y:y + bh, x:x + bw][~inside[y:y + bh, x:x + bw]].any()
        assert (~inside[y:y + bh, x:x + bw]).mean() > 0.5
    # the rendered report: what was given, re-editable
    assert result.report["masked"] == 4 and len(result.report["faces"]) == 5
    assert [f.get("exempt", False) for f in result.report["faces"]] == [True, False, False, False, False]
    assert result.report["faces"][-1]["source"] == "manual"
    assert result.report["faces"][1]["age"] == kept[0]["age"] if "age" in kept[0] else True


def test_cli_from_report_photo_without_the_detector(photo, no_detector, tmp_path):
    from faceflow import cli
    data, report = photo
    src = tmp_path / "in.jpg"
    src.write_bytes(data)
    edited = {**report, "faces": report["faces"][:2]}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    code = cli.main(["anonymize", str(src), "-o", str(tmp_path / "out.jpg"), "--from-report",
                     str(tmp_path / "edited.json"), "--report", str(tmp_path / "out.json")])
    assert code == 0
    assert images.header((tmp_path / "out.jpg").read_bytes()).format == "JPEG"
    assert json.loads((tmp_path / "out.json").read_text())["masked"] == 2


@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(width=999), "width"),
    (lambda r: r.pop("height"), "height: missing"),
    (lambda r: r["faces"][0].update(box=[1, 2, 3]), "faces[0].box"),
    (lambda r: r["faces"][1].update(box=[10, 10, -5, 20]), "faces[1].box"),
    (lambda r: r["faces"][1].update(box=[5000, 10, 50, 50]), "faces[1].box"),
    (lambda r: r["faces"][2].update(box=[10, "a", 5, 20]), "faces[2].box"),
    (lambda r: r["faces"][2].pop("box"), "faces[2].box: missing"),
    (lambda r: r["faces"][0].update(exempt="yes"), "faces[0].exempt"),
    (lambda r: r.update(faces={"box": [1, 2, 3, 4]}), "faces: expected a list"),
])
def test_bad_photo_reports_are_refused_naming_the_field(photo, tmp_path, change, field):
    data, report = photo
    edited = copy.deepcopy(report)
    change(edited)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        review.render_photo(data, edited)
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    (tmp_path / "in.jpg").write_bytes(data)
    done = run_cli("anonymize", tmp_path / "in.jpg", "-o", tmp_path / "out.jpg",
                   "--from-report", tmp_path / "edited.json")
    assert done.returncode == 2 and field.split(":")[0] in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.json", "in.jpg"]


def test_report_that_is_not_json_is_refused(photo):
    with pytest.raises(review.ReportError, match="report: not JSON"):
        review.render_photo(photo[0], b"{faces: 1")
    with pytest.raises(review.ReportError, match="expected a JSON object"):
        review.render_photo(photo[0], "[1, 2]")


# --- videos ------------------------------------------------------------------------------------
def streams(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        packets = [p for p in c.demux(video=0) if p.pts is not None]
        return {"frames": len(packets), "audio": len(c.streams.audio), "codec": v.codec_context.name,
                "pts": sorted(float(p.pts * p.time_base) for p in packets)}


def frames_of(path, indexes):
    """Upright BGR frames at these indexes."""
    out = {}
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in indexes:
                out[i] = frame.to_ndarray(format="bgr24").astype(int)
            if i >= max(indexes):
                break
    return out


@pytest.fixture(scope="module")
def clip(engine, tmp_path_factory):
    """The talking-head clip (hevc + audio, 169 frames, a face then none) and its report."""
    src = data_path("video", "pyfeat_face_noface.mov")
    folder = tmp_path_factory.mktemp("clip")
    report = folder / "report.json"
    engine.anonymize_file(src, folder / "detected.mp4", report=report)
    return src, json.loads(report.read_text()), folder


def face_change(src, out, report, indexes):
    """Per frame, the mean absolute change inside the face's box between input and output."""
    a, b = frames_of(src, indexes), frames_of(out, indexes)
    boxes = {e["frame"]: e["faces"][0]["box"] for e in report["frames"] if e["faces"]}
    changes = []
    for i in indexes:
        x, y, w, h = (int(v) for v in boxes[i])
        changes.append(float(np.abs(a[i][y:y + h, x:x + w] - b[i][y:y + h, x:x + w]).mean()))
    return changes


def test_video_report_lists_tracks_for_review(clip):
    src, report, _ = clip
    assert (report["width"], report["height"]) == (report["summary"]["width"], report["summary"]["height"])
    tracks = report["tracks"]
    assert tracks and all({"track", "first_frame", "last_frame", "frames", "thumbnail"} <= set(t) for t in tracks)
    seen = {f["track"] for e in report["frames"] for f in e["faces"]}
    assert {t["track"] for t in tracks} == seen
    first = tracks[0]
    on_thumbnail = report["frames"][first["thumbnail"]["frame"]]["faces"]
    assert first["thumbnail"]["box"] in [f["box"] for f in on_thumbnail]


@pytest.mark.parametrize("edit", ["dropped", "exempt"])
def test_dropped_or_exempt_track_is_left_unmasked(clip, no_detector, tmp_path, edit):
    src, report, folder = clip
    edited = copy.deepcopy(report)
    edited["tracks"] = [{**t, edit: True} for t in report["tracks"]]
    out, out_report = tmp_path / "out.mp4", tmp_path / "out.json"
    summary = review.render_video(None, src, out, edited, report_out=out_report)
    assert summary["masked"] == 0
    rendered = json.loads(out_report.read_text())
    faces = [f for e in rendered["frames"] for f in e["faces"]]
    if edit == "dropped":
        assert faces == [] and rendered["tracks"] == []
    else:
        assert faces and all(f["exempt"] for f in faces) and all(t["exempt"] for t in rendered["tracks"])
    frames = [0, 20, 40]
    kept = face_change(src, out, report, frames)
    blurred = face_change(src, folder / "detected.mp4", report, frames)
    assert max(kept) < 6 < 20 < min(blurred), (kept, blurred)  # only the encoder's loss
    a, b = streams(src), streams(out)
    assert b["codec"] == "h264" and b["frames"] == a["frames"] == 169 and b["audio"] == a["audio"] == 1
    assert np.allclose(a["pts"], b["pts"], atol=1e-3)


def test_exempting_one_face_on_one_frame(clip, no_detector, tmp_path):
    src, report, _ = clip
    edited = copy.deepcopy(report)
    edited["frames"][30]["faces"][0]["exempt"] = True
    summary = review.render_video(None, src, tmp_path / "out.mp4", edited)
    assert summary["masked"] == report["summary"]["faces"] - 1
    change = face_change(src, tmp_path / "out.mp4", report, [29, 30, 31])
    assert change[1] < 6 < 20 < min(change[0], change[2])


@pytest.fixture(scope="module")
def pexels(engine, tmp_path_factory):
    src = data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4")
    folder = tmp_path_factory.mktemp("pexels")
    report = folder / "report.json"
    engine.anonymize_file(src, folder / "detected.mp4", report=report)
    return src, json.loads(report.read_text())


FOLLOW_FROM, FOLLOW_FOR = 20, 60   # frames


def test_manual_box_is_followed_on_a_real_clip(engine, pexels, tmp_path):
    """The detected track is dropped and its box on one frame drawn by hand: the followed
    box covers the face (IoU ≥ 0.3 with the detector's boxes) for FOLLOW_FOR frames after it
    and back to the first frame."""
    src, report = pexels
    edited = copy.deepcopy(report)
    seed = report["frames"][FOLLOW_FROM]["faces"][0]
    edited["tracks"] = [{"track": t["track"], "dropped": True} for t in report["tracks"]]
    edited["manual"] = [{"frame": FOLLOW_FROM, "box": seed["box"]}]
    out, out_report = tmp_path / "out.mp4", tmp_path / "out.json"
    summary = review.render_video(engine, src, out, edited, report_out=out_report)
    rendered = json.loads(out_report.read_text())
    track = rendered["tracks"]
    assert len(track) == 1 and track[0]["source"] == "manual" and track[0]["first_frame"] == 0
    assert track[0]["last_frame"] >= FOLLOW_FROM + FOLLOW_FOR
    assert summary["followed"] == {str(track[0]["track"]): track[0]["frames"]}
    truth = {e["frame"]: e["faces"][0]["box"] for e in report["frames"] if e["faces"]}
    for e in rendered["frames"][:FOLLOW_FROM + FOLLOW_FOR + 1]:
        (face,) = e["faces"]
        assert face["source"] == ("manual" if e["frame"] == FOLLOW_FROM else "followed")
        assert iou(face["box"], truth[e["frame"]]) >= 0.3, e
    a, b = streams(src), streams(out)
    assert b["frames"] == a["frames"] and b["audio"] == a["audio"] == 1
    assert np.allclose(a["pts"], b["pts"], atol=1e-3)


@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(width=r["width"] + 2), "width"),
    (lambda r: r["frames"].append({"frame": 169, "faces": []}), "frames[169].frame: 169 is out of range"),
    (lambda r: r["frames"][3].update(frame=2), "frames[3].frame: frame 2 is given twice"),
    (lambda r: r["frames"][5]["faces"][0].update(box=[0, 0, 0, 10]), "frames[5].faces[0].box"),
    (lambda r: r.update(tracks=[{"track": 99, "dropped": True}]), "tracks[0].track"),
    (lambda r: r.update(manual=[{"frame": -1, "box": [1, 1, 9, 9]}]), "manual[0].frame"),
    (lambda r: r.update(manual=[{"frame": 3, "box": [1, 1, 9]}]), "manual[0].box"),
    (lambda r: r.update(manual=[{"frame": 3, "box": [1, 1, 9, 9], "last_frame": 2}]), "manual[0]"),
    (lambda r: r.pop("frames"), "frames: expected a list"),
])
def test_bad_video_reports_are_refused_naming_the_field(clip, no_detector, tmp_path, change, field):
    src, report, _ = clip
    edited = copy.deepcopy(report)
    change(edited)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        review.render_video(None, src, tmp_path / "out.mp4", edited, report_out=tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


def test_cli_from_report_video(clip, tmp_path):
    src, report, _ = clip
    edited = copy.deepcopy(report)
    edited["tracks"] = [{"track": t["track"], "exempt": True} for t in report["tracks"]]
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    done = run_cli("anonymize", src, "-o", tmp_path / "out.mp4", "--from-report", tmp_path / "edited.json",
                   "--report", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    assert "0 face(s) masked" in done.stderr
    rendered = json.loads((tmp_path / "out.json").read_text())
    assert all(t["exempt"] for t in rendered["tracks"])


# --- the API: POST /v1/anonymize with a report; jobs created with one ------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    pytest.importorskip("awslambdaric", reason="awslambdaric not installed: pip install awslambdaric")
    import devstack
    reason = devstack.skip_reason()
    if reason:
        pytest.skip(f"devstack cannot run here: {reason}")
    with devstack.Stack(functions=("api", "stills", "split"), function_env={"FACEFLOW_MODEL_DIR": str(model_dir)},
                        workdir=tmp_path_factory.mktemp("review-stack")) as running:
        yield running


def form(**parts: tuple[str | None, str, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body of (filename, content type, bytes) parts; its Content-Type."""
    boundary = "faceflow-review-boundary"
    body = b""
    for name, (filename, content_type, data) in parts.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
                 .encode() + data + b"\r\n")
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_api_anonymize_renders_a_report(stack, photo):
    data, report = photo
    edited = copy.deepcopy(report)
    edited["faces"] = [*edited["faces"][:2], {"box": [20, 560, 70, 80], "source": "manual"}]
    edited["faces"][1]["exempt"] = True
    body, content_type = form(report=(None, "application/json", json.dumps(edited).encode()),
                              file=("photo.jpg", "image/jpeg", data))
    status, headers, out = stack.request("POST", "/v1/anonymize?method=pixelate", body=body,
                                         headers={"Content-Type": content_type})
    assert status == 200, out
    assert headers["content-type"] == "image/jpeg" and headers["x-faceflow-faces"] == "2"
    assert out == review.render_photo(data, edited, MaskOptions(method="pixelate")).data
    bad = {**edited, "faces": [{"box": [1, 2, 3]}]}
    body, content_type = form(file=("photo.jpg", "image/jpeg", data),
                              report=("edited.json", "application/json", json.dumps(bad).encode()))
    status, _, out = stack.request("POST", "/v1/anonymize", body=body, headers={"Content-Type": content_type})
    error = json.loads(out)
    assert status == 400 and error["status"] == 400 and "faces[0].box" in error["message"], out


def test_api_documents_the_report(stack):
    status, _, body = stack.request("GET", "/v1/openapi.json")
    document = json.loads(body)
    form_schema = document["paths"]["/v1/anonymize"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "report" in form_schema["schema"]["properties"]
    assert "report" in document["components"]["schemas"]["JobRequest"]["properties"]


def result_of(stack, job_id: str) -> dict:
    import urllib.request
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200, body
    links = json.loads(body)
    fetched = {}
    for kind in ("image_url", "video_url", "report_url"):
        if links.get(kind):
            with urllib.request.urlopen(links[kind], timeout=30) as response:
                fetched[kind] = response.read()
    return fetched


def test_jobs_render_an_edited_report(stack, photo, clip, tmp_path):
    from stack_client import create_job, wait_for_job
    data, report = photo
    edited = {**report, "faces": report["faces"][:3]}
    photo_job = create_job(stack, "party.jpg", data, report=edited)
    src, video_report, _ = clip
    exempt = copy.deepcopy(video_report)
    exempt["tracks"] = [{"track": t["track"], "exempt": True} for t in video_report["tracks"]]
    video_job = create_job(stack, "talk.mov", src.read_bytes(), report=exempt)
    bad = {**exempt, "frames": [{"frame": 10_000, "faces": []}]}
    bad_job = create_job(stack, "bad.mov", src.read_bytes(), report=bad)

    job = wait_for_job(stack, photo_job)
    assert job["status"] == "done" and job["faces"] == 3, job
    got = result_of(stack, photo_job)
    assert got["image_url"] == review.render_photo(data, edited, source="party.jpg").data
    assert json.loads(got["report_url"])["masked"] == 3

    job = wait_for_job(stack, video_job)
    assert job["status"] == "done" and job["faces"] == 0, job
    got = result_of(stack, video_job)
    rendered = json.loads(got["report_url"])
    assert rendered["tracks"] and all(t["exempt"] for t in rendered["tracks"])
    (tmp_path / "talk.mp4").write_bytes(got["video_url"])
    a, b = streams(src), streams(tmp_path / "talk.mp4")
    assert b["frames"] == a["frames"] and b["audio"] == 1 and np.allclose(a["pts"], b["pts"], atol=1e-3)

    job = wait_for_job(stack, bad_job)
    assert job["status"] == "failed" and "frames[0].frame: 10000 is out of range" in job["error"], job
    status, _, body = stack.request("POST", "/v1/jobs", {"filename": "a.jpg", "operation": "analyze",
                                                         "report": edited})
    assert status == 400 and "report" in json.loads(body)["message"]


def test_a_followed_box_stays_within_first_and_last_frame(astronaut_bgr, no_detector, tmp_path):
    """MIL alone (no engine: the detector never runs) on a panning clip of a public-domain face;
    `first_frame` and `last_frame` bound how far the hand-drawn box is followed."""
    from stack_client import panning_clip
    src = tmp_path / "pan.mp4"
    panning_clip(src, astronaut_bgr, side=160, fps=10, frames=30, step=2)
    box = [52.0, 10.0, 50.0, 60.0]   # the astronaut's face at 160 px, frame 12 (rolled 24 px)
    box[0] += 24
    edited = {"width": 160, "height": 160, "frames": [],
              "manual": [{"frame": 12, "box": box, "first_frame": 5, "last_frame": 20}]}
    summary = review.render_video(None, src, tmp_path / "out.mp4", edited, report_out=tmp_path / "out.json")
    rendered = json.loads((tmp_path / "out.json").read_text())
    covered = [e["frame"] for e in rendered["frames"] if e["faces"]]
    assert covered == list(range(5, 21)) and summary["followed"] == {"1": 16}
    for e in rendered["frames"][5:21]:
        x = e["faces"][0]["box"][0]
        assert abs(x - (52 + 2 * e["frame"])) < 8, e   # moves with the face, 2 px a frame
