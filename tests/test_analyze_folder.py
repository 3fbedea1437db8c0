"""`faceflow analyze DIR --csv`: a row per face, a row per failed file, drawings, resume."""
from __future__ import annotations

import csv
import io
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import data_path, run_cli
from faceflow import facetable
from faceflow.agegender import AGE_BRACKETS

BUCKETS = {f"{lo}-{hi}" for lo, hi in AGE_BRACKETS}


@pytest.fixture()
def photo_dir(tmp_path, astronaut_bgr):
    """The astronaut (with EXIF, to see that drawings drop it), a five-face party photo in a
    subfolder, a photo without faces, a file that is not a photo and a truncated JPEG."""
    src = tmp_path / "in"
    (src / "party").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    exif[0x8827] = 400            # ISO
    Image.fromarray(cv2.cvtColor(astronaut_bgr, cv2.COLOR_BGR2RGB)).save(src / "astronaut.jpg", exif=exif)
    shutil.copy(data_path("images", "pyfeat_multi_face.jpg"), src / "party" / "five.jpg")
    shutil.copy(data_path("noface", "sklearn_flower.jpg"), src / "flower.jpg")
    (src / "broken.jpg").write_text("not a photo")
    jpeg = cv2.imencode(".jpg", astronaut_bgr)[1].tobytes()
    (src / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    return src


def by_file(table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in csv.DictReader(open(table)):
        out.setdefault(row["file"].split("/in/")[1], []).append(row)
    return out


def test_folder_to_csv_with_a_corrupt_file_drawings_and_resume(photo_dir, tmp_path):
    table, drawn = tmp_path / "faces.csv", tmp_path / "drawn"
    r = run_cli("analyze", photo_dir, "--csv", table, "--workers", "2", "--draw", drawn)
    assert r.returncode == 1, r.stderr  # files failed; the batch went on
    assert "3 done, 0 skipped, 2 failed" in r.stderr
    rows = by_file(table)
    assert next(csv.reader(open(table))) == facetable.CSV_FIELDS

    # one error row for each file that could not be read, and nothing drawn for it
    for bad in ("broken.jpg", "cut.jpg"):
        assert len(rows[bad]) == 1 and rows[bad][0]["error"] and rows[bad][0]["face"] == ""
        assert not (drawn / bad).exists()
    assert "not an image" in rows["broken.jpg"][0]["error"]

    # no faces: one row saying so (no face index, no error)
    assert [(r["face"], r["error"]) for r in rows["flower.jpg"]] == [("", "")]

    (astronaut,) = rows["astronaut.jpg"]
    assert astronaut["gender"] == "female" and astronaut["age_bucket"] in BUCKETS
    x, y, w, h = (float(astronaut[k]) for k in "xywh")
    assert 150 < x + w / 2 < 260 and 50 < y + h / 2 < 150 and w > 60  # the face, in the 512 px photo
    for key in ("score", "gender_confidence", "age", "yaw", "pitch", "roll", "sharpness"):
        float(astronaut[key])

    party = rows["party/five.jpg"]
    assert [r["face"] for r in party] == [str(i) for i in range(len(party))] and len(party) == 5
    assert all(r["age_bucket"] in BUCKETS and r["error"] == "" for r in party)
    assert {r["gender"] for r in party} <= {"female", "male", ""}

    # drawings: same size, boxes drawn, no metadata kept
    original = cv2.imread(str(photo_dir / "party" / "five.jpg"))
    copy = cv2.imread(str(drawn / "party" / "five.jpg"))
    assert copy.shape == original.shape
    for r in party:
        x, y, w, h = (int(float(r[k])) for k in "xywh")
        edge = copy[y + h // 2, max(0, x - 1):x + 2].astype(int)
        assert (np.abs(edge - [0, 255, 0]).sum(axis=1) < 120).any()  # the green box's left side
    astronaut_copy = Image.open(drawn / "astronaut.jpg")
    assert not astronaut_copy.getexif() and "exif" not in astronaut_copy.info
    assert Image.open(photo_dir / "astronaut.jpg").getexif()  # the input had some

    # resume: what is in the table is skipped, failed files are tried again
    again = run_cli("analyze", photo_dir, "--csv", table)
    assert "0 done, 3 skipped, 2 failed" in again.stderr, again.stderr
    assert by_file(table) == rows

    # a photo changed since is done again; --force does everything again
    cv2.imwrite(str(photo_dir / "flower.jpg"), cv2.imread(str(photo_dir / "astronaut.jpg")))
    changed = run_cli("analyze", photo_dir, "--csv", table)
    assert "1 done, 2 skipped, 2 failed" in changed.stderr, changed.stderr
    assert by_file(table)["flower.jpg"][0]["gender"] == "female"
    forced = run_cli("analyze", photo_dir, "--csv", table, "--force", "--attributes", "quality")
    assert "3 done, 0 skipped, 2 failed" in forced.stderr
    assert all(r["gender"] == "" and r["sharpness"] for r in by_file(table)["party/five.jpg"])


def test_threshold_and_options(photo_dir, tmp_path):
    counts = {}
    for threshold in ("0.5", "0.97"):
        r = run_cli("analyze", photo_dir / "party", "--csv", tmp_path / f"{threshold}.csv",
                    "--threshold", threshold, "--attributes", "none")
        assert r.returncode == 0, r.stderr
        rows = list(csv.DictReader(open(tmp_path / f"{threshold}.csv")))
        assert all(r["gender"] == "" and r["age"] == "" for r in rows)  # detection only
        counts[threshold] = len([r for r in rows if r["face"] != ""])
    assert counts["0.5"] == 5 and counts["0.97"] < 5
    bad = run_cli("analyze", photo_dir, "--draw", tmp_path / "d")
    assert bad.returncode == 2 and "--draw goes with --csv" in bad.stderr
    inside = run_cli("analyze", photo_dir, "--csv", tmp_path / "x.csv", "--draw", photo_dir / "drawn")
    assert inside.returncode == 2 and "must not be the input folder" in inside.stderr


def test_label_and_drawing():
    assert facetable.label({"gender": {"value": "female", "confidence": 0.9},
                            "age": {"value": 27.0, "bucket": "25-32"}}) == "F 25-32"
    assert facetable.label({"gender": {"value": None, "confidence": 0.5},
                            "age": {"value": 50.0, "bucket": "48-53"}}) == "? 48-53"
    assert facetable.label({"box": [0, 0, 1, 1]}) == "?"
    blank = np.zeros((200, 300, 3), np.uint8)
    out = facetable.draw(blank, [{"box": [100, 5, 50, 60], "gender": {"value": "male"},
                                  "age": {"bucket": "8-12"}}])
    assert blank.sum() == 0  # the input is left alone
    assert (out[30, 100] == [0, 255, 0]).all()  # left side of the box
    assert (out[66:90, 100:150] != 0).any()  # the label, below the box as there is no room above


def test_an_interrupted_run_keeps_what_it_finished(photo_dir, tmp_path, monkeypatch, model_dir):
    """Ctrl-C after the first photo: the table holds that photo's rows, and the next run
    does only the others."""
    table = tmp_path / "faces.csv"
    real, seen = facetable._analyze, []

    def interrupted_after_one(src, drawing):
        if seen:
            raise KeyboardInterrupt
        seen.append(src)
        return real(src, drawing)

    monkeypatch.setattr(facetable, "_analyze", interrupted_after_one)
    kwargs = dict(engine_kwargs={"model_dir": model_dir}, attributes=("quality",))
    with pytest.raises(KeyboardInterrupt):
        facetable.run([photo_dir], table, **kwargs)
    assert {r["file"] for r in csv.DictReader(open(table))} == set(seen)

    monkeypatch.setattr(facetable, "_analyze", real)
    assert facetable.run([photo_dir], table, **kwargs) == 1  # the two unreadable files
    assert len({r["file"] for r in csv.DictReader(open(table))}) == 5
