"""Fitting a masked LM's missing head on unlabeled text, the encoder frozen, written back as a Hugging Face directory.

Checkpoints saved from a bare encoder (sentence-embedding models such as MiniLM) ship no MLM head, so
transformers builds one at random and every cloze (PET's patterns, P-tuning's `[MASK]`) reads noise.
This recipe trains only the head's own weights: the token-wise transform between the encoder and the
vocabulary projection (BERT: dense, GELU, LayerNorm), found in the graph, and the projection's bias; a
decoder tied to the word embeddings stays tied. Training is `rewrite.training.train`'s masked-LM task (BERT's
15% masking), so the head is fitted exactly as the encoder was pre-trained to be read.

The output directory is the checkpoint's own files with the head's tensors added to its safetensors
weights under the masked-LM model's names; every other tensor (a pooler the MLM class does not use)
is kept, so the directory still loads as the same encoder for any other task.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import safetensors.torch
from torch import nn

from rewrite.atomic import atomic_dir_files
from rewrite.graph.capture import load_pretrained
from rewrite.text.examples import Example
from rewrite.errors import RewriteError
from rewrite.graph.query import find_mlm_head
from rewrite.graph.ir import RewriteGraph, info, tensor_at
from rewrite.graph.params import canonical_names, mark_trainable
from rewrite.training.train import TrainConfig, evaluate, train

TASK = "masked-lm"
INDEX = "model.safetensors.index.json"
HEAD_SHARD = "model-mlm-head.safetensors"
HELD_OUT = 1000  # texts kept out of training by default


@dataclass
class Score:
    """Masked-LM loss and masked-token accuracy on held-out text (the same masks before and after)."""

    loss: float
    accuracy: float


@dataclass
class HeadFit:
    graph: RewriteGraph
    parameters: list[str]
    before: Score
    after: Score
    steps: int

    def summary(self) -> dict:
        return {"parameters": self.parameters, "steps": self.steps, "before": asdict(self.before),
                "after": asdict(self.after)}


def default_training() -> TrainConfig:
    return TrainConfig(task=TASK, epochs=1, lr=2e-3, batch_size=32, warmup_ratio=0.05, progress=False)


def head_parameters(gm: RewriteGraph) -> list[str]:
    """The MLM head's own parameters: those its transform reads, and the decoder's unless they are the
    word embedding's (a tied decoder keeps reading the embedding; its bias is the head's)."""
    head = find_mlm_head(gm)
    embedding = tensor_at(gm, head.embedding.args[0].target)
    reads = [node for transform in head.transform for node in transform.all_input_nodes if node.op == "get_attr"]
    reads += [node for node in head.decoder.node.all_input_nodes
              if node.op == "get_attr" and tensor_at(gm, node.target) is not embedding]
    return canonical_names(gm, [node.target for node in reads if isinstance(tensor_at(gm, node.target), nn.Parameter)])


def held_out_size(count: int) -> int:
    """The default held-out set: 1000 texts, but never more than a tenth of the data (small data still trains)."""
    return max(1, min(HELD_OUT, count // 10))


def split_held_out(texts: Sequence[Example], size: int | None, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out): `size` examples drawn at random (default `held_out_size`) are kept out of training."""
    size = held_out_size(len(texts)) if size is None else size
    if size < 1:
        raise RewriteError(f"--held-out {size} leaves no held-out text to score the head on; hold out at least 1 "
                           "text, or give held-out text with --eval")
    if size >= len(texts):
        raise RewriteError(f"--held-out {size} needs more than {size} texts, and the data holds {len(texts)}; hold out "
                           "fewer, give more text, or give held-out text with --eval")
    chosen = set(random.Random(seed).sample(range(len(texts)), size))
    return ([e for i, e in enumerate(texts) if i not in chosen], [e for i, e in enumerate(texts) if i in chosen])


def score(gm: RewriteGraph, held_out: Sequence[Example], config: TrainConfig) -> Score:
    metrics = evaluate(gm, held_out, config=replace(config, task=TASK))
    return Score(metrics["loss"], metrics["accuracy"])


def fit_head(model_dir: str | Path, texts: Sequence[Example], held_out: Sequence[Example],
             config: TrainConfig | None = None) -> HeadFit:
    """Captures `model_dir` as a masked LM and trains its head alone on `texts` (masked-LM loss)."""
    config = replace(config or default_training(), task=TASK)
    gm = load_pretrained(model_dir, task=TASK)
    parameters = head_parameters(gm)
    mark_trainable(gm, parameters)
    before = score(gm, held_out, config)
    result = train(gm, list(texts), config=config)
    return HeadFit(gm, parameters, before, score(gm, held_out, config), result.steps)


def _weights(model_dir: Path) -> tuple[list[Path], dict | None]:
    """The checkpoint's safetensors files and, when sharded, its index."""
    index = model_dir / INDEX
    if index.is_file():
        return [], json.loads(index.read_text(encoding="utf-8"))
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single], None
    raise RewriteError(f"model directory {str(model_dir)!r} has neither model.safetensors nor {INDEX}; "
                       "the head is added to a checkpoint's safetensors weights")


def _config(gm: RewriteGraph, model_dir: Path) -> dict:
    """The checkpoint's config.json, naming the masked-LM class that now finds every weight."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = [info(gm).model_class]
    return config


def write_model_dir(fit: HeadFit, model_dir: str | Path, output: str | Path, *, overwrite: bool = False,
                    provenance: dict | None = None) -> Path:
    """`model_dir`'s files plus the fitted head's tensors, as a new directory (written whole or not at all),
    with `mlm_head.json`: the fit's scores and `provenance` (what it was fitted on)."""
    model_dir, output = Path(model_dir), Path(output)
    head = {name: fit.graph.get_parameter(name).detach().cpu().contiguous() for name in fit.parameters}
    files, index = _weights(model_dir)
    with atomic_dir_files(output, overwrite=overwrite) as tmp:
        for item in model_dir.iterdir():
            if item.suffix == ".safetensors" or item.name in (INDEX, "config.json"):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        if index is None:
            tensors = safetensors.torch.load_file(files[0])
            safetensors.torch.save_file({**tensors, **head}, tmp / files[0].name, metadata={"format": "pt"})
        else:
            for shard in sorted(set(index["weight_map"].values())):
                shutil.copy2(model_dir / shard, tmp / shard)
            safetensors.torch.save_file(head, tmp / HEAD_SHARD, metadata={"format": "pt"})
            index["weight_map"].update({name: HEAD_SHARD for name in head})
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(_config(fit.graph, model_dir), indent=2) + "\n", encoding="utf-8")
        report = {"model": str(model_dir), **(provenance or {}), **fit.summary()}
        (tmp / "mlm_head.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return output
