"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's (`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained`
loads what we save, and `load_adapter` applies what PEFT saved by running the LoRA pass from the
adapter's config and copying the weights in.

Prompt-learning adapters hold a `prompt_embeddings` tensor `[n, hidden]` (and a seq-cls head under
`base_model.<module path>`). A PROMPT_TUNING graph saves as one; PEFT's PROMPT_TUNING and P_TUNING
adapters load as prepended prompts through the prompt pass: PEFT saves a P_TUNING adapter's encoder
output, which it then prepends exactly as prompt tuning does. Our P-tuning puts prompts at template
positions, which PEFT cannot express, so such graphs are saved with `rewrite.save` instead.
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
from rewrite.graph import word_embedding
from rewrite.passes.prompt import TABLE, check_not_seq2seq
from rewrite.pipeline import apply

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."
PROMPT_KEY = "prompt_embeddings"
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")
SUPPORTED = ("LORA", *PROMPT_TYPES)
_PROMPT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_PEFT_TASK = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "feature-extraction": "FEATURE_EXTRACTION"}


def _runs(gm: fx.GraphModule, name: str) -> list[dict[str, Any]]:
    return [h for h in info(gm)["history"] if h["pass"] == name]


def _lora_config(gm: fx.GraphModule) -> dict[str, Any]:
    """One PEFT LoraConfig that reproduces every LoRA pass in the history, exactly per target."""
    runs = _runs(gm, "lora")
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


def _prompt_config(gm: fx.GraphModule) -> dict[str, Any]:
    """PEFT's PromptTuningConfig for the graph's prompt pass."""
    run = _runs(gm, "prompt")[-1]
    options, report = run["options"], run["report"]
    config = info(gm).get("config")
    return {
        "peft_type": "PROMPT_TUNING",
        # PEFT prompts only through a task class; FEATURE_EXTRACTION's prepends for any model (masked LMs)
        "task_type": _PEFT_TASK.get(info(gm).get("task"), "FEATURE_EXTRACTION"),
        "base_model_name_or_path": info(gm).get("source"),
        "num_virtual_tokens": report["num_virtual_tokens"],
        "token_dim": int(tensor_at(gm, TABLE).shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "prompt_tuning_init": _PROMPT_INIT[report["init"]],
        "prompt_tuning_init_text": options["init_text"],
        "tokenizer_name_or_path": info(gm).get("source") if options["init_text"] else None,
        "modules_to_save": info(gm).get("modules_to_save"),
        "inference_mode": True,
    }


def _prompt_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """`prompt_embeddings` and the trained head under PEFT's prompt-learning keys."""
    state = {PROMPT_KEY: tensor_at(gm, TABLE).detach().contiguous().cpu()}
    for name in info(gm).get("trainable", []):
        if name != TABLE:
            state[PROMPT_PREFIX + name] = tensor_at(gm, name).detach().contiguous().cpu()
    return state


def _adapter(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of the one PEFT adapter the graph's passes amount to."""
    if _runs(gm, "ptuning"):
        raise RewriteError("P-tuning puts prompts at template positions, which PEFT's P_TUNING (prepended prompts) "
                           "cannot express; save the graph with rewrite.save instead")
    if _runs(gm, "prompt"):
        if _runs(gm, "lora"):
            raise RewriteError("a PEFT adapter file holds either LoRA or prompt tuning, and this graph has both; "
                               "save the graph with rewrite.save instead")
        return _prompt_config(gm), _prompt_state(gm)
    return _lora_config(gm), adapter_state(gm)


def save_adapter(gm: fx.GraphModule, directory: str | Path) -> Path:
    """Writes `adapter_config.json` and `adapter_model.safetensors` that `PeftModel.from_pretrained` loads."""
    directory = Path(directory)
    config, state = _adapter(gm)
    with atomic_dir_files(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        safetensors.torch.save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
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
    if config.get("peft_type") not in SUPPORTED:
        raise RewriteError(f"adapter type {config.get('peft_type')!r} in {str(config_file)!r} is not supported; "
                           f"supported: {', '.join(SUPPORTED)}")
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


def _copy_weights(gm: fx.GraphModule, directory: Path, names: dict[str, str], weights: dict[str, torch.Tensor]) -> None:
    """Copies adapter tensor `names[name]` into the graph's `name`, after checking each one fits."""
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


def _saved_modules(config: dict[str, Any], names) -> list[str]:
    """The modules whose full weights the adapter holds, named as its config's `modules_to_save` names them
    (`classifier` for RoBERTa's `classifier.dense` and `classifier.out_proj`)."""
    declared = config.get("modules_to_save") or []
    return sorted({next((m for m in declared if name.startswith(m + ".")), name.rpartition(".")[0]) for name in names})


def _load_prompt(gm: fx.GraphModule, directory: Path, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """Runs the prompt pass for the adapter's virtual tokens and head, then copies `prompt_embeddings` in."""
    check_not_seq2seq(gm)
    if PROMPT_KEY not in weights:
        raise RewriteError(f"adapter {str(directory)!r} has no {PROMPT_KEY} tensor; it is not a prompt-learning adapter")
    hidden = tensor_at(gm, word_embedding(gm).args[0].target).shape[1]
    if weights[PROMPT_KEY].dim() != 2 or weights[PROMPT_KEY].shape[1] != hidden:
        raise RewriteError(f"adapter {str(directory)!r} holds prompts of shape {tuple(weights[PROMPT_KEY].shape)} but "
                           f"this model's embeddings are {hidden} wide; the adapter was made for another model")
    heads = {key.removeprefix(PROMPT_PREFIX): key for key in weights if key != PROMPT_KEY}
    apply(gm, "prompt", num_virtual_tokens=config["num_virtual_tokens"], modules_to_save=_saved_modules(config, heads))
    _copy_weights(gm, directory, {TABLE: PROMPT_KEY, **heads}, weights)


def load_adapter(gm: fx.GraphModule, directory: str | Path) -> fx.GraphModule:
    """Applies a PEFT-saved adapter: runs the LoRA or prompt pass from its config, then copies its weights in."""
    directory = Path(directory)
    config, weights = _read_adapter(directory)
    if config["peft_type"] in PROMPT_TYPES:
        _load_prompt(gm, directory, config, weights)
        return gm
    names = {key.removeprefix(PREFIX).replace(".default.", "."): key for key in weights}
    heads = [name for name in names if ".lora_" not in name]
    apply(gm, "lora", **_lora_options(config), modules_to_save=_saved_modules(config, heads))
    _copy_weights(gm, directory, names, weights)
    return gm
