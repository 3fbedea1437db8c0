"""The Analyzer: attributes named once, estimators composed, the mesh run when needed; the
engine and `faceflow analyze` with attributes. Age and gender have their own tests (the
AgeGender estimator); here a placeholder stands in for it to check the composition only."""
from __future__ import annotations

import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, data_path, run_cli
from faceflow import analysis, images
from faceflow.analysis import ATTRIBUTES, DEFAULT_ATTRIBUTES, Analyzer, FaceContext, parse_attributes

WHEELS = ROOT / ".bench" / "wheels"


def insightface_image(name: str) -> np.ndarray:
    """A photo from inside the insightface wheel (downloaded once with pip, never unpacked
    into the repository)."""
    wheels = sorted(WHEELS.glob("insightface-*.whl"))
    if not wheels:
        WHEELS.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                   "--only-binary=:all:", "-d", str(WHEELS), "insightface"],
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("insightface wheel: pip download timed out after 300 s")
        wheels = sorted(WHEELS.glob("insightface-*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"insightface wheel not available from the package index: {proc.stderr[-200:]}")
    with zipfile.ZipFile(wheels[-1]) as z:
        data = z.read(f"insightface/data/images/{name}")
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


class PlaceholderAgeGender:
    """Test-only stand-in for faceflow.agegender.AgeGender: records what it was given."""
    names = ("gender", "age")
    calls: list = []

    def __init__(self, model_dir=None, providers=None, threads=0):
        pass

    def estimate(self, bgr, faces):
        PlaceholderAgeGender.calls.append([c.mesh is not None for c in faces])
        return [{"gender": {"value": "female", "confidence": 0.9},
                 "age": {"value": 30, "low": 25, "high": 36, "bucket": "25-32"}} for _ in faces]


@pytest.fixture
def placeholder_agegender(monkeypatch):
    module = types.ModuleType("faceflow.agegender")
    module.AgeGender = PlaceholderAgeGender
    monkeypatch.setitem(sys.modules, "faceflow.agegender", module)
    PlaceholderAgeGender.calls = []
    return PlaceholderAgeGender


@pytest.fixture(scope="module")
def multi_face():
    bgr = cv2.imread(str(data_path("images", "pyfeat_multi_face.jpg")))
    assert bgr is not None
    return bgr


def test_attribute_names():
    assert set(DEFAULT_ATTRIBUTES) < set(ATTRIBUTES) and "mesh" not in DEFAULT_ATTRIBUTES
    assert parse_attributes("pose, AGE,pose") == ("age", "pose")  # ATTRIBUTES order, once each
    assert parse_attributes(None) == DEFAULT_ATTRIBUTES
    assert parse_attributes("none") == () == parse_attributes("")
    with pytest.raises(ValueError, match="unknown attribute.*smile"):
        parse_attributes("smile,age")
    assert set(analysis.ATTRIBUTE_MODELS) == set(ATTRIBUTES) == set(analysis.PROVIDER)
    assert analysis.models_for(("pose", "eyes", "quality")) == ("facemesh",)


def test_mesh_attributes(model_dir, engine, multi_face):
    faces = engine.detect(multi_face)
    records = Analyzer(("pose", "quality", "eyes"), model_dir=model_dir, threads=1).analyze(multi_face, faces)
    assert len(records) == len(faces) == 5
    for face, record in zip(faces, records):
        assert {k: record[k] for k in ("box", "score", "landmarks")} == {
            k: v for k, v in face.to_dict().items() if k in ("box", "score", "landmarks")}
        assert set(record) == {"box", "score", "landmarks", "pose", "quality", "eyes_open", "mouth_open"}
        assert all(-90 <= record["pose"][k] <= 90 for k in ("yaw", "pitch", "roll"))
        assert 0 <= record["quality"]["sharpness"] <= 100 and 0 <= record["quality"]["brightness"] <= 100
        assert isinstance(record["eyes_open"]["value"], bool) and 0.5 <= record["eyes_open"]["confidence"] <= 1
    json.dumps(records)  # plain JSON types only


def test_mesh_points_only_on_request(model_dir, engine, multi_face):
    faces = engine.detect(multi_face)[:2]
    record = Analyzer(("mesh",), model_dir=model_dir).analyze(multi_face, faces)[0]
    assert set(record) == {"box", "score", "landmarks", "mesh"}
    mesh = np.array(record["mesh"])
    assert mesh.shape == (468, 3)
    x, y, w, h = record["box"]
    inside = ((mesh[:, 0] > x - 0.25 * w) & (mesh[:, 0] < x + 1.25 * w)
              & (mesh[:, 1] > y - 0.25 * h) & (mesh[:, 1] < y + 1.25 * h))
    assert inside.all()


def test_quality_follows_the_pixels(engine, multi_face):
    faces = engine.detect(multi_face)
    sharp = [analysis.face_quality(multi_face, f) for f in faces]
    blurred = cv2.GaussianBlur(multi_face, (0, 0), 3)
    soft = [analysis.face_quality(blurred, f) for f in faces]
    assert all(s["sharpness"] > 2 * b["sharpness"] for s, b in zip(sharp, soft)), (sharp, soft)
    darker = [analysis.face_quality((multi_face * 0.5).astype(np.uint8), f) for f in faces]
    assert all(d["brightness"] == pytest.approx(s["brightness"] / 2, abs=1.5) for s, d in zip(sharp, darker))
    # A box outside the picture has no pixels to measure.
    from faceflow.face import Face
    assert analysis.face_quality(multi_face, Face(box=(-50, -50, 20, 20), score=1)) == {
        "sharpness": None, "brightness": None}


def test_composition_with_age_gender(model_dir, engine, multi_face, placeholder_agegender):
    faces = engine.detect(multi_face)
    # With a mesh attribute, age/gender get every face's mesh, all faces in one call.
    records = Analyzer(DEFAULT_ATTRIBUTES, model_dir=model_dir).analyze(multi_face, faces)
    assert placeholder_agegender.calls == [[True] * 5]
    assert all({"gender", "age", "pose", "quality", "eyes_open", "mouth_open"} <= set(r) for r in records)
    assert all("mesh" not in r for r in records)
    # Without one, no mesh runs and age/gender align from the five points.
    placeholder_agegender.calls.clear()
    only_age = Analyzer(("age",), model_dir=model_dir)
    assert only_age.mesh is None
    records = only_age.analyze(multi_face, faces)
    assert placeholder_agegender.calls == [[False] * 5]
    assert all("age" in r and "gender" not in r for r in records)
    # No faces: nothing runs.
    placeholder_agegender.calls.clear()
    assert only_age.analyze(multi_face, []) == []
    assert placeholder_agegender.calls == []


def test_estimators_follow_the_protocol(engine, astronaut_bgr):
    faces = engine.detect(astronaut_bgr)
    contexts = [FaceContext(f) for f in faces]
    for name in ("pose", "eyes", "mesh", "quality"):
        estimator = analysis.ESTIMATORS[name](None, None, 0)
        assert set(estimator.names) <= set(ATTRIBUTES)
        out = estimator.estimate(astronaut_bgr, contexts)
        assert isinstance(out, list) and len(out) == len(faces)
        if name != "quality":  # without a mesh the mesh's attributes are left out, not guessed
            assert out == [{}]


def test_engine_analyze_picture(engine, astronaut_bgr):
    picture = images.decode(cv2.imencode(".png", astronaut_bgr)[1].tobytes())
    plain = engine.analyze_picture(picture)
    assert set(plain["faces"][0]) == {"box", "score", "landmarks"}  # as before: detection only
    rich = engine.analyze_picture(picture, attributes=("pose", "quality"))
    assert rich["faces"][0]["box"] == plain["faces"][0]["box"]
    assert {"pose", "quality"} <= set(rich["faces"][0]) and "eyes_open" not in rich["faces"][0]
    assert engine.analyzer("quality,pose") is engine.analyzer(["pose", "quality"])  # built once


def test_t1_six_faces(engine, model_dir):
    bgr = insightface_image("t1.jpg")
    faces = engine.detect(bgr)
    assert len(faces) == 6
    records = Analyzer(("pose", "eyes"), model_dir=model_dir).analyze(bgr, faces)
    # Six people with their eyes open, none in profile (by eye).
    assert all(r["eyes_open"]["value"] for r in records), [r["eyes_open"] for r in records]
    assert all(abs(r["pose"]["yaw"]) < 60 for r in records)


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_attributes_and_mesh(tmp_path, astronaut_bgr):
    cv2.imwrite(str(tmp_path / "a.jpg"), astronaut_bgr)
    r = run_cli("analyze", tmp_path / "a.jpg", "--attributes", "pose,quality,eyes")
    assert r.returncode == 0, r.stderr
    face = json.loads(r.stdout)["faces"][0]
    assert {"pose", "quality", "eyes_open", "mouth_open"} <= set(face) and "mesh" not in face
    r = run_cli("analyze", tmp_path / "a.jpg", "--attributes", "quality", "--mesh")
    assert r.returncode == 0, r.stderr
    face = json.loads(r.stdout)["faces"][0]
    assert len(face["mesh"]) == 468 and "quality" in face and "pose" not in face
    r = run_cli("analyze", tmp_path / "a.jpg", "--attributes", "none")
    assert set(json.loads(r.stdout)["faces"][0]) == {"box", "score", "landmarks"}


def test_cli_rejects_unknown_attributes(tmp_path, astronaut_bgr):
    cv2.imwrite(str(tmp_path / "a.jpg"), astronaut_bgr)
    r = run_cli("analyze", tmp_path / "a.jpg", "--attributes", "age,smile")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "smile" in r.stderr


def test_cli_without_analysis_models_reports_faces_only(tmp_path, astronaut_bgr, model_dir):
    """No --attributes and the analysis models not installed: faces as before, and a note."""
    models = tmp_path / "models"
    models.mkdir()
    manifest = json.loads((model_dir / "manifest.json").read_text())
    (models / "manifest.json").write_text(json.dumps(manifest))
    entry = manifest["models"]["yunet"]
    (models / entry["file"]).symlink_to(model_dir / entry["file"])
    cv2.imwrite(str(tmp_path / "a.jpg"), astronaut_bgr)
    r = run_cli("analyze", tmp_path / "a.jpg", "--models", models)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["faces"][0]) == {"box", "score", "landmarks"}
    assert "analysis models missing" in r.stderr
    # Asked for explicitly, a missing model is the models error.
    r = run_cli("analyze", tmp_path / "a.jpg", "--models", models, "--attributes", "pose")
    assert r.returncode == 3 and "facemesh" in r.stderr


def test_cli_rekognition_format_takes_photos_only(tmp_path, astronaut_bgr):
    video = data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4")
    cv2.imwrite(str(tmp_path / "a.jpg"), astronaut_bgr)
    r = run_cli("analyze", video, tmp_path / "a.jpg", "--attributes", "quality", "--format", "rekognition")
    assert r.returncode == 2
    first, second = (json.loads(line) for line in r.stdout.splitlines())
    assert "rekognition" in first["error"] and Path(first["source"]) == video
    assert len(second["FaceDetails"]) == 1
