"""The model bundle: manifest completeness, verification, graph fixes, refusal of bad files."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from faceflow import bundle
from faceflow.detectors import load_detector


def test_manifest_names_package_path_hash_and_licence():
    manifest = bundle.load_manifest()
    assert {"yunet", "retinaface", "centerface"} <= set(manifest["models"])
    for name, entry in manifest["models"].items():
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^=]*", entry["package"]), name
        assert entry["member"] and entry["licence"] and entry["file"]
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
        if entry.get("transform"):
            assert re.fullmatch(r"[0-9a-f]{64}", entry["output_sha256"]), name
        # insightface packs and inswapper are non-commercial: never bundled by default
        assert "insightface" not in entry["package"]


def test_installed_bundle_verifies(model_dir):
    assert bundle.verify(model_dir) == []
    copied = json.loads((model_dir / bundle.MANIFEST_NAME).read_text())
    assert copied == bundle.load_manifest()


def test_tampered_model_is_reported(model_dir, tmp_path):
    import shutil
    for name in ("manifest.json", "yunet_2023mar.onnx"):
        shutil.copy(model_dir / name, tmp_path / name)
    with open(tmp_path / "yunet_2023mar.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    problems = bundle.verify(tmp_path)
    assert any("yunet: sha256 mismatch" in p for p in problems)
    assert any("retinaface: missing" in p for p in problems)


def test_missing_model_gives_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(bundle.load_manifest()))
    with pytest.raises(bundle.ModelError, match="faceflow models fetch"):
        load_detector("yunet", model_dir=tmp_path)


def test_fetch_refuses_a_hash_mismatch(tmp_path, monkeypatch):
    manifest = bundle.load_manifest()
    entry = dict(manifest["models"]["yunet"], sha256="0" * 64)
    fake = {"models": {"yunet": entry}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(fake))
    monkeypatch.setattr(bundle, "_REPO_MANIFEST", path)
    with pytest.raises(bundle.ModelError, match="sha256 mismatch"):
        bundle.fetch(tmp_path / "models", ["yunet"], log=lambda m: None)
    assert not (tmp_path / "models" / entry["file"]).exists()


def test_centerface_graph_has_no_weight_inputs(model_dir):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(model_dir / "centerface.onnx"))
    assert [i.name for i in model.graph.input] == ["input.1"]


@pytest.mark.parametrize("name", ["yunet", "retinaface", "centerface"])
def test_detectors_take_batches(model_dir, astronaut_bgr, name):
    det = load_detector(name, model_dir=model_dir)
    flipped = np.ascontiguousarray(astronaut_bgr[:, ::-1])
    single = [det.detect(astronaut_bgr), det.detect(flipped)]
    batch = det.detect_batch([astronaut_bgr, flipped])
    assert [len(x) for x in batch] == [len(x) for x in single] == [1, 1]
    for a, b in zip(single, batch):
        assert np.allclose(a[0].box, b[0].box, atol=1.0)


def test_providers_are_named_explicitly(model_dir):
    det = load_detector("yunet", model_dir=model_dir)
    assert det.providers == ["CPUExecutionProvider"]
