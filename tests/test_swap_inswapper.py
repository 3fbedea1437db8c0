"""The INSwapper engine's plumbing with generated ONNX graphs that have the signatures of
insightface's `inswapper_128.onnx` (inputs target [1,3,128,128] and source [1,512], output
[1,3,128,128], the 512x512 `emap` as the graph's last initializer) and `w600k_r50.onnx`
(ArcFace: [1,3,112,112] -> [1,512]), so insightface.model_zoo routes them to INSwapper and
ArcFaceONNX. No insightface weights are used or fetched.

The generated ArcFace answers a constant embedding e0 (unit vector 0); the generated swapper
paints its whole output RGB = 0.5 + 0.5 * latent[0:3], where latent = normalise(e @ emap).
`emap` swaps elements 0 and 2, so a correctly plumbed swap pastes RGB (0.5, 0.5, 1.0): blue;
without emap the face would come out red."""
from __future__ import annotations

import io
import logging

import cv2
import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("insightface.model_zoo",
                    reason="insightface not installed (pip install --no-deps insightface; "
                           "pip install -e '.[insightface]')")
from onnx import TensorProto, helper  # noqa: E402

from faceflow import bundle, synthetic  # noqa: E402
from faceflow.engine import Engine  # noqa: E402
from faceflow.inswapper import LICENCE_WARNING, RECOGNITION_FILE, SWAPPER_FILE  # noqa: E402
from faceflow.swap import SwapOptions  # noqa: E402

from conftest import run_cli  # noqa: E402

OPSET = [helper.make_opsetid("", 13)]


def _tensor(name, array, dtype=TensorProto.FLOAT):
    array = np.asarray(array, np.float32 if dtype == TensorProto.FLOAT else np.int64)
    return helper.make_tensor(name, dtype, array.shape, array.ravel().tolist())


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def inswapper_graph(path):
    """out = 0.5 + 0.5 * source[:, 0:3] spread over 128x128 (+ 0 * target: both inputs used)."""
    emap = np.eye(512, dtype=np.float32)
    emap[[0, 2]] = emap[[2, 0]]
    nodes = [
        helper.make_node("Slice", ["source", "starts", "ends", "axis1"], ["rgb"], name="rgb"),
        helper.make_node("Mul", ["rgb", "half"], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", "half"], ["shifted"], name="shift"),
        helper.make_node("Reshape", ["shifted", "shape4"], ["colour"], name="colour"),
        helper.make_node("Mul", ["target", "zero"], ["blank"], name="blank"),
        helper.make_node("Add", ["blank", "colour"], ["output"], name="paint"),
    ]
    initializers = [_tensor("starts", [0], TensorProto.INT64), _tensor("ends", [3], TensorProto.INT64),
                    _tensor("axis1", [1], TensorProto.INT64), _tensor("shape4", [1, 3, 1, 1], TensorProto.INT64),
                    _tensor("half", [0.5]), _tensor("zero", [0.0]),
                    _tensor("emap", emap)]   # last: insightface reads graph.initializer[-1]
    graph = helper.make_graph(
        nodes, "inswapper_like",
        [helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
         helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializer=initializers)
    _save(graph, path)


def arcface_graph(path):
    """A constant embedding: unit vector 0 (the image's channel means times zero, plus it)."""
    bias = np.zeros(512, np.float32)
    bias[0] = 1.0
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"], name="gap"),
         helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
         helper.make_node("Gemm", ["flat", "w", "b"], ["embedding"], name="fc1")],
        "arcface_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])],
        initializer=[_tensor("w", np.zeros((3, 512))), _tensor("b", bias)])
    _save(graph, path)


@pytest.fixture(scope="module")
def swap_models(model_dir, tmp_path_factory):
    """The faceflow bundle (linked) plus the two generated graphs: the folder an operator
    makes by copying their own files into the model folder."""
    folder = tmp_path_factory.mktemp("models_with_inswapper")
    for item in model_dir.iterdir():
        (folder / item.name).symlink_to(item)
    inswapper_graph(folder / SWAPPER_FILE)
    arcface_graph(folder / RECOGNITION_FILE)
    return folder


@pytest.fixture(scope="module")
def astronaut_jpeg(astronaut_bgr) -> bytes:
    return cv2.imencode(".jpg", astronaut_bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def test_inswapper_pastes_the_graphs_output_through_emap_and_marks_it(swap_models, astronaut_jpeg, astronaut_bgr,
                                                                       caplog):
    engine = Engine(model_dir=swap_models)
    with caplog.at_level(logging.WARNING, logger="faceflow"):
        result = engine.swap_bytes(astronaut_jpeg, astronaut_jpeg, SwapOptions(engine="inswapper"),
                                   out_format="PNG")
    assert "non-commercial research only" in caplog.text and SWAPPER_FILE in caplog.text
    swapper = engine.swapper("inswapper")
    from insightface import model_zoo
    from insightface.model_zoo.inswapper import INSwapper
    assert isinstance(swapper.swapper, INSwapper)
    assert isinstance(swapper.recognition, model_zoo.ArcFaceONNX)
    assert swapper.swapper.emap.shape == (512, 512)

    report = result.report
    assert report["engine"] == "inswapper" and report["swapped"] == 1
    assert report["faces"][0]["swap"] == {"engine": "inswapper", "swapped": True, "opacity": 1.0}
    assert report["marking"]["digital_source_type"] == synthetic.TRAINED_ALGORITHMIC_MEDIA
    with Image.open(io.BytesIO(result.data)) as im:
        assert synthetic.TRAINED_ALGORITHMIC_MEDIA.encode() in im.info["xmp"]

    out = cv2.imdecode(np.frombuffer(result.data, np.uint8), cv2.IMREAD_COLOR)
    x, y, w, h = (int(v) for v in report["faces"][0]["box"])
    centre = out[y + h // 2 - 3:y + h // 2 + 3, x + w // 2 - 3:x + w // 2 + 3].reshape(-1, 3).mean(0)
    # BGR of RGB (0.5, 0.5, 1.0): emap applied, the graph's RGB turned to BGR, pasted back
    assert np.allclose(centre, [255, 127, 127], atol=3), centre
    corner = np.s_[:40, :40]  # far from the face: INSwapper's paste-back leaves it
    assert np.abs(out[corner].astype(int) - astronaut_bgr[corner].astype(int)).mean() < 3


def test_without_the_operators_weights_the_error_names_the_files(model_dir, tmp_path, astronaut_bgr):
    target = tmp_path / "a.png"
    cv2.imwrite(str(target), astronaut_bgr)
    engine = Engine(model_dir=model_dir)
    if (model_dir / SWAPPER_FILE).exists():
        pytest.skip("this model folder holds an operator's inswapper_128.onnx")
    with pytest.raises(bundle.ModelError, match="inswapper_128.onnx"):
        engine.swap_file(target, tmp_path / "b.png", target, SwapOptions(engine="inswapper"))
    assert not (tmp_path / "b.png").exists()
    result = run_cli("swap", target, "--face", target, "-o", tmp_path / "b.png", "--engine", "inswapper",
                     "--models", model_dir)
    assert result.returncode == 3 and "not shipped or downloaded" in result.stderr, result.stderr
    assert not (tmp_path / "b.png").exists()


def test_licence_text_is_printed_on_load():
    assert "non-commercial" in LICENCE_WARNING and "does not ship or download" in LICENCE_WARNING
