"""insightface's own model packs (e.g. a `buffalo_l` folder) run through insightface's own
`model_zoo` classes, for operators who have such a pack and may use it.

faceflow never ships or downloads these packs: insightface's pretrained models are for
non-commercial research only. An operator points `--models` (the model folder) at a pack
folder; `is_pack` tells such a folder from a faceflow model bundle (no faceflow manifest,
some .onnx files), and `load_pack` hands every .onnx file to
`insightface.model_zoo.get_model`, which picks the class from the graph's signature:
SCRFD (detection, 5+ outputs), Attribute (96x96 input: genderage), Landmark (192x192:
2d106det, 1k3d68), ArcFaceONNX (112x112: recognition, unused here).

insightface is an optional dependency: install it with `pip install --no-deps insightface`
(its wheel requires the GUI opencv-python) plus the `insightface` extra, which lists what its
model_zoo imports.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import bundle, runtime
from .detectors import Detector
from .face import Face

log = logging.getLogger("faceflow")

LICENCE_WARNING = (
    "using insightface model pack {path}: insightface's pretrained models are licensed for "
    "non-commercial research only; faceflow does not ship them, and you are responsible "
    "for your right to use them")
# SCRFD's input size when the graph leaves it free: insightface's own default (640x640).
SCRFD_INPUT = 640
GENDERAGE_LABELS = ("female", "male")   # insightface: argmax 1 is "M"


def is_pack(model_dir: Path | str | None) -> bool:
    """A folder of .onnx files that is not a faceflow model folder: no faceflow manifest and
    none of the files faceflow's manifest names (a half-fetched bundle is not a pack)."""
    if model_dir is None:
        return False
    folder = Path(model_dir)
    if not folder.is_dir() or (folder / bundle.MANIFEST_NAME).exists():
        return False
    names = {p.name for p in folder.glob("*.onnx")}
    faceflow_files = {entry["file"] for entry in bundle.load_manifest()["models"].values()}
    return bool(names) and not names & faceflow_files


def _import_model_zoo():
    try:
        from insightface import model_zoo
    except ImportError as exc:
        raise bundle.ModelError(
            "this model folder is an insightface pack, which needs the insightface package: "
            "pip install --no-deps insightface && pip install 'faceflow[insightface]'") from exc
    return model_zoo


class _InsightfaceFace(dict):
    """insightface's app.common.Face in the small part its models read: a dict whose keys
    read as attributes (`face.bbox`), without importing insightface.app."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _to_insightface(face: Face) -> _InsightfaceFace:
    x, y, w, h = face.box
    out = _InsightfaceFace(bbox=np.array([x, y, x + w, y + h], np.float32), det_score=face.score)
    if face.landmarks is not None:
        out["kps"] = np.asarray(face.landmarks, np.float32)
    return out


class _RecordingSession:
    """Wraps an onnxruntime session to keep the last raw output: insightface's Attribute
    returns only argmax and age, and the answer's confidence needs the scores behind it."""

    def __init__(self, session):
        self._session = session
        self.last = None

    def run(self, *args, **kwargs):
        self.last = self._session.run(*args, **kwargs)
        return self.last

    def __getattr__(self, name):
        return getattr(self._session, name)


@dataclass
class Pack:
    """What one insightface pack folder holds, as insightface's own model objects."""
    path: Path
    detector: object | None = None         # insightface.model_zoo.SCRFD
    genderage: object | None = None        # insightface.model_zoo.Attribute (taskname genderage)
    landmarks: list = field(default_factory=list)   # insightface.model_zoo.Landmark
    unused: dict[str, str] = field(default_factory=dict)   # file -> why it is not used


def load_pack(model_dir: Path | str, providers=None, threads: int = 0) -> Pack:
    """Route every .onnx in the folder through insightface.model_zoo.get_model; warn once
    about the licence."""
    model_zoo = _import_model_zoo()
    folder = Path(model_dir)
    log.warning(LICENCE_WARNING.format(path=folder))
    pack = Pack(folder)
    chosen = runtime.resolve_providers(providers)
    for path in sorted(folder.glob("*.onnx")):
        model = model_zoo.get_model(str(path), providers=chosen, sess_options=runtime.session_options(threads))
        task = getattr(model, "taskname", None)
        if isinstance(model, model_zoo.SCRFD) and pack.detector is None:
            pack.detector = model
        elif isinstance(model, model_zoo.Attribute) and task == "genderage" and pack.genderage is None:
            pack.genderage = model
        elif isinstance(model, model_zoo.Landmark):
            pack.landmarks.append(model)
        else:
            pack.unused[path.name] = f"{type(model).__name__ if model else 'unrecognised'} ({task})"
    if pack.unused:
        log.info("insightface pack %s: not used: %s", folder, pack.unused)
    return pack


class InsightfaceDetector(Detector):
    """insightface's SCRFD behind faceflow's Detector interface (its own session and
    preprocessing: no faceflow Letterbox). Boxes come back as [x, y, w, h] with SCRFD's five points
    (image-left eye, image-right eye, nose, mouth corners: faceflow's order)."""
    name = "scrfd"
    default_threshold = 0.5       # insightface's det_thresh

    def __init__(self, model, path: Path | str, max_side: int | None = None):  # noqa: super() makes a session
        self.model = model
        self.path = Path(path)
        self.max_side = max_side or SCRFD_INPUT

    @property
    def providers(self) -> list[str]:
        return self.model.session.get_providers()

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[Face]:
        threshold = self.default_threshold if threshold is None else threshold
        dets, kpss = self.model.detect(image, input_size=(self.max_side, self.max_side),
                                       det_thresh=threshold)
        faces = []
        for i, (x1, y1, x2, y2, score) in enumerate(np.asarray(dets, np.float64)):
            landmarks = None if kpss is None else np.asarray(kpss[i], np.float32).reshape(5, 2)
            faces.append(Face(box=(x1, y1, x2 - x1, y2 - y1), score=float(score), landmarks=landmarks))
        return faces

    def detect_batch(self, images: list[np.ndarray], threshold: float | None = None) -> list[list[Face]]:
        return [self.detect(image, threshold) for image in images]


def load_detector(model_dir: Path | str, providers=None, threads: int = 0,
                  max_side: int | None = None) -> InsightfaceDetector:
    pack = load_pack(model_dir, providers, threads)
    if pack.detector is None:
        raise bundle.ModelError(f"insightface pack {model_dir} holds no SCRFD detector")
    return InsightfaceDetector(pack.detector, pack.detector.model_file, max_side)


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """The two gender scores as probabilities (softmax, unless they already are)."""
    scores = np.asarray(scores, np.float64)
    if (scores >= 0).all() and abs(scores.sum() - 1) < 1e-3:
        return scores
    e = np.exp(scores - scores.max())
    return e / e.sum()


class InsightfaceGenderAge:
    """insightface's genderage model as a faceflow estimator (faceflow.analysis's Estimator
    protocol). insightface's Attribute.get crops the face from its box and answers argmax
    gender and one age; it has no age distribution, so `age.low` and `age.high` are null."""
    names = ("gender", "age")

    def __init__(self, model):
        self.model = model
        self.model.session = self._recorder = _RecordingSession(model.session)

    @classmethod
    def from_pack(cls, model_dir: Path | str, providers=None, threads: int = 0) -> "InsightfaceGenderAge":
        pack = load_pack(model_dir, providers, threads)
        if pack.genderage is None:
            raise bundle.ModelError(f"insightface pack {model_dir} holds no genderage model")
        return cls(pack.genderage)

    def estimate(self, bgr: np.ndarray, faces: list) -> list[dict]:
        from .agegender import GENDER_MIN_CONFIDENCE, age_bucket
        out = []
        for context in faces:
            face = _to_insightface(context.face)
            gender_index, age = self.model.get(bgr, face)
            probs = _probabilities(self._recorder.last[0][0][:2])
            confidence = float(probs[int(gender_index)])
            out.append({
                "gender": {"value": GENDERAGE_LABELS[int(gender_index)]
                           if confidence >= GENDER_MIN_CONFIDENCE else None,
                           "confidence": round(confidence, 4)},
                "age": {"value": float(age), "low": None, "high": None, "bucket": age_bucket(float(age))},
            })
        return out
