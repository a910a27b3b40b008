"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

What goes into the files is each pass's business (`Pass.adapter_files`; LoRA writes PEFT's keys
`base_model.model.<module path>.lora_A.weight`, so `peft.PeftModel.from_pretrained` loads what we
save). This module asks the passes in the graph's history, writes atomically, and on the way back
reads and checks the files, lets the pass (`PeftReader`) whose `peft_types` holds the adapter's type rebuild
itself from the config (`Pass.from_adapter`), and copies the weights in after checking each fits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import safetensors
import safetensors.torch
import torch
from torch import fx

from rewrite.errors import RewriteError
from rewrite.atomic import atomic_dir_files
from rewrite.graph.ir import info, tensor_at
from rewrite.graph.params import non_finite
from rewrite.graph.pipeline import AdapterFiles, Pass, capable, implements, registered
from rewrite.graph.transaction import all_or_nothing

class PeftWriter(Protocol):
    """A pass whose runs amount to (part of) a PEFT adapter."""

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence[Pass]) -> AdapterFiles | None:
        """The PEFT adapter these runs amount to; raise RewriteError if PEFT cannot express them."""


class PeftReader(Protocol):
    """A pass that applies PEFT adapters of `peft_types`. Variants of one type (LoRA and DoRA are PEFT's LORA)
    tell theirs apart with a classmethod `accepts(config) -> bool`."""

    peft_types: ClassVar[tuple[str, ...]]

    @classmethod
    def from_adapter(cls, gm: fx.GraphModule, config: dict[str, Any], weights: dict[str, torch.Tensor],
                     origin: str) -> dict[str, str]:
        """Runs this pass as the adapter's config describes; returns, per graph tensor name, the adapter key whose
        weight the engine copies into it."""


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"
_PEFT_TASK = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "feature-extraction": "FEATURE_EXTRACTION"}


def peft_task_type(gm: fx.GraphModule) -> str | None:
    """PEFT's `task_type` for the graph's task (None where PEFT has none, e.g. masked LMs)."""
    return _PEFT_TASK.get(info(gm).task)


def saved_modules(config: dict[str, Any], names) -> list[str]:
    """The modules whose full weights an adapter holds (`names` are their parameters), as its config's
    `modules_to_save` names them: `classifier` for RoBERTa's `classifier.dense` and `classifier.out_proj`."""
    declared = config.get("modules_to_save") or []
    return sorted({next((m for m in declared if name.startswith(m + ".")), name.rpartition(".")[0]) for name in names})


def adapter_base(gm: fx.GraphModule, prefix: str = PREFIX, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The trainable tensors (but `skip`) under PEFT's key names: `prefix` + the parameter name."""
    return {prefix + name: tensor_at(gm, name).detach().contiguous().cpu()
            for name in info(gm).trainable if name not in skip}


def adapter_files(gm: fx.GraphModule) -> AdapterFiles:
    """The one PEFT adapter the graph's passes amount to; each pass says what its part is."""
    parts = [(cls, files) for cls, runs in capable(gm, PeftWriter) if (files := cls.adapter_files(gm, runs)) is not None]
    if not parts:
        makers = [cls.name for cls in _readers()]
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


def _types() -> list[str]:
    return list(dict.fromkeys(t for cls in _readers() for t in cls.peft_types))


def _readers() -> list[type[PeftReader]]:
    return [cls for cls in registered() if implements(cls, PeftReader)]


def _accepts(cls: type[PeftReader], config: dict[str, Any]) -> bool:
    return config.get("peft_type") in cls.peft_types and (not hasattr(cls, "accepts") or cls.accepts(config))


def _loader(config: dict[str, Any]) -> type[Pass]:
    """The pass that applies a PEFT adapter of this config: one of its type's passes that accepts it (PEFT's
    LORA type is LoRA, or DoRA with `use_dora`)."""
    return next(cls for cls in _readers() if _accepts(cls, config))


def read_adapter_files(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter directory's config and tensors, checked as files (present, readable, finite), whatever its
    type: what reads adapters without applying them (`rewrite.adapters.merge`) starts from."""
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise RewriteError(f"adapter directory {str(directory)!r} has no {file.name}; a PEFT adapter holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RewriteError(f"{str(config_file)!r} is not valid UTF-8 JSON: {error}") from error
    if not isinstance(config, dict):
        raise RewriteError(f"{str(config_file)!r} holds a JSON {type(config).__name__}, not an object; "
                           "an adapter config is a JSON object like PEFT's")
    try:
        weights = safetensors.torch.load_file(weights_file)
    except (safetensors.SafetensorError, OSError) as error:
        raise RewriteError(f"{str(weights_file)!r} is not a readable safetensors file ({error}); it may be truncated") from error
    bad = non_finite(weights.items())
    if bad:
        raise RewriteError(f"adapter weight {bad} in {str(weights_file)!r} holds NaN or infinite values; "
                           "the adapter is corrupt")
    return config, weights


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config, weights = read_adapter_files(directory)
    if not any(_accepts(cls, config) for cls in _readers()):
        raise RewriteError(f"adapter type {config.get('peft_type')!r} in {str(directory / CONFIG_NAME)!r} is not "
                           f"supported with these settings; supported: {', '.join(_types())}")
    return config, weights


def read_adapter_dir(directory: str | Path) -> tuple[type[Pass], dict[str, Any], dict[str, torch.Tensor]]:
    """The pass class that applies the PEFT adapter in `directory`, with the adapter's config and tensors."""
    config, weights = _read_adapter(Path(directory))
    return _loader(config), config, weights


def copy_weights(gm: fx.GraphModule, directory: Path, names: dict[str, str], weights: dict[str, torch.Tensor]) -> None:
    """Copies adapter tensor `names[name]` into the graph's `name`, after checking each one fits."""
    for name in info(gm).trainable:
        if name not in names:
            raise RewriteError(f"adapter {str(directory)!r} has no weight for {name}; it does not fit this graph")
    targets = {}
    for name, key in names.items():
        try:
            targets[key] = tensor_at(gm, name)
        except AttributeError:
            raise RewriteError(f"adapter weight {key} names no tensor in this graph; the adapter was made for another model") from None
        if tuple(targets[key].shape) != tuple(weights[key].shape):
            raise RewriteError(
                f"adapter weight {key} has shape {tuple(weights[key].shape)} but this graph needs "
                f"{tuple(targets[key].shape)}; the adapter was made for another model"
            )
    with torch.no_grad():  # only once every weight fits: a refused adapter changes nothing
        for key, target in targets.items():
            target.copy_(weights[key])


def load_adapter(gm: fx.GraphModule, directory: str | Path) -> fx.GraphModule:
    """Applies a PEFT-saved adapter: the pass for its type runs from its config, then its weights are copied in."""
    directory = Path(directory)
    config, weights = _read_adapter(directory)
    with all_or_nothing(gm):  # a refused adapter leaves no half-made pass behind
        try:
            names = _loader(config).from_adapter(gm, config, weights, str(directory))
        except KeyError as error:
            raise RewriteError(f"{str(directory / CONFIG_NAME)!r} lacks {error.args[0]}, which a "
                               f"{config['peft_type']} adapter config needs") from None
        copy_weights(gm, directory, names, weights)
    return gm
