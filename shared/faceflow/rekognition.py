"""faceflow's faces in the shape of Amazon Rekognition's DetectFaces response, so code written
against Rekognition reads faceflow's output unchanged.

    detect_faces_response(report)   # report: Engine.analyze_picture's dict
    -> {"FaceDetails": [{"BoundingBox": {...}, "AgeRange": {...}, ...}, ...]}

Field by field (DetectFaces' FaceDetail):
- BoundingBox {Width, Height, Left, Top}: the detector box as ratios of the image's width and
  height, clipped to the image (0..1).
- Confidence: the detector score x 100.
- AgeRange {Low, High}: age.low, age.high (whole years).
- Gender {Value "Male"|"Female", Confidence 0-100}: left out when faceflow's gender is null
  (confidence under its threshold), where Rekognition would still guess.
- Pose {Roll, Yaw, Pitch}: degrees (see facemesh.head_pose for the signs).
- Quality {Brightness, Sharpness}: 0-100, from the face crop (analysis.Quality).
- EyesOpen, MouthOpen {Value, Confidence 0-100}: from the mesh.
- Landmarks [{Type, X, Y}]: ratios of the image size. "Left"/"right" in the type names are
  the image's, as in Rekognition's output (in AWS's example responses eyeLeft has the smaller
  X on a frontal face). The five
  detector points give eyeLeft, eyeRight, nose, mouthLeft, mouthRight; the mesh, when it ran,
  gives the rest (pupils are the eye contour's centre: the 468-point model has no iris).
Not produced: Smile, Eyeglasses, Sunglasses, Beard, Mustache, Emotions, FaceOccluded,
EyeDirection (no model for them in the bundle), and OrientationCorrection (deprecated by AWS;
faceflow applies EXIF orientation before detection).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .facemesh import CHIN, LEFT_EYE_CONTOUR, MOUTH_CORNERS, NOSE_TIP, RIGHT_EYE_CONTOUR

# The detector's five points, in faceflow's order.
FIVE_POINT_TYPES = ("eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight")
# Rekognition landmark type -> mesh point indices (their mean); image's left and right.
MESH_LANDMARKS = {
    "leftEyeBrowLeft": (46,), "leftEyeBrowRight": (55,), "leftEyeBrowUp": (105,),
    "rightEyeBrowLeft": (285,), "rightEyeBrowRight": (276,), "rightEyeBrowUp": (334,),
    "leftEyeLeft": (33,), "leftEyeRight": (133,), "leftEyeUp": (159,), "leftEyeDown": (145,),
    "rightEyeLeft": (362,), "rightEyeRight": (263,), "rightEyeUp": (386,), "rightEyeDown": (374,),
    "noseLeft": (98,), "noseRight": (327,), "mouthUp": (0,), "mouthDown": (17,),
    "leftPupil": LEFT_EYE_CONTOUR, "rightPupil": RIGHT_EYE_CONTOUR,
    "upperJawlineLeft": (234,), "midJawlineLeft": (172,), "chinBottom": (CHIN,),
    "midJawlineRight": (397,), "upperJawlineRight": (454,),
}
# When there are no detector points, the five come from the mesh too.
MESH_FIVE = {"eyeLeft": LEFT_EYE_CONTOUR, "eyeRight": RIGHT_EYE_CONTOUR, "nose": (NOSE_TIP,),
             "mouthLeft": MOUTH_CORNERS[:1], "mouthRight": MOUTH_CORNERS[1:]}
NOT_PRODUCED = ("Smile", "Eyeglasses", "Sunglasses", "Beard", "Mustache", "Emotions",
                "FaceOccluded", "EyeDirection")


def detect_faces_response(report: dict[str, Any]) -> dict[str, Any]:
    """DetectFaces' response for one analysed still (Engine.analyze_picture's report)."""
    width, height = report["width"], report["height"]
    return {"FaceDetails": [face_detail(face, width, height) for face in report["faces"]]}


def face_detail(face: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    x, y, w, h = face["box"]
    left, top = _clip(x / width), _clip(y / height)
    detail: dict[str, Any] = {"BoundingBox": {
        "Width": round(_clip((x + w) / width) - left, 6),
        "Height": round(_clip((y + h) / height) - top, 6),
        "Left": round(left, 6), "Top": round(top, 6)}}
    age = face.get("age")
    if age and age.get("low") is not None:
        detail["AgeRange"] = {"Low": int(round(age["low"])), "High": int(round(age["high"]))}
    gender = face.get("gender")
    if gender and gender.get("value"):
        detail["Gender"] = {"Value": gender["value"].capitalize(),
                            "Confidence": _percent(gender["confidence"])}
    for ours, theirs in (("eyes_open", "EyesOpen"), ("mouth_open", "MouthOpen")):
        if face.get(ours):
            detail[theirs] = {"Value": bool(face[ours]["value"]),
                              "Confidence": _percent(face[ours]["confidence"])}
    detail["Landmarks"] = landmarks(face, width, height)
    pose = face.get("pose")
    if pose and pose.get("yaw") is not None:
        detail["Pose"] = {"Roll": float(pose["roll"]), "Yaw": float(pose["yaw"]),
                          "Pitch": float(pose["pitch"])}
    quality = face.get("quality")
    if quality and quality.get("sharpness") is not None:
        detail["Quality"] = {"Brightness": float(quality["brightness"]),
                             "Sharpness": float(quality["sharpness"])}
    detail["Confidence"] = _percent(face["score"])
    return detail


def landmarks(face: dict[str, Any], width: int, height: int) -> list[dict[str, Any]]:
    points: dict[str, tuple[float, float]] = {}
    mesh = np.asarray(face["mesh"], np.float64) if face.get("mesh") else None
    if face.get("landmarks"):
        points.update(zip(FIVE_POINT_TYPES, (tuple(p) for p in face["landmarks"])))
    elif mesh is not None:
        points.update({t: tuple(mesh[list(i), :2].mean(0)) for t, i in MESH_FIVE.items()})
    if mesh is not None:
        points.update({t: tuple(mesh[list(i), :2].mean(0)) for t, i in MESH_LANDMARKS.items()})
    return [{"Type": t, "X": round(float(px) / width, 6), "Y": round(float(py) / height, 6)}
            for t, (px, py) in points.items()]


def _clip(ratio: float) -> float:
    return min(1.0, max(0.0, float(ratio)))


def _percent(unit: float) -> float:
    return round(float(unit) * 100.0, 2)
