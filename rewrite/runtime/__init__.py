"""Running an exported model without the training stack (numpy, ONNX Runtime, tokenizers; never torch or
transformers): ONNX Runtime sessions (here; the CUDA provider when it can load, else CPU), the model's metadata
(`schema`), its tokenizer and text encoding, prediction, generation with the cache, and adapter files."""
from __future__ import annotations

import ctypes.util
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from rewrite.runtime.huge_pages import backed_by_huge_pages


def providers() -> list[str]:
    """CUDA first only when it can actually load: onnxruntime-gpu lists it even on machines without a GPU, so
    the CUDA driver library must be present too."""
    if "CUDAExecutionProvider" in ort.get_available_providers() and ctypes.util.find_library("cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(path: str | Path, threads: int | None = None, huge_pages: bool = False) -> ort.InferenceSession:
    """`huge_pages`: the weights the CPU provider loads go in huge pages (`rewrite.runtime.huge_pages`), for a session
    that runs step after step over them (generation), at a cost when it loads."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    chosen = providers()
    with backed_by_huge_pages() if huge_pages and chosen[0] == "CPUExecutionProvider" else nullcontext():
        return ort.InferenceSession(str(path), sess_options=options, providers=chosen)


def run(sess: ort.InferenceSession, inputs: dict[str, Any],
        options: ort.RunOptions | None = None) -> dict[str, np.ndarray]:
    """Feeds the inputs the model declares, adapter slots included (extra keys are ignored), and returns
    outputs by name. Inputs are arrays or anything numpy reads as one (a CPU tensor)."""
    wanted = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    feed = {k: np.asarray(v) for k, v in inputs.items() if k in wanted}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed, options)))
