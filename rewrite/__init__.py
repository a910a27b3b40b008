"""rewrite: a compiler-style graph rewriter for parameter-efficient fine-tuning.

capture -> passes (LoRA, prompts, verbalizer, ...) -> train -> fold -> ONNX, on `torch.fx` graphs
captured by `torch.export`. The layers, each importing only from the ones below it:

1. engine (`rewrite/`), bottom-up: `text/` (templates, label words, padding; no torch), `runtime/` (the
   serving runtime: model metadata, tokenizer, encoding, prediction, generation, adapter files; numpy,
   ONNX Runtime and tokenizers only), then `graph/` (the IR, capture, graph queries, node building, the
   pass protocol and pipeline, archives), `adapters/` (the layer adapter methods build on: target
   selection, branch sites, slot kinds, merges, PEFT files), `training/` (loop, data, losses, checkpoints,
   devices, the speed pipeline, graph templates), `export/` (ONNX, the KV cache, adapter slots), then
   `serve/` (the HTTP server), and the shared `errors`, `atomic`, `quiet`.
   It never names a pass: it asks the passes in a graph's history through the `Pass` hooks.
2. passes (`rewrite.passes`, the `passes/` folder): one file per rewrite; each imports only the engine.
3. recipes (`rewrite.recipes`): applications on top (PET, the demo).
4. the command line (`rewrite.cli`, the `cli/` folder), and this module, which gathers the public API.

The public names are imported on first use, so `import rewrite.cli` (and `rewrite --help`) does not
load torch; `rewrite.apply(...)` and friends behave as if imported eagerly.
"""
from __future__ import annotations

import importlib

_API = {
    "RewriteError": "rewrite.errors",
    "capture": "rewrite.graph.capture",
    "load_pretrained": "rewrite.graph.capture",
    "load": "rewrite.graph.archive",
    "save": "rewrite.graph.archive",
    "Pass": "rewrite.graph.pipeline",
    "Pipeline": "rewrite.graph.pipeline",
    "apply": "rewrite.graph.pipeline",
    "register": "rewrite.graph.pipeline",
    "print_trainable_parameters": "rewrite.graph.params",
    "GraphInfo": "rewrite.graph.ir",
    "RewriteGraph": "rewrite.graph.ir",
    "load_adapter": "rewrite.adapters.peft_files",
    "save_adapter": "rewrite.adapters.peft_files",
    "merge_adapters": "rewrite.adapters.merge",
    "export_onnx": "rewrite.export.onnx",
    "generate": "rewrite.runtime.generate",
    "verbose": "rewrite.quiet",
    "TrainConfig": "rewrite.training.train",
    "TrainResult": "rewrite.training.train",
    "evaluate": "rewrite.training.train",
    "train": "rewrite.training.train",
    "PVP": "rewrite.text.labels",
    "PetConfig": "rewrite.recipes.pet",
    "load_pvps": "rewrite.text.labels",
    "run_pet": "rewrite.recipes.pet",
    "zero_shot": "rewrite.recipes.pet",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        try:
            return importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. rewrite.passes
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})

