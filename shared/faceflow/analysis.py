"""Face analysis: what faceflow can say about a face beyond where it is.

    analyzer = Analyzer(("gender", "age", "pose"))
    records = analyzer.analyze(bgr, faces)     # face.to_dict() plus the attributes, per face

A small model zoo: every attribute a user may ask for is named once in ATTRIBUTES, and each is
provided by one Estimator (an object with `names` and `estimate(bgr, faces) -> [dict]`). The
Analyzer builds only the estimators the chosen attributes need, runs the face mesh first when
one of them reads it, then each estimator once over all the faces.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import cv2
import numpy as np

from .face import Face

ATTRIBUTES = ("gender", "age", "pose", "quality", "eyes", "mesh")   # allowed values, one place
DEFAULT_ATTRIBUTES = ("gender", "age", "pose", "quality", "eyes")    # "mesh" only on request
# Attributes read from the 468-point mesh; age and gender align from it only a face without
# detector landmarks.
MESH_ATTRIBUTES = frozenset({"pose", "eyes", "mesh"})
# Bundle models each attribute loads (to tell, before loading, whether they are installed).
ATTRIBUTE_MODELS = {"gender": ("age", "gender"), "age": ("age", "gender"), "pose": ("facemesh",),
                    "eyes": ("facemesh",), "mesh": ("facemesh",), "quality": ()}

# Quality: the face crop is resized to this width before measuring, so sharpness does not
# depend on the face's size in pixels; variance of the Laplacian v maps to 100 v / (v + K).
QUALITY_WIDTH = 112
SHARPNESS_HALF = 150.0


@dataclass
class FaceContext:
    """What an estimator gets for one face."""
    face: Face
    mesh: np.ndarray | None = None   # (468, 3) float32 in image pixels when the mesh ran


class Estimator(Protocol):
    names: tuple[str, ...]

    def estimate(self, bgr: np.ndarray, faces: list[FaceContext]) -> list[dict]: ...


def parse_attributes(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Attribute names from "gender,age" or a list, checked, in ATTRIBUTES order, no repeats."""
    if text is None:
        return DEFAULT_ATTRIBUTES
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n and n != "none"]
    unknown = sorted(set(names) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown attribute(s) {', '.join(unknown)}; choose from {', '.join(ATTRIBUTES)}")
    return tuple(a for a in ATTRIBUTES if a in names)


def models_for(attributes) -> tuple[str, ...]:
    """Bundle model names the attributes load."""
    return tuple(dict.fromkeys(m for a in attributes for m in ATTRIBUTE_MODELS[a]))


# --- estimators --------------------------------------------------------------------------------

class Pose:
    """Yaw, pitch and roll from the mesh (see facemesh.head_pose)."""
    names = ("pose",)

    def estimate(self, bgr, faces):
        from .facemesh import head_pose
        return [{"pose": head_pose(c.mesh, bgr.shape[:2])} if c.mesh is not None else {}
                for c in faces]


class EyesMouth:
    """Eyes and mouth open or not, from the mesh's aspect ratios."""
    names = ("eyes",)

    def estimate(self, bgr, faces):
        from .facemesh import eyes_and_mouth
        return [eyes_and_mouth(c.mesh) if c.mesh is not None else {} for c in faces]


class MeshPoints:
    """The 468 points themselves, rounded to 0.1 px."""
    names = ("mesh",)

    def estimate(self, bgr, faces):
        return [{"mesh": np.round(c.mesh, 1).tolist()} if c.mesh is not None else {} for c in faces]


class Quality:
    """Sharpness and brightness of the face's own pixels, each 0..100.

    The crop is the detector box clipped to the image, in grey, resized to QUALITY_WIDTH wide.
    Brightness is its mean luma scaled to 0..100; sharpness maps the variance of its Laplacian
    v to 100 v / (v + SHARPNESS_HALF): 50 at SHARPNESS_HALF. On the real photos in the tests,
    faces in focus score 30-77 and the same faces after a 3 px Gaussian blur 1-12."""
    names = ("quality",)

    def estimate(self, bgr, faces):
        return [{"quality": face_quality(bgr, c.face)} for c in faces]


def face_quality(bgr: np.ndarray, face: Face) -> dict[str, float | None]:
    h, w = bgr.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in face.xyxy)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return {"sharpness": None, "brightness": None}
    crop = bgr[y0:y1, x0:x1]
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    height = max(1, round(grey.shape[0] * QUALITY_WIDTH / grey.shape[1]))
    interp = cv2.INTER_AREA if grey.shape[1] > QUALITY_WIDTH else cv2.INTER_LINEAR
    grey = cv2.resize(grey, (QUALITY_WIDTH, height), interpolation=interp)
    variance = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    return {"sharpness": round(100.0 * variance / (variance + SHARPNESS_HALF), 1),
            "brightness": round(float(grey.mean()) * 100.0 / 255.0, 1)}


def _age_gender(model_dir, providers, threads):
    from . import insightface_pack
    if insightface_pack.is_pack(model_dir):  # an operator's own pack: its genderage model
        return insightface_pack.InsightfaceGenderAge.from_pack(model_dir, providers, threads)
    from .agegender import AgeGender
    return AgeGender(model_dir=model_dir, providers=providers, threads=threads)


# Each estimator, built once however many of its attributes are chosen.
ESTIMATORS: dict[str, Callable[..., Estimator]] = {
    "agegender": _age_gender,
    "pose": lambda model_dir, providers, threads: Pose(),
    "eyes": lambda model_dir, providers, threads: EyesMouth(),
    "mesh": lambda model_dir, providers, threads: MeshPoints(),
    "quality": lambda model_dir, providers, threads: Quality(),
}
PROVIDER = {"gender": "agegender", "age": "agegender", "pose": "pose", "eyes": "eyes",
            "mesh": "mesh", "quality": "quality"}


class Analyzer:
    def __init__(self, attributes=DEFAULT_ATTRIBUTES, model_dir: Path | str | None = None,
                 providers=None, threads: int = 0):
        self.attributes = parse_attributes(attributes)
        self.mesh = None
        if MESH_ATTRIBUTES & set(self.attributes):
            from . import insightface_pack
            from .facemesh import FaceMesh
            # A pack holds no 468-point mesh: that comes from faceflow's own bundle.
            self.mesh = FaceMesh(None if insightface_pack.is_pack(model_dir) else model_dir,
                                 providers, threads)
        names = dict.fromkeys(PROVIDER[a] for a in self.attributes)
        self.estimators: list[Estimator] = [ESTIMATORS[n](model_dir, providers, threads)
                                            for n in names]
        release_freed_memory()

    def analyze(self, bgr: np.ndarray, faces: list[Face]) -> list[dict[str, Any]]:
        """face.to_dict() plus the chosen attributes, one dict per face, in the faces' order."""
        records = [f.to_dict() for f in faces]
        if not faces:
            return records
        meshes = self.mesh.run(bgr, faces) if self.mesh is not None else [None] * len(faces)
        contexts = [FaceContext(f, m) for f, m in zip(faces, meshes)]
        for estimator in self.estimators:
            wanted = set(estimator.names) & set(self.attributes)
            for record, found in zip(records, estimator.estimate(bgr, contexts)):
                record.update(_only(found, wanted))
        return records


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Loading a model parses the file and copies its weights more than once; glibc keeps the
    freed copies mapped, ~30 MB after the default analysis models, and the process's peak RSS
    then grows from there (bench/analyze.py)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def _only(found: dict, wanted: set[str]) -> dict:
    """An estimator's keys for the attributes asked for (AgeGender gives both age and gender;
    "eyes" gives eyes_open and mouth_open)."""
    if wanted >= {"gender", "age"} or not ({"gender", "age"} & wanted):
        return found
    return {k: v for k, v in found.items() if k not in {"gender", "age"} - wanted}
