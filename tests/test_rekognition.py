"""`--format rekognition` against DetectFaces' response shape, as the AWS SDK itself describes it
(botocore's service model for rekognition: field names, types, enums and ranges)."""
from __future__ import annotations

import json

import cv2
import pytest

from conftest import data_path, run_cli
from faceflow import rekognition

botocore_session = pytest.importorskip("botocore.session")


@pytest.fixture(scope="module")
def model():
    return botocore_session.get_session().get_service_model("rekognition")


def conform(value, shape, path="") -> list[str]:
    """Problems of `value` against a botocore shape: unknown or missing structure members,
    wrong types, values outside the shape's enum or min/max."""
    problems = []
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: {type(value).__name__}, not an object"]
        for key in set(value) - set(shape.members):
            problems.append(f"{path}.{key}: not a member of {shape.name}")
        for key in shape.required_members:
            if key not in value:
                problems.append(f"{path}.{key}: required")
        for key, item in value.items():
            if key in shape.members:
                problems += conform(item, shape.members[key], f"{path}.{key}")
    elif kind == "list":
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        for i, item in enumerate(value):
            problems += conform(item, shape.member, f"{path}[{i}]")
    elif kind in ("float", "double", "integer", "long"):
        ok_types = (int,) if kind in ("integer", "long") else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            return [f"{path}: {value!r} is not a {kind}"]
        lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            problems.append(f"{path}: {value} outside {lo}..{hi}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            problems.append(f"{path}: {value!r} is not a boolean")
    elif kind == "string":
        if not isinstance(value, str):
            problems.append(f"{path}: {value!r} is not a string")
        elif shape.enum and value not in shape.enum:
            problems.append(f"{path}: {value!r} not one of {shape.enum}")
    else:
        problems.append(f"{path}: unexpected shape type {kind}")
    return problems


def _ratios_ok(detail):
    box = detail["BoundingBox"]
    assert all(0 <= box[k] <= 1 for k in box)
    assert box["Left"] + box["Width"] <= 1 + 1e-9 and box["Top"] + box["Height"] <= 1 + 1e-9


def test_the_validator_catches_what_it_should(model):
    output = model.operation_model("DetectFaces").output_shape
    assert conform({"FaceDetails": [{"Gender": {"Value": "male"}}]}, output)  # enum is "Male"
    assert conform({"FaceDetails": [{"Pose": {"Yaw": 200.0}}]}, output)       # range -180..180
    assert conform({"FaceDetails": [{"Age": {"Low": 1}}]}, output)            # unknown member
    assert conform({"FaceDetails": [{"EyesOpen": {"Value": 1}}]}, output)     # not a boolean
    assert not conform({"FaceDetails": [{"AgeRange": {"Low": 1, "High": 3}}]}, output)


def test_mapping_of_every_attribute(model):
    face = {"box": [-10.0, 20.0, 60.0, 80.0], "score": 0.93,
            "landmarks": [[10, 40], [30, 40], [20, 55], [12, 70], [28, 70]],
            "gender": {"value": "female", "confidence": 0.87},
            "age": {"value": 31.2, "low": 24.6, "high": 38.4, "bucket": "25-32"},
            "pose": {"yaw": -12.5, "pitch": 3.0, "roll": 1.5},
            "quality": {"sharpness": 61.0, "brightness": 48.2},
            "eyes_open": {"value": True, "confidence": 0.97},
            "mouth_open": {"value": False, "confidence": 0.8},
            "mesh": [[20.0 + i % 7, 50.0 + i % 11, 0.0] for i in range(468)]}
    response = rekognition.detect_faces_response({"width": 200, "height": 100, "faces": [face]})
    assert conform(response, model.operation_model("DetectFaces").output_shape) == []
    detail = response["FaceDetails"][0]
    assert detail["BoundingBox"] == {"Width": 0.25, "Height": 0.8, "Left": 0.0, "Top": 0.2}  # clipped
    assert detail["AgeRange"] == {"Low": 25, "High": 38}
    assert detail["Gender"] == {"Value": "Female", "Confidence": 87.0}
    assert detail["Pose"] == {"Roll": 1.5, "Yaw": -12.5, "Pitch": 3.0}
    assert detail["Quality"] == {"Brightness": 48.2, "Sharpness": 61.0}
    assert detail["EyesOpen"] == {"Value": True, "Confidence": 97.0}
    assert detail["MouthOpen"] == {"Value": False, "Confidence": 80.0}
    assert detail["Confidence"] == 93.0
    types = [lm["Type"] for lm in detail["Landmarks"]]
    assert len(types) == len(set(types)) == len(model.shape_for("LandmarkType").enum)  # every type
    eye_left = next(lm for lm in detail["Landmarks"] if lm["Type"] == "eyeLeft")
    assert (eye_left["X"], eye_left["Y"]) == (0.05, 0.4)
    # Fields with no model behind them are documented and absent.
    members = set(model.shape_for("FaceDetail").members)
    assert set(rekognition.NOT_PRODUCED) <= members
    assert not set(rekognition.NOT_PRODUCED) & set(detail)
    assert set(detail) | set(rekognition.NOT_PRODUCED) == members


def test_unsure_gender_is_left_out(model):
    face = {"box": [0, 0, 10, 10], "score": 0.5, "landmarks": None,
            "gender": {"value": None, "confidence": 0.55}}
    response = rekognition.detect_faces_response({"width": 10, "height": 10, "faces": [face]})
    assert conform(response, model.operation_model("DetectFaces").output_shape) == []
    assert "Gender" not in response["FaceDetails"][0]
    assert response["FaceDetails"][0]["Landmarks"] == []


def test_cli_rekognition_on_real_photos(model, tmp_path, astronaut_bgr):
    cv2.imwrite(str(tmp_path / "astronaut.jpg"), astronaut_bgr)
    multi = data_path("images", "pyfeat_multi_face.jpg")
    r = run_cli("analyze", tmp_path / "astronaut.jpg", multi, "--attributes", "pose,quality,eyes",
                "--format", "rekognition")
    assert r.returncode == 0, r.stderr
    responses = [json.loads(line) for line in r.stdout.splitlines()]
    assert [len(resp["FaceDetails"]) for resp in responses] == [1, 5]
    output = model.operation_model("DetectFaces").output_shape
    for response in responses:
        assert conform(response, output) == []
        for detail in response["FaceDetails"]:
            _ratios_ok(detail)
            assert {"BoundingBox", "Confidence", "Landmarks", "Pose", "Quality", "EyesOpen",
                    "MouthOpen"} <= set(detail)
            points = {lm["Type"]: (lm["X"], lm["Y"]) for lm in detail["Landmarks"]}
            # The mesh ran (for pose and eyes), so every Rekognition landmark type is there,
            # inside the picture for these faces, left and right as the image has them.
            assert len(points) == len(model.shape_for("LandmarkType").enum)
            assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in points.values())
            assert points["eyeLeft"][0] < points["eyeRight"][0]
            assert points["mouthLeft"][0] < points["mouthRight"][0]
            assert points["leftEyeLeft"][0] < points["leftEyeRight"][0] < points["rightEyeLeft"][0]
            assert points["leftEyeBrowUp"][1] < points["eyeLeft"][1] < points["nose"][1] \
                < points["mouthUp"][1] < points["mouthDown"][1] < points["chinBottom"][1]
            box = detail["BoundingBox"]
            cx = box["Left"] + box["Width"] / 2
            assert abs(points["nose"][0] - cx) < box["Width"] / 2
