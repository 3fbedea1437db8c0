"""Age and gender: dlib's chip geometry reproduced, the answer's shape and rules, and gender on
the by-eye labelled set (tests/data/attribute_labels.json) at the rate the README reports."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from faceflow import agegender
from faceflow.agegender import (AGE_CHIP, DLIB_TEMPLATE5, MESH_DLIB5, AgeGender, age_bucket,
                                age_from_distribution, chip_transform, dlib5_from_detector,
                                face_chip, gender_from_probabilities, similarity_transform)
from faceflow.face import Face

from conftest import ROOT, data_path

try:
    from faceflow.analysis import FaceContext
except ImportError:      # faceflow.analysis comes with the mesh; the estimator reads only these two
    @dataclass
    class FaceContext:
        face: Face
        mesh: np.ndarray | None = None


@pytest.fixture(scope="module")
def estimator(model_dir):
    return AgeGender(model_dir=model_dir, threads=1)


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


# --- pure arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize("years, bucket", [
    (0.25, "0-2"), (5, "4-6"), (13.4, "8-12"), (13.6, "15-20"), (23, "25-32"),
    (35, "38-43"),       # 3 years from both 25-32 and 38-43: the nearer middle (40.5) wins
    (55, "48-53"), (58, "60-100"), (80, "60-100"),
])
def test_age_bucket_is_the_nearest_adience_bracket(years, bucket):
    assert age_bucket(years) == bucket


def test_age_from_a_certain_distribution():
    probs = np.zeros(81)
    probs[30] = 1
    assert age_from_distribution(probs) == {"value": 30.0, "low": 30, "high": 30, "bucket": "25-32"}
    probs = np.zeros(81)
    probs[0] = 1      # the package's weight for class 0 is a quarter year
    assert age_from_distribution(probs)["value"] == pytest.approx(0.25, abs=0.05)   # rounded to 0.1


def test_age_range_is_the_distributions_10th_to_90th_percentile():
    probs = np.zeros(81)
    probs[20:41] = 1 / 21          # uniform over 20..40
    age = age_from_distribution(probs)
    assert age["value"] == pytest.approx(30, abs=0.05)
    assert (age["low"], age["high"]) == (22, 38)
    assert age["bucket"] == "25-32"


def test_gender_is_null_below_the_threshold():
    t = agegender.GENDER_MIN_CONFIDENCE
    assert gender_from_probabilities([0.1, 0.9]) == {"value": "male", "confidence": 0.9}
    assert gender_from_probabilities([0.97, 0.03]) == {"value": "female", "confidence": 0.97}
    below = gender_from_probabilities([1 - (t - 0.01), t - 0.01])
    assert below["value"] is None and below["confidence"] == pytest.approx(t - 0.01)


def test_similarity_transform_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    m_true = np.hstack([2.5 * _rotation(17), [[40.0], [-12.0]]])
    dst = src @ m_true[:, :2].T + m_true[:, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), m_true, atol=1e-9)


def _umeyama(src, dst):
    """Umeyama's least-squares similarity through the SVD, as dlib computes it."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    scale = np.trace(np.diag(sv) @ sign) / ((s ** 2).sum() / len(src))
    linear = scale * u @ sign @ vt
    return np.hstack([linear, (mu_d - linear @ mu_s)[:, None]])


def test_similarity_transform_is_umeyamas_on_noisy_and_mirrored_points():
    # The closed form must give Umeyama's answer where no similarity fits exactly, mirrored
    # point sets (the best proper rotation) included.
    rng = np.random.default_rng(1)
    for _ in range(200):
        src = rng.uniform(0, 100, (5, 2))
        dst = src @ (rng.uniform(0.2, 4) * _rotation(rng.uniform(-180, 180))).T + rng.normal(0, 3, (5, 2))
        if rng.random() < 0.3:
            dst[:, 0] *= -1
        np.testing.assert_allclose(similarity_transform(src, dst), _umeyama(src, dst), rtol=1e-9, atol=1e-9)


def test_chip_puts_dlibs_points_where_dlibs_template_says():
    """Five points that are an exact similarity of dlib's template land, in the chip, on the
    template's padded positions, for a small face and for a large one (pyramid path)."""
    size, padding = AGE_CHIP, agegender.CHIP_PADDING
    expected = (padding + DLIB_TEMPLATE5) / (2 * padding + 1) * size
    for scale, angle in ((0.7, 0), (6.0, -20)):
        m = np.hstack([scale * _rotation(angle), [[300.0], [280.0]]])
        points = expected @ m[:, :2].T + m[:, 2]
        to_image = chip_transform(points, size)
        mapped = expected @ to_image[:, :2].T + to_image[:, 2]
        # dlib centres its chip rectangle on where the similarity maps the chip's centre and
        # spans it over size - 1 pixel steps: the two agree to within a chip pixel
        assert np.abs(mapped - points).max() / scale < 1.0

        image = np.zeros((720, 720, 3), np.uint8)
        radius = max(2, int(round(1.2 * scale)))
        for x, y in points:
            cv2.circle(image, (int(round(x * 16)), int(round(y * 16))), radius * 16, (255, 255, 255), -1,
                       cv2.LINE_AA, shift=4)
        chip = face_chip(image, points, size)[..., 0].astype(float)
        for x, y in expected:
            window = chip[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]
            ys, xs = np.mgrid[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]
            assert window.sum() > 0, f"no dot near {x:.1f},{y:.1f} at scale {scale}"
            cx, cy = (xs * window).sum() / window.sum(), (ys * window).sum() / window.sum()
            assert abs(cx - x) < 1.0 and abs(cy - y) < 1.0


def test_chip_outside_the_image_is_black():
    image = np.full((100, 100, 3), 200, np.uint8)
    points = (agegender.CHIP_PADDING + DLIB_TEMPLATE5) / 1.4 * 80 - 40   # half off the top-left
    chip = face_chip(image, points, 32)
    assert chip[0, 0].sum() == 0 and chip[-1, -1].sum() == 600


def test_detector_landmarks_map_onto_dlibs_points(faces_gt):
    """The 5 detector points (eye centres, nose tip, mouth corners) taken from the 68 hand
    landmarks give dlib's points (eye corners 36/39/42/45, nose base 33) within 0.1 of
    the eye distance on average."""
    errors = []
    for entry in faces_gt.values():
        for face in entry["faces"]:
            lm = np.asarray(face["landmarks68"], float)
            five = np.array([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])
            truth = lm[[45, 42, 36, 39, 33]]
            eyes = np.linalg.norm(five[1] - five[0])
            errors.append(np.linalg.norm(dlib5_from_detector(five) - truth, axis=1).mean() / eyes)
    assert len(errors) == 18 and np.mean(errors) < 0.1


# --- the estimator ------------------------------------------------------------------------------

def test_estimator_contract(estimator):
    assert AgeGender.names == ("gender", "age")
    blank = np.zeros((64, 64, 3), np.uint8)
    assert estimator.estimate(blank, []) == []
    no_landmarks = FaceContext(face=Face(box=(0, 0, 10, 10), score=0.9), mesh=None)
    assert estimator.estimate(blank, [no_landmarks]) == [
        {"gender": {"value": None, "confidence": 0.0}, "age": None}]


def test_astronaut(estimator, engine, astronaut_bgr):
    """skimage's astronaut (Eileen Collins, a woman then about 40): by eye female, 25-55."""
    faces = engine.detect(astronaut_bgr)
    assert len(faces) == 1
    (result,) = estimator.estimate(astronaut_bgr, [FaceContext(face=faces[0], mesh=None)])
    # The model leans female (0.77 here, near GENDER_MIN_CONFIDENCE): assert the lean, not
    # that it clears the threshold.
    _, gender = estimator.probabilities(astronaut_bgr, [dlib5_from_detector(faces[0].landmarks)])
    assert gender[0][0] > gender[0][1]
    assert result["gender"]["value"] in ("female", None)
    age = result["age"]
    assert 25 <= age["value"] <= 55 and age["low"] <= age["value"] <= age["high"]
    assert age["bucket"] in {f"{lo}-{hi}" for lo, hi in agegender.AGE_BRACKETS}
    json.dumps(result)   # plain JSON types


def test_batched_faces_equal_one_at_a_time(estimator, engine):
    image = cv2.imread(str(data_path("images", "pyfeat_multi_face.jpg")))
    contexts = [FaceContext(face=f, mesh=None) for f in engine.detect(image)]
    assert len(contexts) == 5
    together = estimator.estimate(image, contexts)
    alone = [estimator.estimate(image, [c])[0] for c in contexts]
    for a, b in zip(together, alone):
        assert a["gender"]["value"] == b["gender"]["value"]
        assert a["gender"]["confidence"] == pytest.approx(b["gender"]["confidence"], abs=1e-3)
        assert a["age"]["value"] == pytest.approx(b["age"]["value"], abs=0.2)


def test_mesh_points_align_a_face_without_landmarks(estimator, astronaut_bgr, engine):
    """Without detector landmarks, alignment reads the mesh's eye corners and nose base
    (MESH_DLIB5): the answer is that of the same points given directly."""
    face = engine.detect(astronaut_bgr)[0]
    points = dlib5_from_detector(face.landmarks)
    mesh = np.zeros((468, 3), np.float32)
    mesh[list(MESH_DLIB5), :2] = points
    no_landmarks = Face(box=face.box, score=face.score, landmarks=None)
    with_mesh = estimator.estimate(astronaut_bgr, [FaceContext(face=no_landmarks, mesh=mesh)])[0]
    age, gender = estimator.probabilities(astronaut_bgr, [points])
    # the mesh is float32: equal to the float64 points' answer up to rounding
    expected_gender, expected_age = gender_from_probabilities(gender[0]), age_from_distribution(age[0])
    assert with_mesh["gender"]["value"] == expected_gender["value"]
    assert with_mesh["gender"]["confidence"] == pytest.approx(expected_gender["confidence"], abs=1e-3)
    assert with_mesh["age"]["value"] == pytest.approx(expected_age["value"], abs=0.15)
    assert with_mesh["age"]["bucket"] == expected_age["bucket"]


def test_detector_landmarks_align_before_the_mesh(estimator, astronaut_bgr, engine):
    """With both, the detector's landmarks align the chips (they read better on the labelled
    set, see AgeGender.alignment_points): a nonsense mesh changes nothing."""
    face = engine.detect(astronaut_bgr)[0]
    nonsense_mesh = np.zeros((468, 3), np.float32)
    with_mesh = estimator.estimate(astronaut_bgr, [FaceContext(face=face, mesh=nonsense_mesh)])[0]
    without = estimator.estimate(astronaut_bgr, [FaceContext(face=face, mesh=None)])[0]
    assert with_mesh == without
    assert with_mesh["gender"]["value"] is not None and with_mesh["age"] is not None


# --- accuracy on the labelled set ---------------------------------------------------------------

def _accuracy_module():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.data
def test_gender_on_the_labelled_set_at_the_reported_rate(model_dir):
    """README, "Age and gender": over the 37 labelled faces, 34 answered (3 null) and 33 of
    them right (97%); if always answering, 35 right; age in the labelled range for 31.
    Without insightface's t1.jpg (6 faces) no more misses than that on the other 31."""
    data_path("images")
    accuracy = _accuracy_module()
    rows, missing = accuracy.evaluate(Path(data_path()), model_dir)
    assert set(missing) <= {"insightface:t1.jpg"}, missing
    found = [r for r in rows if r["found"]]
    assert len(found) == len(rows) == (31 if missing else 37)
    totals = accuracy.summarise(rows)["all"]
    assert totals["answered"] - totals["correct"] <= 1
    assert totals["faces"] - totals["answered"] <= 3
    assert totals["faces"] - totals["forced_correct"] <= 2
    assert totals["faces"] - totals["age_in_range"] <= 6


def test_blob_is_the_networks_normalisation_in_nchw():
    # The blob is written chip by chip from views (channel-reversed, mirrored): it must equal
    # (RGB - mean) / 256 transposed to NCHW, whatever the views' strides.
    rng = np.random.default_rng(3)
    bgr = [rng.integers(0, 256, (AGE_CHIP, AGE_CHIP, 3), dtype=np.uint8) for _ in range(3)]
    chips = [bgr[0][..., ::-1], bgr[1][..., ::-1][:, ::-1], bgr[2]]
    expected = np.stack([(c.astype(np.float32) - agegender.CHANNEL_MEANS_RGB) * np.float32(1 / 256)
                         for c in chips]).transpose(0, 3, 1, 2)
    got = AgeGender.blob(chips)
    assert got.shape == (3, 3, AGE_CHIP, AGE_CHIP) and got.dtype == np.float32
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
