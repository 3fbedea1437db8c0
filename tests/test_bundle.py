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


# --- tflite-to-onnx: a small TFLite graph built here with every op the converter translates ---

def _tflite_model(ops_override: int | None = None) -> bytes:
    """An NHWC float32 TFLite flatbuffer, [1,8,8,3] -> [1,1,1,6]: CONV_2D (SAME, stride 2,
    fused RELU6: asymmetric padding), DEPTHWISE_CONV_2D, PRELU, ADD (fused RELU), MAX_POOL_2D,
    PAD on channels, CONV_2D (VALID). Field slots as in TensorFlow Lite's schema.fbs.
    `ops_override` replaces the first op's builtin code (an op the converter does not know)."""
    import flatbuffers
    import tflite

    rng = np.random.default_rng(1)
    op_codes = tflite.BuiltinOperator
    b = flatbuffers.Builder(4096)
    b.ForceDefaults(True)
    tensors, buffers = [], [b""]        # buffer 0: empty, by TFLite convention

    def tensor(shape, data=None, dtype=tflite.TensorType.FLOAT32):
        buffers.append(b"" if data is None else np.ascontiguousarray(data).tobytes())
        tensors.append((shape, dtype, len(buffers) - 1, f"t{len(tensors)}"))
        return len(tensors) - 1

    def weights(*shape):
        return tensor(list(shape), rng.normal(0, 0.5, shape).astype(np.float32))

    x = tensor([1, 8, 8, 3])
    c1 = tensor([1, 4, 4, 4])
    d1, p1, a1 = tensor([1, 4, 4, 4]), tensor([1, 4, 4, 4]), tensor([1, 4, 4, 4])
    m1, pad1, out = tensor([1, 2, 2, 4]), tensor([1, 2, 2, 8]), tensor([1, 1, 1, 6])
    pads = tensor([4, 2], np.array([[0, 0], [0, 0], [0, 0], [0, 4]], np.int32), tflite.TensorType.INT32)
    ops = [  # (builtin code, inputs, outputs, options type, options: [(slot, kind, value)])
        (op_codes.CONV_2D, [x, weights(4, 3, 3, 3), weights(4)], [c1], tflite.BuiltinOptions.Conv2DOptions,
         [(0, "i8", tflite.Padding.SAME), (1, "i32", 2), (2, "i32", 2), (3, "i8", tflite.ActivationFunctionType.RELU6)]),
        (op_codes.DEPTHWISE_CONV_2D, [c1, weights(1, 3, 3, 4), weights(4)], [d1],
         tflite.BuiltinOptions.DepthwiseConv2DOptions,
         [(0, "i8", tflite.Padding.SAME), (1, "i32", 1), (2, "i32", 1), (3, "i32", 1)]),
        (op_codes.PRELU, [d1, weights(1, 1, 4)], [p1], 0, []),
        (op_codes.ADD, [c1, p1], [a1], tflite.BuiltinOptions.AddOptions,
         [(0, "i8", tflite.ActivationFunctionType.RELU)]),
        (op_codes.MAX_POOL_2D, [a1], [m1], tflite.BuiltinOptions.Pool2DOptions,
         [(0, "i8", tflite.Padding.SAME), (1, "i32", 2), (2, "i32", 2), (3, "i32", 2), (4, "i32", 2)]),
        (op_codes.PAD, [m1, pads], [pad1], 0, []),
        (op_codes.CONV_2D, [pad1, weights(6, 2, 2, 8), weights(6)], [out], tflite.BuiltinOptions.Conv2DOptions,
         [(0, "i8", tflite.Padding.VALID), (1, "i32", 1), (2, "i32", 1)]),
    ]
    if ops_override is not None:
        ops[0] = (ops_override, *ops[0][1:])
    codes = sorted({op[0] for op in ops})

    def int_vector(values, dtype=np.int32):
        return b.CreateNumpyVector(np.asarray(values, dtype))

    def offsets(items):
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return b.EndVector()

    def table(fields):        # fields: (slot, kind, value) with kind i8, i32, u8, u32 or off
        prepend = {"i8": b.PrependInt8Slot, "i32": b.PrependInt32Slot, "u8": b.PrependUint8Slot,
                   "u32": b.PrependUint32Slot, "off": b.PrependUOffsetTRelativeSlot}
        b.StartObject(max((f[0] for f in fields), default=0) + 1)
        for slot, kind, value in fields:
            prepend[kind](slot, value, 0)   # written even when 0: ForceDefaults below
        return b.EndObject()

    buffer_tables = [table([(0, "off", b.CreateByteVector(data))]) for data in buffers]
    tensor_tables = []
    for shape, dtype, buffer, name in tensors:
        fields = [(0, "off", int_vector(shape)), (1, "i8", dtype), (2, "u32", buffer),
                  (3, "off", b.CreateString(name))]
        tensor_tables.append(table(fields))
    op_tables = []
    for code, ins, outs, options_type, options in ops:
        fields = [(0, "u32", codes.index(code)), (1, "off", int_vector(ins)), (2, "off", int_vector(outs))]
        if options_type:
            fields += [(3, "u8", options_type), (4, "off", table(options))]
        op_tables.append(table(fields))
    subgraph = table([(0, "off", offsets(tensor_tables)), (1, "off", int_vector([x])),
                      (2, "off", int_vector([out])), (3, "off", offsets(op_tables)),
                      (4, "off", b.CreateString("main"))])   # OpenCV reads the name
    code_tables = [table([(0, "i8", min(code, 127)), (2, "i32", 1), (3, "i32", code)]) for code in codes]
    model = table([(0, "u32", 3), (1, "off", offsets(code_tables)), (2, "off", offsets([subgraph])),
                   (4, "off", offsets(buffer_tables))])
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


def test_tflite_to_onnx_gives_what_opencv_reads_from_the_tflite():
    pytest.importorskip("tflite")
    import cv2
    import onnxruntime as ort

    data = _tflite_model()
    converted = bundle._transform("tflite-to-onnx", data)
    session = ort.InferenceSession(converted, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["N", 3, 8, 8]
    blob = np.random.default_rng(2).uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: blob})[0]
    assert got.shape == (3, 6)
    net = cv2.dnn.readNetFromTFLite(np.frombuffer(data, np.uint8))
    for i in range(3):   # OpenCV's TFLite importer: one image at a time
        net.setInput(blob[i:i + 1])
        expected = net.forward().reshape(-1)
        np.testing.assert_allclose(got[i], expected, atol=1e-5)
        assert np.abs(expected).max() > 0.1   # the graph computes something


def test_tflite_to_onnx_refuses_an_op_it_does_not_translate():
    pytest.importorskip("tflite")
    import tflite
    with pytest.raises(bundle.ModelError, match="SOFTMAX"):
        bundle._transform("tflite-to-onnx", _tflite_model(ops_override=tflite.BuiltinOperator.SOFTMAX))
