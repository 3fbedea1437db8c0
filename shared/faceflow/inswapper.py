"""insightface's INSwapper as a faceflow swap engine, on weights the operator supplies.

The operator puts `inswapper_128.onnx` and an ArcFace recognition model (`w600k_r50.onnx`, e.g.
from a `buffalo_l` pack) in the model folder. faceflow hands both to
`insightface.model_zoo.get_model`, which picks INSwapper (two inputs, 128x128) and ArcFaceONNX
(112x112) from the graphs' signatures; the source face's embedding comes from ArcFace, and
`INSwapper.get(image, target, source, paste_back=True)` aligns the target from its 5 points,
maps the embedding through the `emap` matrix (the graph's last initializer), runs the graph and
pastes the face back. These weights are licensed for non-commercial research only and are about
530 MB: faceflow never ships or downloads them, and says so on load.

insightface is optional: `pip install --no-deps insightface` plus the `insightface` extra (see
faceflow.insightface_pack).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bundle, runtime, synthetic
from .face import Face
from .insightface_pack import _import_model_zoo

log = logging.getLogger("faceflow")

SWAPPER_FILE = "inswapper_128.onnx"
RECOGNITION_FILE = "w600k_r50.onnx"
LICENCE_WARNING = (
    "using insightface's INSwapper ({swapper}) and ArcFace ({recognition}): these weights are "
    "licensed for non-commercial research only; faceflow does not ship or download them, and you "
    "are responsible for your right to use them")


class InsightfaceFace(dict):
    """The part of insightface's app.common.Face that its models read and write: keys read and
    written as attributes (`face.kps`, `face.embedding = ...`), and `normed_embedding`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    @property
    def normed_embedding(self) -> np.ndarray:
        embedding = self["embedding"]
        return embedding / np.linalg.norm(embedding)


def to_insightface(face: Face) -> InsightfaceFace:
    x, y, w, h = face.box
    return InsightfaceFace(bbox=np.array([x, y, x + w, y + h], np.float32), det_score=face.score,
                           kps=np.asarray(face.landmarks, np.float32).reshape(5, 2))


@dataclass
class InswapperSource:
    face: InsightfaceFace   # with its ArcFace embedding


def model_files(model_dir) -> tuple[Path, Path]:
    """The two files in the model folder; a clear error naming what is missing."""
    folder = Path(model_dir) if model_dir else bundle.default_model_dir()
    swapper, recognition = folder / SWAPPER_FILE, folder / RECOGNITION_FILE
    missing = [p.name for p in (swapper, recognition) if not p.is_file()]
    if missing:
        raise bundle.ModelError(
            f"the inswapper engine needs {' and '.join(missing)} in {folder}: insightface's "
            "weights are not shipped or downloaded by faceflow (non-commercial licence); put "
            "your own copies there, or use the default landmark engine")
    return swapper, recognition


class InswapperSwapper:
    name = "inswapper"
    digital_source_type = synthetic.TRAINED_ALGORITHMIC_MEDIA
    needs_mesh = False

    def __init__(self, model_dir=None, providers=None, threads: int = 0):
        swapper_path, recognition_path = model_files(model_dir)
        model_zoo = _import_model_zoo()
        log.warning(LICENCE_WARNING.format(swapper=swapper_path, recognition=recognition_path))
        chosen = runtime.resolve_providers(providers)
        options = runtime.session_options(threads)
        self.swapper = model_zoo.get_model(str(swapper_path), providers=chosen, sess_options=options)
        self.recognition = model_zoo.get_model(str(recognition_path), providers=chosen, sess_options=options)
        from insightface.model_zoo.inswapper import INSwapper  # not re-exported by model_zoo
        if not isinstance(self.swapper, INSwapper):
            raise bundle.ModelError(f"{swapper_path} is not an INSwapper graph "
                                    f"(insightface read it as {type(self.swapper).__name__})")
        if not isinstance(self.recognition, model_zoo.ArcFaceONNX):
            raise bundle.ModelError(f"{recognition_path} is not an ArcFace recognition graph "
                                    f"(insightface read it as {type(self.recognition).__name__})")

    def prepare(self, bgr: np.ndarray, face: Face) -> InswapperSource:
        if face.landmarks is None:
            raise bundle.ModelError("the inswapper engine needs a detector that gives 5 landmarks")
        source = to_insightface(face)
        self.recognition.get(bgr, source)   # sets source.embedding
        return InswapperSource(source)

    def paste_face(self, bgr: np.ndarray, source: InswapperSource, face: Face) -> None:
        """Swap one face in place (INSwapper returns a new picture; copied back)."""
        out = self.swapper.get(bgr, to_insightface(face), source.face, paste_back=True)
        bgr[...] = out
