"""rewrite: a compiler-style graph rewriter for parameter-efficient fine-tuning.

capture -> passes (LoRA, prompts, verbalizer, ...) -> train -> fold -> ONNX, on `torch.fx` graphs
captured by `torch.export`. The layers, each importing only from the ones below it:

1. engine (`rewrite/`): the IR and its typed info (`ir`), capture (`capture`, `synthetic_inputs`),
   graph queries (`graph`), graph building (`nodes`, `row_gather`, `prompt_table`, `modes`), the
   pass protocol, registry and pipeline (`pipeline`, `options`), training (`train`, its `losses`,
   `data`, `batches`, `checkpoint`, `distributed`, `params`), adapter files (`adapter`), archives
   (`archive`, `atomic`), export and serving (`export`, `runtime`, `predict`), templates, label words
   and PVP files (`templates`, `labels`). It never names a pass: it asks the passes in a graph's
   history through the `Pass` hooks.
2. passes (`rewrite.passes`, the `passes/` folder): one file per rewrite; each imports only the engine.
3. recipes (`rewrite.recipes`): applications on top (PET, the demo).
4. the command line (`rewrite.cli`, the `cli/` folder), and this module, which gathers the public API.
"""
from rewrite.errors import RewriteError
from rewrite.capture import capture, load_pretrained
from rewrite.archive import load, save
from rewrite.pipeline import Pass, Pipeline, apply, register
from rewrite.params import print_trainable_parameters
from rewrite.ir import GraphInfo, RewriteGraph
from rewrite import passes  # noqa: F401  (registers the built-in passes)
from rewrite.adapter import load_adapter, save_adapter
from rewrite.export import export_onnx
from rewrite.generate import generate
from rewrite.train import TrainConfig, TrainResult, evaluate, train
from rewrite.labels import PVP, load_pvps
from rewrite.recipes.pet import PetConfig, run_pet, zero_shot

__all__ = [
    "GraphInfo",
    "PVP",
    "PetConfig",
    "RewriteError",
    "RewriteGraph",
    "TrainConfig",
    "TrainResult",
    "Pass",
    "Pipeline",
    "apply",
    "capture",
    "evaluate",
    "export_onnx",
    "generate",
    "load",
    "load_adapter",
    "load_pretrained",
    "load_pvps",
    "print_trainable_parameters",
    "register",
    "run_pet",
    "save",
    "save_adapter",
    "train",
    "zero_shot",
]
