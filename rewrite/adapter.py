"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

What goes into the files is each pass's business (`Pass.adapter_files`; LoRA writes PEFT's keys
`base_model.model.<module path>.lora_A.weight`, so `peft.PeftModel.from_pretrained` loads what we
save). This module asks the passes in the graph's history, writes atomically, and on the way back
reads and checks the files, lets the pass whose `peft_types` holds the adapter's type rebuild
itself from the config (`Pass.from_adapter`), and copies the weights in after checking each fits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import fx

from rewrite.errors import RewriteError
from rewrite.atomic import atomic_dir_files
from rewrite.ir import info, tensor_at
from rewrite.pipeline import AdapterFiles, Pass, applied, registered

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"
_PEFT_TASK = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "feature-extraction": "FEATURE_EXTRACTION"}


def peft_task_type(gm: fx.GraphModule) -> str | None:
    """PEFT's `task_type` for the graph's task (None where PEFT has none, e.g. masked LMs)."""
    return _PEFT_TASK.get(info(gm).task)


def adapter_base(gm: fx.GraphModule, prefix: str = PREFIX, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The trainable tensors (but `skip`) under PEFT's key names: `prefix` + the parameter name."""
    return {prefix + name: tensor_at(gm, name).detach().contiguous().cpu()
            for name in info(gm).trainable if name not in skip}


def adapter_files(gm: fx.GraphModule) -> AdapterFiles:
    """The one PEFT adapter the graph's passes amount to; each pass says what its part is."""
    parts = [(cls, files) for cls, runs in applied(gm) if (files := cls.adapter_files(gm, runs)) is not None]
    if not parts:
        makers = [cls.name for cls in registered() if cls.peft_types]
        raise RewriteError(f"the graph has no adapter to save; run a pass that adds one first ({', '.join(makers)}; "
                           "a folded adapter is part of the base weights)")
    if len(parts) > 1:
        (first, _), (second, _) = parts[:2]
        raise RewriteError(f"a PEFT adapter file holds either {first.title} or {second.title}, and this graph has "
                           "both; save the graph with rewrite.save instead")
    return parts[0][1]


def save_adapter(gm: fx.GraphModule, directory: str | Path) -> Path:
    """Writes `adapter_config.json` and `adapter_model.safetensors` that `PeftModel.from_pretrained` loads."""
    directory = Path(directory)
    files = adapter_files(gm)
    with atomic_dir_files(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(files.config, indent=2))
        safetensors.torch.save_file(files.tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return directory


def _loaders() -> dict[str, Any]:
    """PEFT adapter type -> the pass class that applies it."""
    return {peft_type: cls for cls in registered() for peft_type in cls.peft_types}


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise RewriteError(f"adapter directory {str(directory)!r} has no {file.name}; a PEFT adapter holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise RewriteError(f"{str(config_file)!r} is not valid JSON: {error}") from error
    try:
        weights = safetensors.torch.load_file(weights_file)
    except (safetensors.SafetensorError, OSError) as error:
        raise RewriteError(f"{str(weights_file)!r} is not a readable safetensors file ({error}); it may be truncated") from error
    if config.get("peft_type") not in _loaders():
        raise RewriteError(f"adapter type {config.get('peft_type')!r} in {str(config_file)!r} is not supported; "
                           f"supported: {', '.join(_loaders())}")
    return config, weights


def read_adapter_dir(directory: str | Path) -> tuple[type[Pass], dict[str, Any], dict[str, torch.Tensor]]:
    """The pass class that applies the PEFT adapter in `directory`, with the adapter's config and tensors."""
    config, weights = _read_adapter(Path(directory))
    return _loaders()[config["peft_type"]], config, weights


def copy_weights(gm: fx.GraphModule, directory: Path, names: dict[str, str], weights: dict[str, torch.Tensor]) -> None:
    """Copies adapter tensor `names[name]` into the graph's `name`, after checking each one fits."""
    for name in info(gm).trainable:
        if name not in names:
            raise RewriteError(f"adapter {str(directory)!r} has no weight for {name}; it does not fit this graph")
    for name, key in names.items():
        try:
            target = tensor_at(gm, name)
        except AttributeError:
            raise RewriteError(f"adapter weight {key} names no tensor in this graph; the adapter was made for another model") from None
        if tuple(target.shape) != tuple(weights[key].shape):
            raise RewriteError(
                f"adapter weight {key} has shape {tuple(weights[key].shape)} but this graph needs {tuple(target.shape)}; "
                "the adapter was made for another model"
            )
        with torch.no_grad():
            target.copy_(weights[key])


def load_adapter(gm: fx.GraphModule, directory: str | Path) -> fx.GraphModule:
    """Applies a PEFT-saved adapter: the pass for its type runs from its config, then its weights are copied in."""
    directory = Path(directory)
    config, weights = _read_adapter(directory)
    names = _loaders()[config["peft_type"]].from_adapter(gm, config, weights, str(directory))
    copy_weights(gm, directory, names, weights)
    return gm
