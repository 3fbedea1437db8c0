"""The identity check of bench/swap.py, run in the bench-only environment (dlib's face
recognition ResNet from face-recognition-models, a model faceflow does not use):

    python3 -m venv bench/.venv-identity
    bench/.venv-identity/bin/pip install -r bench/requirements-identity.txt
    echo '{"source": ..., "source_box": [x, y, w, h], "pairs": [...]}' | bench/.venv-identity/bin/python bench/identity.py

Reads a JSON request on stdin: the source photo (and its face box), and pairs of
{before, after, box}: one target face before and after the swap. Writes, per pair, the
Euclidean distance of the swapped face's 128-d descriptor to the source face's (`to_source`)
and to the original face's (`to_original`), and the original's to the source's (`apart`):
dlib's own threshold for "same person" is 0.6. Faces are located by the boxes given (dlib's
68-point shape predictor aligns each), so both tools look at the same faces.
"""
from __future__ import annotations

import json
import sys

import dlib
import face_recognition_models
import numpy as np
from PIL import Image

_shapes = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
_model = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
_images: dict[str, np.ndarray] = {}


def _image(path: str) -> np.ndarray:
    if path not in _images:
        with Image.open(path) as im:
            _images[path] = np.ascontiguousarray(np.asarray(im.convert("RGB")))
    return _images[path]


def descriptor(path: str, box) -> np.ndarray | None:
    image = _image(path)
    x, y, w, h = (int(round(v)) for v in box)
    if w < 20 or h < 20:
        return None
    rect = dlib.rectangle(max(0, x), max(0, y), min(image.shape[1] - 1, x + w), min(image.shape[0] - 1, y + h))
    shape = _shapes(image, rect)
    return np.asarray(_model.compute_face_descriptor(image, shape, 1))


def source_box(path: str):
    """The largest face dlib's own detector finds, when the request names no box."""
    found = dlib.get_frontal_face_detector()(_image(path), 1)
    if not found:
        return None
    r = max(found, key=lambda r: r.width() * r.height())
    return [r.left(), r.top(), r.width(), r.height()]


def main() -> int:
    request = json.load(sys.stdin)
    box = request.get("source_box") or source_box(request["source"])
    source = None if box is None else descriptor(request["source"], box)
    rows = []
    for pair in request["pairs"]:
        before, after = descriptor(pair["before"], pair["box"]), descriptor(pair["after"], pair["box"])
        if source is None or before is None or after is None:
            rows.append({"to_source": None, "to_original": None, "apart": None})
            continue
        rows.append({"to_source": round(float(np.linalg.norm(after - source)), 4),
                     "to_original": round(float(np.linalg.norm(after - before)), 4),
                     "apart": round(float(np.linalg.norm(before - source)), 4)})
    json.dump({"source_found": source is not None, "pairs": rows}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
