"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's (`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained`
loads what we save, and `load_adapter` applies what PEFT saved by running the LoRA pass from the
adapter's config and copying the weights in.
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
from rewrite.files import atomic_dir_files
from rewrite.ir import info, tensor_at
from rewrite.pipeline import apply

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PEFT_TASK = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "feature-extraction": "FEATURE_EXTRACTION"}


def _lora_runs(gm: fx.GraphModule) -> list[dict[str, Any]]:
    return [h for h in info(gm)["history"] if h["pass"] == "lora"]


def _lora_config(gm: fx.GraphModule) -> dict[str, Any]:
    """One PEFT LoraConfig that reproduces every LoRA pass in the history, exactly per target."""
    runs = _lora_runs(gm)
    if not runs:
        raise RewriteError("the graph has no LoRA adapter to save; run the lora pass first (it may have been folded)")
    if len({r["options"]["rslora"] for r in runs}) > 1 or len({r["options"]["dropout"] for r in runs}) > 1:
        raise RewriteError("LoRA passes with different rslora or dropout settings cannot share one PEFT adapter file")
    ranks = {path: rank for r in runs for path, rank in r["report"]["ranks"].items()}
    alphas = {path: alpha for r in runs for path, alpha in r["report"]["alphas"].items()}
    rank, alpha = next(iter(ranks.values())), next(iter(alphas.values()))
    options = runs[0]["options"]
    return {
        "peft_type": "LORA",
        "task_type": _PEFT_TASK.get(info(gm).get("task")),
        "base_model_name_or_path": info(gm).get("source"),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": options["dropout"],
        "use_rslora": options["rslora"],
        "init_lora_weights": True if options["init"] == "kaiming" else options["init"],
        "target_modules": sorted(ranks),
        "rank_pattern": {p: r for p, r in ranks.items() if r != rank},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "fan_in_fan_out": any(r["report"]["fan_in_fan_out"] for r in runs),
        "bias": "none",
        "modules_to_save": info(gm).get("modules_to_save"),
        "inference_mode": True,
    }


def adapter_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The trainable tensors under PEFT's key names."""
    return {
        PREFIX + name: tensor_at(gm, name).detach().contiguous().cpu()
        for name in info(gm).get("trainable", [])
    }


def save_adapter(gm: fx.GraphModule, directory: str | Path) -> Path:
    """Writes `adapter_config.json` and `adapter_model.safetensors` that `PeftModel.from_pretrained` loads."""
    directory = Path(directory)
    config = _lora_config(gm)
    with atomic_dir_files(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        safetensors.torch.save_file(adapter_state(gm), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return directory


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
    if config.get("peft_type") != "LORA":
        raise RewriteError(f"adapter type {config.get('peft_type')!r} in {str(config_file)!r} is not supported; supported: LORA")
    return config, weights


def _lora_options(config: dict[str, Any]) -> dict[str, Any]:
    init = config.get("init_lora_weights", True)
    return {
        "targets": config["target_modules"],
        "exclude": config.get("exclude_modules"),
        "layers": config.get("layers_to_transform"),
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "dropout": config.get("lora_dropout", 0.0),
        "rslora": config.get("use_rslora", False),
        "init": init if isinstance(init, str) and init == "gaussian" else "kaiming",
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
    }


def load_adapter(gm: fx.GraphModule, directory: str | Path) -> fx.GraphModule:
    """Applies a PEFT-saved LoRA adapter: runs the LoRA pass from its config, then copies its weights in."""
    directory = Path(directory)
    config, weights = _read_adapter(directory)
    names = {key.removeprefix(PREFIX).replace(".default.", "."): key for key in weights}
    apply(gm, "lora", **_lora_options(config))
    for name in info(gm)["trainable"]:
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
    return gm
