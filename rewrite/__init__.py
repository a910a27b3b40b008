"""rewrite: a compiler-style graph rewriter for parameter-efficient fine-tuning.

capture -> passes (LoRA, prompts, verbalizer, ...) -> train -> fold -> ONNX, on `torch.fx` graphs
captured by `torch.export`. The layers, each importing only from the ones below it:

1. engine (`rewrite/`): the IR and its typed info (`ir`), capture (`capture`, `synthetic_inputs`),
   graph queries (`graph`), graph building (`nodes`, `row_gather`, `prompt_table`, `modes`, `low_rank`: merging low-rank branches), the
   pass protocol, registry and pipeline (`pipeline`, `options`), training (`train`, its `losses`,
   `data`, `batches`, `checkpoint`, `distributed`, `params`), adapter files (`adapter`), archives
   (`archive`, `atomic`), export and serving (`export`, `runtime`, `predict`, `encoding`), templates, label words
   and PVP files (`templates`, `labels`). It never names a pass: it asks the passes in a graph's
   history through the `Pass` hooks.
2. passes (`rewrite.passes`, the `passes/` folder): one file per rewrite; each imports only the engine.
3. recipes (`rewrite.recipes`): applications on top (PET, the demo).
4. the command line (`rewrite.cli`, the `cli/` folder), and this module, which gathers the public API.

The public names are imported on first use, so `import rewrite.cli` (and `rewrite --help`) does not
load torch; `rewrite.apply(...)` and friends behave as if imported eagerly.
"""
from __future__ import annotations

import importlib
import sys
import types

_API = {
    "RewriteError": "rewrite.errors",
    "capture": "rewrite.capture",
    "load_pretrained": "rewrite.capture",
    "load": "rewrite.archive",
    "save": "rewrite.archive",
    "Pass": "rewrite.pipeline",
    "Pipeline": "rewrite.pipeline",
    "apply": "rewrite.pipeline",
    "register": "rewrite.pipeline",
    "print_trainable_parameters": "rewrite.params",
    "GraphInfo": "rewrite.ir",
    "RewriteGraph": "rewrite.ir",
    "load_adapter": "rewrite.adapter",
    "save_adapter": "rewrite.adapter",
    "export_onnx": "rewrite.export",
    "generate": "rewrite.generate",
    "verbose": "rewrite.quiet",
    "TrainConfig": "rewrite.train",
    "TrainResult": "rewrite.train",
    "evaluate": "rewrite.train",
    "train": "rewrite.train",
    "PVP": "rewrite.labels",
    "PetConfig": "rewrite.recipes.pet",
    "load_pvps": "rewrite.labels",
    "run_pet": "rewrite.recipes.pet",
    "zero_shot": "rewrite.recipes.pet",
}
__all__ = sorted(_API)


class _Package(types.ModuleType):
    """`rewrite.capture` and `rewrite.train` are functions, although submodules of the same names exist:
    loading such a submodule must not replace the function on the package."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


def __getattr__(name: str):
    if name not in _API:
        try:
            return importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. rewrite.passes
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_API[name]), name)
    importlib.import_module("rewrite.passes")  # registers the built-in passes
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


sys.modules[__name__].__class__ = _Package
