"""The command line as a user runs it: single files, folders, JSON Lines, resume."""
from __future__ import annotations

import csv
import json

import cv2
import pytest

from conftest import data_path, run_cli


@pytest.fixture()
def photo_dir(tmp_path, astronaut_bgr):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    cv2.imwrite(str(src / "a.jpg"), astronaut_bgr)
    cv2.imwrite(str(src / "sub" / "b.png"), astronaut_bgr[::2, ::2])
    (src / "broken.jpg").write_text("not a photo")
    return src


def test_folder_batch_with_workers_summary_and_resume(photo_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("anonymize", photo_dir, "-o", out, "--workers", "2")
    assert r.returncode == 1, r.stderr  # one file failed, the others were done
    assert (out / "a.jpg").is_file() and (out / "sub" / "b.png").is_file()
    assert not (out / "broken.jpg").exists()
    rows = {r["file"].split("/in/")[1]: r for r in csv.DictReader(open(out / "faceflow-summary.csv"))}
    assert rows["a.jpg"]["status"] == "done" and rows["a.jpg"]["faces"] == "1"
    assert rows["sub/b.png"]["status"] == "done"
    assert rows["broken.jpg"]["status"] == "failed" and "not an image" in rows["broken.jpg"]["error"]
    assert float(rows["a.jpg"]["ms"]) > 0

    again = run_cli("anonymize", photo_dir, "-o", out, "--summary", tmp_path / "s.json")
    rows = {r["file"].split("/in/")[1]: r for r in json.loads((tmp_path / "s.json").read_text())}
    assert rows["a.jpg"]["status"] == "skipped" and rows["sub/b.png"]["status"] == "skipped"
    assert "1 failed" in again.stderr

    forced = run_cli("anonymize", photo_dir, "-o", out, "--force", "--summary", tmp_path / "f.json")
    rows = {r["file"].split("/in/")[1]: r for r in json.loads((tmp_path / "f.json").read_text())}
    assert rows["a.jpg"]["status"] == "done"
    assert forced.returncode == 1


def test_single_file_with_report_and_options(tmp_path, astronaut_bgr):
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), astronaut_bgr)
    r = run_cli("anonymize", src, "-o", tmp_path / "b.png", "--method", "pixelate", "--shape", "box",
                "--mask-scale", "1.6", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["faces"]) == 1 and report["format"] == "PNG"


def test_bad_option_value_is_one_line(tmp_path, astronaut_bgr):
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), astronaut_bgr)
    r = run_cli("anonymize", src, "-o", tmp_path / "b.png", "--mask-scale", "9")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "mask scale" in r.stderr


def test_analyze_prints_json_lines(tmp_path, astronaut_bgr):
    cv2.imwrite(str(tmp_path / "a.jpg"), astronaut_bgr)
    noface = data_path("noface", "sklearn_flower.jpg")
    r = run_cli("analyze", tmp_path / "a.jpg", noface)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [len(x["faces"]) for x in lines] == [1, 0]
    assert {"source", "width", "height", "faces"} <= set(lines[0])
    face = lines[0]["faces"][0]
    assert len(face["box"]) == 4 and 0 <= face["score"] <= 1 and len(face["landmarks"]) == 5


def test_output_must_not_overwrite_input(tmp_path, astronaut_bgr):
    src = tmp_path / "a.jpg"
    cv2.imwrite(str(src), astronaut_bgr)
    before = src.read_bytes()
    r = run_cli("anonymize", src, "-o", src)
    assert r.returncode == 2 and src.read_bytes() == before


def test_one_video_with_workers_is_chunked_and_keeps_frames_and_audio(tmp_path):
    import av
    src = data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4")
    r = run_cli("anonymize", src, "-o", tmp_path / "out.mp4", "--workers", "2",
                "--chunk-seconds", "4", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    with av.open(str(src)) as a, av.open(str(tmp_path / "out.mp4")) as b:
        assert sum(1 for _ in b.decode(video=0)) == sum(1 for _ in a.decode(video=0))
        assert [s.type for s in b.streams if s.type == "audio"] == ["audio"]
    report = json.loads((tmp_path / "r.json").read_text())
    # the Pexels face is on every frame, and it is one person: one track id across the chunks
    assert all(f["faces"] for f in report["frames"])
    assert len({face["track"] for f in report["frames"] for face in f["faces"]}) == 1
