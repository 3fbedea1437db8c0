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


def test_flush_denormals_zeroes_only_subnormal_weights():
    """The age and gender networks hold subnormal float32 weights, which x86 CPUs multiply many
    times slower; the fetch transform sets exactly those to zero and leaves the graph's answer."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort

    tiny = np.finfo(np.float32).tiny
    weights = np.array([[1e-40, 0.5], [-3e-39, -tiny]], np.float32)  # two subnormal, one smallest normal
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    flushed = onnx.load_from_string(bundle._transform("flush-denormals", model.SerializeToString()))
    got = numpy_helper.to_array(flushed.graph.initializer[0])
    assert got.tolist() == [[0.0, 0.5], [0.0, -tiny]]
    x = {"x": np.array([[2.0, 3.0]], np.float32)}
    before, after = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
                     for m in (model, flushed))
    np.testing.assert_allclose(after, before, atol=1e-37)


def test_installed_age_and_gender_have_no_subnormal_weights(model_dir):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    for name in ("age", "gender"):
        model = onnx.load(str(bundle.model_path(name, model_dir)))
        for tensor in model.graph.initializer:
            w = numpy_helper.to_array(tensor)
            if w.dtype == np.float32:
                assert not ((w != 0) & (np.abs(w) < np.finfo(np.float32).tiny)).any(), \
                    f"{name}: {tensor.name} has subnormal weights: fetched before the flush-denormals " \
                    f"transform; run `faceflow models fetch`"
