"""What an ONNX export is made of (`Signature`), shared by the plain export and its options (the KV
cache). The metadata keys it writes are `rewrite.runtime.schema`'s."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx

from rewrite.graph.ir import info, tensor_at

Compare = Callable[[str, torch.Tensor, torch.Tensor], tuple[float, float]]  # (name, reference, actual) -> (diff, tolerance)


@dataclass
class Signature:
    """What `torch.onnx.export` is given, what goes into the model's metadata, and how the file is verified.

    The plain export builds one from the graph; options such as the KV cache (`rewrite.export.kv_cache`) build
    another from the same graph, so every export writes, checks and verifies files the same way.
    """

    module: fx.GraphModule
    inputs: dict[str, Any]
    dynamic: dict[str, Any]
    input_names: list[str]
    output_names: list[str]
    metadata: dict[str, str]
    verify: Callable[[Path, Compare], tuple[float, float, str]]  # the file, and how export compares an output
    onnx_input_names: list[str] | None = None  # names for flattened inputs (None: the keyword names)
    slots: Any = None  # the `rewrite.export.onnx_adapters.SlotExport` that finishes the written file, if any


def vocab_size(gm: fx.GraphModule) -> int:
    """From the config, else from the first embedding table in the graph."""
    config = info(gm).config
    if getattr(config, "vocab_size", None):
        return config.vocab_size
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default):
        return tensor_at(gm, node.args[0].target).shape[0]
    return 2
