"""rewrite: a compiler-style graph rewriter for parameter-efficient fine-tuning.

capture -> passes (LoRA, ...) -> train -> fold -> ONNX, on `torch.fx` graphs captured by `torch.export`.
"""
from rewrite.errors import RewriteError
from rewrite.capture import capture, load_pretrained
from rewrite.archive import load, save
from rewrite.pipeline import Pass, Pipeline, apply, register
from rewrite.params import print_trainable_parameters
from rewrite.ir import RewriteGraph
from rewrite import passes  # noqa: F401  (registers the built-in passes)
from rewrite.adapter import load_adapter, save_adapter
from rewrite.export import export_onnx
from rewrite.generate import generate
from rewrite.train import TrainConfig, TrainResult, evaluate, train
from rewrite.pet import PVP, PetConfig, load_pvps, run_pet, zero_shot

__all__ = [
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
