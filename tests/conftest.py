"""Shared fixtures. Real data comes from ../shared/data beside the checkout (or
$FACEFLOW_TEST_DATA); tests that need it skip with the reason when it is absent. Models are
fetched from the registries on first use into the default model folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from faceflow import bundle

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACEFLOW_TEST_DATA", ROOT.parent / "shared" / "data"))


def data_path(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"test data not found: {path} (set FACEFLOW_TEST_DATA or put shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def model_dir() -> Path:
    directory = bundle.default_model_dir()
    if bundle.verify(directory) if (directory / bundle.MANIFEST_NAME).exists() else True:
        bundle.fetch(directory)
    return directory


@pytest.fixture(scope="session")
def engine(model_dir):
    from faceflow.engine import Engine
    return Engine(model_dir=model_dir)


@pytest.fixture(scope="session")
def low_engine(model_dir):
    """The same detector at threshold 0.3, to look for faces left in anonymised output."""
    from faceflow.engine import Engine
    return Engine(model_dir=model_dir, threshold=0.3)


@pytest.fixture(scope="session")
def faces_gt() -> dict:
    return json.loads(data_path("faces_gt", "gt_faces.json").read_text())["images"]


@pytest.fixture(scope="session")
def astronaut_bgr():
    """skimage's astronaut(): one face, public domain."""
    skimage_data = pytest.importorskip("skimage.data")
    import cv2
    return cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)


def run_cli(*args: str, env: dict | None = None):
    """Run `python -m faceflow.cli` as a user would; returns CompletedProcess."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "faceflow.cli", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
