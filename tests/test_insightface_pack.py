"""The insightface operator path with small generated ONNX graphs that have the signatures of
insightface's buffalo_l models, so that insightface.model_zoo routes each to its own class:
SCRFD (det_10g: one input, 9 outputs: scores, boxes, 5 points at strides 8/16/32, 2 anchors
a cell), Attribute (genderage: 96x96 in, 3 out), Landmark (2d106det: 192x192 in, 212 out),
ArcFaceONNX (w600k_r50: 112x112 in, 512 out). No insightface weights are used or fetched."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("insightface.model_zoo",
                    reason="insightface not installed (pip install --no-deps insightface; "
                           "pip install -e '.[insightface]')")
from onnx import TensorProto, helper  # noqa: E402

from faceflow import insightface_pack  # noqa: E402
from faceflow.engine import Engine  # noqa: E402
from faceflow.face import Face  # noqa: E402

try:
    from faceflow.analysis import FaceContext
except ImportError:      # faceflow.analysis comes with the mesh; the estimator reads only .face
    @dataclass
    class FaceContext:
        face: Face
        mesh: np.ndarray | None = None

OPSET = [helper.make_opsetid("", 13)]
# SCRFD: box distances (left, top, right, bottom) and the five points, in strides from the
# anchor centre; the graph answers these for every anchor.
BOX_DISTANCE = 1.0
KPS_OFFSETS = [-0.4, -0.3, 0.4, -0.3, 0.0, 0.1, -0.3, 0.5, 0.3, 0.5]


def _const(name, array):
    array = np.asarray(array, np.float32)
    return helper.make_tensor(name, TensorProto.FLOAT, array.shape, array.ravel().tolist())


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def scrfd_graph(path):
    """Scores from the image itself at stride 32 (a white 32x32 cell scores ~1, black ~0;
    strides 8 and 16 always 0), constant box and point distances: a white cell becomes one
    face centred on that cell."""
    nodes, outputs, inits = [], {"score": [], "bbox": [], "kps": []}, []
    inits += [_const("half", [0.5]), _const("gain", [20.0]), _const("zero", [0.0]),
              _const("dist", [[BOX_DISTANCE] * 4]), _const("kps_off", [KPS_OFFSETS]),
              helper.make_tensor("shape_n1", TensorProto.INT64, [2], [-1, 1]),
              helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
              helper.make_tensor("ends", TensorProto.INT64, [1], [1]),
              helper.make_tensor("axis1", TensorProto.INT64, [1], [1])]
    for s in (8, 16, 32):
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s],
                             name=f"pool{s}"),
            helper.make_node("Slice", [f"pool{s}", "starts", "ends", "axis1"], [f"red{s}"], name=f"slice{s}"),
            helper.make_node("Reshape", [f"red{s}", "shape_n1"], [f"cells{s}"], name=f"cells{s}"),
            helper.make_node("Concat", [f"cells{s}", f"cells{s}"], [f"anchors{s}"], axis=1, name=f"two{s}"),
            helper.make_node("Reshape", [f"anchors{s}", "shape_n1"], [f"flat{s}"], name=f"flat{s}"),
        ]
        if s == 32:
            nodes += [helper.make_node("Sub", [f"flat{s}", "half"], [f"centred{s}"], name="centre32"),
                      helper.make_node("Mul", [f"centred{s}", "gain"], [f"logit{s}"], name="gain32"),
                      helper.make_node("Sigmoid", [f"logit{s}"], [f"score_{s}"], name="sig32")]
        else:
            nodes.append(helper.make_node("Mul", [f"flat{s}", "zero"], [f"score_{s}"], name=f"none{s}"))
        nodes += [helper.make_node("Mul", [f"flat{s}", "zero"], [f"z{s}"], name=f"z{s}"),
                  helper.make_node("Add", [f"z{s}", "dist"], [f"bbox_{s}"], name=f"box{s}"),
                  helper.make_node("Add", [f"z{s}", "kps_off"], [f"kps_{s}"], name=f"kps{s}")]
        outputs["score"].append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, ["n", 1]))
        outputs["bbox"].append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, ["n", 4]))
        outputs["kps"].append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, ["n", 10]))
    graph = helper.make_graph(
        nodes, "scrfd_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"], initializer=inits)
    _save(graph, path)


def pooled_linear_graph(path, size, out, weights, bias, name="data"):
    """Global average of each channel, then a fixed linear map: (1, 3, size, size) -> (1, out)."""
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", [name], ["pooled"], name="gap"),
         helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
         helper.make_node("Gemm", ["flat", "w", "b"], ["fc1"], name="fc1")],
        "pooled_linear",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, out])],
        initializer=[_const("w", weights), _const("b", bias)])
    _save(graph, path)


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    """A buffalo_l-shaped folder. genderage: insightface feeds RGB (x - 127.5) / 128; the
    gender scores are (2 * (B - R), 2 * (R - B)), so a red face is "male", a blue one
    "female"; age fraction 0.35 + 0.1 * G (a mid-grey face: 35 years)."""
    folder = tmp_path_factory.mktemp("buffalo_like")
    scrfd_graph(folder / "det_10g.onnx")
    pooled_linear_graph(folder / "genderage.onnx", 96, 3,
                        [[-2.0, 2.0, 0.0], [0.0, 0.0, 0.1], [2.0, -2.0, 0.0]], [0.0, 0.0, 0.35])
    pooled_linear_graph(folder / "2d106det.onnx", 192, 212, np.zeros((3, 212)), np.zeros(212))
    pooled_linear_graph(folder / "w600k_r50.onnx", 112, 512, np.zeros((3, 512)), np.zeros(512),
                        name="input.1")
    return folder


def test_model_zoo_routes_each_generated_graph_to_its_class(pack_dir, caplog):
    from insightface import model_zoo
    with caplog.at_level(logging.WARNING, logger="faceflow"):
        pack = insightface_pack.load_pack(pack_dir, providers="cpu", threads=1)
    assert "non-commercial" in caplog.text
    assert isinstance(pack.detector, model_zoo.SCRFD) and pack.detector.use_kps
    assert isinstance(pack.genderage, model_zoo.Attribute) and pack.genderage.taskname == "genderage"
    assert [m.taskname for m in pack.landmarks] == ["landmark_2d_106"]
    assert list(pack.unused) == ["w600k_r50.onnx"]
    assert pack.detector.session.get_providers() == ["CPUExecutionProvider"]


def test_is_pack_tells_a_pack_from_a_faceflow_bundle(pack_dir, model_dir, tmp_path):
    assert insightface_pack.is_pack(pack_dir)
    assert not insightface_pack.is_pack(model_dir)        # has faceflow's manifest
    assert not insightface_pack.is_pack(tmp_path)         # no .onnx
    assert not insightface_pack.is_pack(None)
    # a faceflow folder whose manifest is missing (fetch cut short) is not a pack either
    (tmp_path / "yunet_2023mar.onnx").write_bytes((model_dir / "yunet_2023mar.onnx").read_bytes())
    assert not insightface_pack.is_pack(tmp_path)


def _image_with_white_cell(col: int, row: int) -> np.ndarray:
    image = np.zeros((640, 640, 3), np.uint8)
    image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32] = 255
    return image


def test_scrfd_through_faceflows_engine(pack_dir):
    """An Engine with a pack as the model folder gets insightface's SCRFD behind the
    Detector interface: [x, y, w, h] boxes and five points in image pixels."""
    det = Engine(model_dir=pack_dir, providers="cpu", threads=1).detector
    assert isinstance(det, insightface_pack.InsightfaceDetector) and det.name == "scrfd"
    assert det.providers == ["CPUExecutionProvider"]
    col, row = 7, 4
    (face,) = det.detect(_image_with_white_cell(col, row))
    cx, cy = col * 32, row * 32        # SCRFD's anchor centres are cell corners * stride
    assert face.box == pytest.approx((cx - 32 * BOX_DISTANCE, cy - 32 * BOX_DISTANCE,
                                      64 * BOX_DISTANCE, 64 * BOX_DISTANCE), abs=0.5)
    assert face.score > 0.99
    expected = np.array([cx, cy]) + 32 * np.reshape(KPS_OFFSETS, (5, 2))
    np.testing.assert_allclose(face.landmarks, expected, atol=0.5)
    assert det.detect(np.zeros((640, 640, 3), np.uint8)) == []
    # a 320x320 image is scaled up to SCRFD's 640 input and the answer scaled back
    (small,) = det.detect(cv2.resize(_image_with_white_cell(col, row), (320, 320),
                                     interpolation=cv2.INTER_NEAREST))
    assert small.box[0] == pytest.approx(face.box[0] / 2, abs=0.5)
    assert [len(f) for f in det.detect_batch([_image_with_white_cell(1, 1), np.zeros((64, 64, 3), np.uint8)])] == [1, 0]


def test_genderage_as_an_estimator(pack_dir):
    estimator = insightface_pack.InsightfaceGenderAge.from_pack(pack_dir, providers="cpu", threads=1)
    assert estimator.names == ("gender", "age")
    image = np.full((300, 600, 3), 128, np.uint8)
    image[50:250, 50:250] = (40, 40, 220)     # BGR: a red square
    image[50:250, 350:550] = (220, 40, 40)    # a blue square
    faces = [FaceContext(face=Face(box=(70, 70, 160, 160), score=0.9)),
             FaceContext(face=Face(box=(370, 70, 160, 160), score=0.9))]
    red, blue = estimator.estimate(image, faces)
    assert red["gender"]["value"] == "male" and blue["gender"]["value"] == "female"
    assert red["gender"]["confidence"] > 0.9 and blue["gender"]["confidence"] > 0.9
    # what insightface's own Attribute.get answers for the same face
    gender, age = estimator.model.get(image, insightface_pack._to_insightface(faces[0].face))
    assert (gender, red["age"]["value"]) == (1, float(age))
    assert red["age"]["low"] is None and red["age"]["bucket"]


def test_a_pack_without_insightface_installed_says_how_to_install(pack_dir, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_insightface(name, *args, **kwargs):
        if name.startswith("insightface"):
            raise ImportError("No module named 'insightface'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_insightface)
    from faceflow import bundle
    with pytest.raises(bundle.ModelError, match="pip install --no-deps insightface"):
        insightface_pack.load_pack(pack_dir)


def test_cli_with_a_pack_as_models_warns_and_finds_the_face(tmp_path):
    from conftest import run_cli
    scrfd_graph(tmp_path / "det_10g.onnx")
    photo = tmp_path / "cell.png"
    cv2.imwrite(str(photo), _image_with_white_cell(5, 5))
    done = run_cli("analyze", "--models", tmp_path, photo)
    assert done.returncode == 0, done.stderr
    assert "non-commercial research only" in done.stderr
    import json
    (face,) = json.loads(done.stdout)["faces"]
    assert face["box"] == pytest.approx([128, 128, 64, 64], abs=0.5)
