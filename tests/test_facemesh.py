"""The 468-point face mesh on real faces, and what faceflow reads from it (pose, eyes, mouth)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from conftest import data_path
from faceflow import facemesh
from faceflow.face import Face


@pytest.fixture(scope="module")
def mesh_model(model_dir):
    return facemesh.FaceMesh(model_dir)


def _one_face(engine, bgr) -> Face:
    faces = engine.detect(bgr)
    assert len(faces) == 1, faces
    return faces[0]


def _eye_centres(mesh):
    return (mesh[list(facemesh.LEFT_EYE_CONTOUR), :2].mean(0),
            mesh[list(facemesh.RIGHT_EYE_CONTOUR), :2].mean(0))


def test_mesh_lands_on_the_face(engine, mesh_model, astronaut_bgr):
    face = _one_face(engine, astronaut_bgr)
    mesh = mesh_model.run(astronaut_bgr, [face])[0]
    assert mesh.shape == (facemesh.MESH_POINTS, 3) and mesh.dtype == np.float32
    # Its eyes, nose tip and mouth corners are where the detector put its five points.
    five = np.array([*_eye_centres(mesh), mesh[facemesh.NOSE_TIP, :2],
                     mesh[facemesh.MOUTH_CORNERS[0], :2], mesh[facemesh.MOUTH_CORNERS[1], :2]])
    error = np.linalg.norm(five - face.landmarks, axis=1) / face.size
    assert error.max() < 0.08, error
    # The chin is below the mouth, the face oval about the box's size.
    assert mesh[facemesh.CHIN, 1] > mesh[facemesh.MOUTH_CORNERS[0], 1]
    width = mesh[:, 0].max() - mesh[:, 0].min()
    assert 0.7 < width / face.box[2] < 1.4


def test_mesh_follows_a_rotated_face(engine, mesh_model, astronaut_bgr):
    """The crop is turned upright by the eye line and the points mapped back: the mesh of a
    rotated photo is the rotated mesh of the photo."""
    face = _one_face(engine, astronaut_bgr)
    mesh = mesh_model.run(astronaut_bgr, [face])[0]
    h, w = astronaut_bgr.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), 35, 1.0)
    rotated = cv2.warpAffine(astronaut_bgr, turn, (w, h), borderMode=cv2.BORDER_REPLICATE)
    face_r = _one_face(engine, rotated)
    # The detector's eye points drift on this tilted face (its eye line is off by > 10
    # degrees): the mesh's own eye line turns the crop again.
    assert abs(facemesh.roll_of(face_r) - (facemesh.roll_of(face) - 35)) > facemesh.RECROP_DEGREES
    mesh_r = mesh_model.run(rotated, [face_r])[0]
    assert facemesh.mesh_roll(mesh_r) == pytest.approx(facemesh.mesh_roll(mesh) - 35, abs=5)
    expected = mesh[:, :2] @ turn[:, :2].T + turn[:, 2]
    error = np.linalg.norm(mesh_r[:, :2] - expected, axis=1)
    assert np.median(error) < 0.04 * face.size, np.median(error)


def test_crop_transform_round_trip():
    face = Face(box=(100, 50, 80, 100), score=0.9,
                landmarks=np.array([[120, 90], [160, 100], [140, 115], [125, 130], [155, 138]], np.float32))
    m = facemesh.crop_transform(face)
    points = np.array([[0, 0, 1], [96, 96, -2], [191, 10, 3]], np.float32)
    image = facemesh.to_image(points, m)
    back = image[:, :2] @ m[:, :2].T + m[:, 2]
    assert np.allclose(back, points[:, :2], atol=1e-3)
    # The crop is 1.5x the box's longer side: 192 crop px are 150 image px (z scales the same).
    assert np.linalg.norm(image[1, :2] - image[0, :2]) == pytest.approx(96 * math.sqrt(2) * 150 / 192, rel=1e-4)
    assert image[1, 2] == pytest.approx(-2 * 150 / 192, rel=1e-4)


def _rotation(yaw=0.0, pitch=0.0, roll=0.0) -> np.ndarray:
    """A head rotation in camera axes (x right, y down, z away from the camera), built from the
    documented meaning of each angle, independently of head_pose's own decomposition."""
    y, p, r = (math.radians(v) for v in (yaw, pitch, roll))
    # Turning to its own left: the face's forward vector (towards the camera, -z) swings to +x.
    ry = np.array([[math.cos(y), 0, -math.sin(y)], [0, 1, 0], [math.sin(y), 0, math.cos(y)]])
    # Looking up: forward swings to -y (up in the image).
    rx = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    # Clockwise in the image: x turns towards y.
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.mark.parametrize("yaw,pitch,roll", [(25, 0, 0), (-25, 0, 0), (0, 20, 0), (0, -20, 0),
                                            (0, 0, 15), (0, 0, -15), (20, -10, 8)])
def test_pose_signs_on_a_projected_canonical_face(yaw, pitch, roll):
    rotation = _rotation(yaw, pitch, roll)
    size, focal = (480, 640), 640.0
    points = facemesh._PNP_MODEL @ rotation.T + (0, 0, 60.0)
    projected = points[:, :2] / points[:, 2:] * focal + (320, 240)
    mesh = np.zeros((facemesh.MESH_POINTS, 3), np.float32)
    mesh[facemesh._PNP_INDICES, :2] = projected
    pose = facemesh.head_pose(mesh, size)
    assert pose["yaw"] == pytest.approx(yaw, abs=1.0)
    assert pose["pitch"] == pytest.approx(pitch, abs=1.0)
    assert pose["roll"] == pytest.approx(roll, abs=1.0)


def test_pose_of_real_faces(engine, mesh_model, astronaut_bgr):
    face = _one_face(engine, astronaut_bgr)
    pose = facemesh.head_pose(mesh_model.run(astronaut_bgr, [face])[0], astronaut_bgr.shape[:2])
    assert abs(pose["yaw"]) < 15 and abs(pose["roll"]) < 10, pose  # a frontal, upright face

    # A face turned to its right (nose towards the image's left, by eye) in a real photo:
    # yaw < 0, and > 0 in the mirrored photo; roll changes sign with the mirror too. (A profile:
    # the mesh reads it as well under 90 degrees, see README.)
    bgr = cv2.imread(str(data_path("images", "vladmandic_sample2.jpg")))
    faces = engine.detect(bgr)
    turned = min(faces, key=lambda f: f.box[0])  # the leftmost face, near profile
    mesh = mesh_model.run(bgr, [turned])[0]
    pose = facemesh.head_pose(mesh, bgr.shape[:2])
    eyes_mid_x = np.mean([c[0] for c in _eye_centres(mesh)])
    assert mesh[facemesh.NOSE_TIP, 0] < eyes_mid_x  # the nose is left of the eyes' middle
    assert pose["yaw"] < -12, pose
    mirrored = np.ascontiguousarray(bgr[:, ::-1])
    face_m = max(engine.detect(mirrored), key=lambda f: f.box[0])
    pose_m = facemesh.head_pose(mesh_model.run(mirrored, [face_m])[0], mirrored.shape[:2])
    # The same sign; not the same size: near profile the model is not mirror-symmetric.
    assert pose_m["yaw"] > 12, (pose, pose_m)


def test_roll_of_a_photo_turned_clockwise(engine, mesh_model, astronaut_bgr):
    h, w = astronaut_bgr.shape[:2]
    # OpenCV's positive angle turns the picture counter-clockwise: -20 turns it clockwise.
    clockwise = cv2.warpAffine(astronaut_bgr, cv2.getRotationMatrix2D((w / 2, h / 2), -20, 1.0), (w, h),
                               borderMode=cv2.BORDER_REPLICATE)
    face = _one_face(engine, clockwise)
    pose = facemesh.head_pose(mesh_model.run(clockwise, [face])[0], clockwise.shape[:2])
    upright = facemesh.head_pose(mesh_model.run(astronaut_bgr, [_one_face(engine, astronaut_bgr)])[0],
                                 astronaut_bgr.shape[:2])
    assert pose["roll"] - upright["roll"] == pytest.approx(20, abs=4)


def test_eyes_and_mouth(engine, mesh_model):
    bgr = cv2.imread(str(data_path("images", "pyfeat_multi_face.jpg")))
    faces = engine.detect(bgr)
    meshes = mesh_model.run(bgr, faces)
    assert len(meshes) == 5
    for mesh in meshes:  # five people with their eyes open (by eye)
        read = facemesh.eyes_and_mouth(mesh)
        assert read["eyes_open"]["value"] is True, read
        assert 0.5 <= read["eyes_open"]["confidence"] <= 1
    # The same mesh with both upper lids moved onto the lower ones: closed, confidently.
    closed = meshes[0].copy()
    for _corners, pairs in (facemesh.LEFT_EYE_LIDS, facemesh.RIGHT_EYE_LIDS):
        for upper, lower in pairs:
            closed[upper] = closed[lower]
    read = facemesh.eyes_and_mouth(closed)
    assert read["eyes_open"] == {"value": False, "confidence": pytest.approx(1.0, abs=0.01)}
    # Lips apart by 40% of the mouth's width: open.
    opened = meshes[0].copy()
    width = np.linalg.norm(opened[61, :2] - opened[291, :2])
    for upper, lower in facemesh.INNER_LIPS:
        opened[lower, :2] = opened[upper, :2] + (0, 0.4 * width)
    assert facemesh.eyes_and_mouth(opened)["mouth_open"]["value"] is True


def test_no_faces_no_work(mesh_model, astronaut_bgr):
    assert mesh_model.run(astronaut_bgr, []) == []


def test_a_face_looking_at_the_camera_off_centre_is_frontal():
    """Pose is relative to the line of sight: a face in a corner of the picture that looks
    straight into the lens has yaw and pitch ~0."""
    t = np.array([18.0, -12.0, 60.0])
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(z, t / np.linalg.norm(t))
    angle = math.acos(float(z @ t) / np.linalg.norm(t))
    rotation = cv2.Rodrigues(axis / np.linalg.norm(axis) * angle)[0]
    points = facemesh._PNP_MODEL @ rotation.T + t
    projected = points[:, :2] / points[:, 2:] * 640.0 + (320, 240)
    mesh = np.zeros((facemesh.MESH_POINTS, 3), np.float32)
    mesh[facemesh._PNP_INDICES, :2] = projected
    pose = facemesh.head_pose(mesh, (480, 640))
    assert abs(pose["yaw"]) < 2 and abs(pose["pitch"]) < 2 and abs(pose["roll"]) < 3, pose


def _clip_frames(wanted: set[int]):
    import av
    frames = {}
    with av.open(str(data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4"))) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="bgr24")
            if i >= max(wanted):
                break
    return frames


def test_mouth_open_in_a_real_clip(engine, mesh_model):
    """Frames 0 (lips together, looking down) and 300 (laughing, teeth showing, eyes open),
    by eye."""
    frames = _clip_frames({0, 300})
    read = {i: facemesh.eyes_and_mouth(mesh_model.run(bgr, [_one_face(engine, bgr)])[0])
            for i, bgr in frames.items()}
    assert read[0]["mouth_open"]["value"] is False and read[300]["mouth_open"]["value"] is True, read
    assert read[300]["eyes_open"]["value"] is True, read


@pytest.mark.xfail(strict=True, reason="known limit of the bundled 468-point model: on a real "
                   "closed-eye sequence its lids stay apart (ratio ~0.25-0.27, as open eyes), so "
                   "eyes_open reads open; see README")
def test_closed_eyes_in_a_real_clip(engine, mesh_model):
    """Frames 86-92 of the clip: eyes shut (screwed up, by eye), no hand over the face yet."""
    for i, bgr in _clip_frames({86, 88, 90, 92}).items():
        mesh = mesh_model.run(bgr, [_one_face(engine, bgr)])[0]
        assert facemesh.eyes_and_mouth(mesh)["eyes_open"]["value"] is False, i
