"""onnxruntime sessions with explicitly named providers."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger("faceflow")

CPU = ["CPUExecutionProvider"]
GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def resolve_providers(requested: list[str] | str | None = None) -> list[str]:
    """The providers to use, in order, limited to what this onnxruntime build has.

    `requested` may be a list, "cpu", "gpu", or None (FACEFLOW_PROVIDERS or CPU). The
    default list is never onnxruntime's own, which here starts with AzureExecutionProvider.
    """
    if requested is None:
        requested = os.environ.get("FACEFLOW_PROVIDERS", "cpu")
    if isinstance(requested, str):
        requested = {"cpu": CPU, "gpu": GPU}.get(requested.lower()) or requested.split(",")
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    if not chosen or chosen == ["CPUExecutionProvider"] and requested[0] != "CPUExecutionProvider":
        log.warning("none of %s available (have %s); running on CPU", requested, sorted(available))
        chosen = CPU
    return chosen


def session(path: Path | str, providers: list[str] | str | None = None,
            threads: int = 0) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=session_options(threads),
                                providers=resolve_providers(providers))


def session_options(threads: int = 0) -> ort.SessionOptions:
    """How faceflow runs every model (its own and an operator's insightface pack)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads  # 0: onnxruntime picks (one per core)
    opts.inter_op_num_threads = 1
    # Threads that spin while waiting for work take the cores video decoding and encoding
    # (and other processes) need; waiting costs less than the cycles they burn.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts
