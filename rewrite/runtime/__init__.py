"""Running an exported model without the training stack: ONNX Runtime sessions (here; the CUDA provider when a GPU
is present, else CPU), the model's metadata, its text encoding, prediction, generation with the cache, and
adapter files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch


def providers() -> list[str]:
    """CUDA first only when it can actually load (onnxruntime-gpu lists it even on machines without CUDA)."""
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=providers())


def run(sess: ort.InferenceSession, inputs: dict[str, torch.Tensor | np.ndarray],
        options: ort.RunOptions | None = None) -> dict[str, np.ndarray]:
    """Feeds the inputs the model declares, adapter slots included (extra keys are ignored), and returns
    outputs by name."""
    wanted = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    feed = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items() if k in wanted}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed, options)))
