"""Training a rewritten graph: `rewrite.training.train(gm, train_data, eval_data=..., config=TrainConfig(...))`.

    import rewrite
    from rewrite.training.train import TrainConfig

    gm = rewrite.load_pretrained(model_dir, task="seq-cls", num_labels=2)
    rewrite.apply(gm, "lora", rank=8, alpha=16, roles=["q", "v"])
    result = rewrite.train(gm, "train.jsonl", eval_data="dev.jsonl",
                           config=TrainConfig(output_dir="out", epochs=2, lr=2e-3, batch_size=32))
    result.eval["accuracy"]

`train(gm, train_data, *, eval_data=None, config, loss_fn=None) -> TrainResult`

- `gm`: a RewriteGraph; only the parameters the passes made trainable (`gm.info.trainable`) are
  optimized (AdamW; weight decay on matrices only, as Hugging Face's Trainer does). It is trained in
  place and left in eval mode on the training device.
- `train_data` / `eval_data`: a `.jsonl`, `.csv` or `.tsv` file, an iterable of row dicts, or
  already validated `rewrite.text.examples.Example`s. Classification rows hold `config.fields.text` (and
  `.pair`) and `.label`: a class id, a label name (`config.label_names`, default the model's
  `id2label`) or a probability vector (soft targets). LM rows hold the text only.
- `loss_fn(outputs, batch) -> scalar tensor` replaces the task loss (the mean over the batch);
  `batch` holds the graph's inputs and `labels`. `task_loss` is the built-in one, to mix with.
- Tasks (`config.task`, default the graph's): `seq-cls` (cross-entropy, soft targets allowed),
  `causal-lm` (next-token, padding ignored), `masked-lm` (BERT's 15% masking). When prompt tuning
  prepends virtual tokens to the outputs (no `strip_virtual`), the token labels get -100 in front, as
  PEFT's. A P-tuned graph's text is encoded through its template (`rewrite.text.templates`); the
  placeholder positions are never language-modeling targets or masked.
- Every micro-batch's loss is a sum divided by the item count (examples, or target tokens) of the
  whole accumulation window over all ranks, so gradient accumulation and DDP give the same update as
  one big batch.
- Graph mode follows the phase: `gm.train()` while training; evaluations run an eval-mode twin of
  the graph that shares its parameters (so a compiled training graph is never recompiled).
- CUDA when available, else CPU; bf16 autocast on CUDA (trainable weights stay fp32);
  `compile=True` runs the graph through `torch.compile`.
- With `output_dir`: `metrics.jsonl` (a record per step and per evaluation), atomic checkpoints every
  `save_every` steps and at the end (see `rewrite.training.checkpoint`), then the trained graph (`model.pt2`)
  and the PEFT adapter (`adapter/`). `resume=True` continues from the newest complete checkpoint and
  ends with the same weights an uninterrupted run would have, also on another number of ranks with the
  same global batch (`batch_size` times the ranks); other training examples, precision or
  hyperparameters than the checkpoint's are refused. The run holds an OS lock on `output_dir`, so a
  second run into it is refused.
- Under `torchrun`, each rank trains on its share of every global batch (DistributedDataParallel,
  gloo on CPU, NCCL on GPU); rank 0 writes files, and every rank its shards of each checkpoint. With
  `fsdp=True` (refused in a single process) the graph is sharded in place with FSDP2 instead, one unit
  per transformer block (one per projection inside it), embeddings and head (a frozen untied word embedding and
  head: rows per rank, never gathered), and one for the rest (`rewrite.training.distributed.shard`; `checkpoint`
  recomputes each block, bf16 gathers in bf16), rewritten first by the training-speed passes a sharded graph
  can take (`rewrite.training.speed.shardable`); it stays so, sharded, outlined per block and an FSDP module in
  train mode (use it inside the process group, or load `model.pt2`, which rank 0 writes whole).
- `train` seeds torch's global RNG with `seed + rank` (dropout draws from it); the data order and
  masked-LM masks come from generators seeded by `(seed, epoch)` and `(seed, step, example)`, the same on
  any number of ranks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import fx, nn

from rewrite.training import checkpoint, data, distributed, speed

from rewrite.training import templates
from rewrite.adapters.peft_files import save_adapter
from rewrite.training.batches import eval_mode, graph_inputs, input_names, predict_batches, to_device
from rewrite.graph.archive import save
from rewrite.text.examples import Example, TokenizedExamples
from rewrite.training.data import CLASSIFICATION, LM_TASKS, Fields
from rewrite.errors import RewriteError
from rewrite.atomic import check_directory
from rewrite.graph.ir import info, require_tokenizer
from rewrite.training.losses import accuracy_counts, item_count, loss_sum, task_loss  # noqa: F401  (task_loss: to mix with)
from rewrite.training.head_loss import Head, head_of
from rewrite.graph.weight_shapes import check_weight_shapes
from rewrite.graph.params import apply_trainable

log = logging.getLogger(__name__)

TRAINING_TASKS = (CLASSIFICATION, *LM_TASKS)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
LossFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
DataSource = str | Path | Iterable[dict[str, Any]] | Sequence[Example]


@dataclass
class TrainConfig:
    """Everything `train` needs besides the graph and the data (the CLI's flags map onto these)."""

    output_dir: str | Path | None = None  # None: train in memory, write nothing
    task: str | None = None  # default: the graph's task
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # examples per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # matrices only
    warmup_steps: int = 0  # linear warmup; else warmup_ratio of the total steps
    warmup_ratio: float = 0.0
    schedule: str = "linear"  # after warmup: linear or cosine decay to 0, or constant
    max_grad_norm: float | None = 1.0  # gradient clipping; None: off
    max_length: int = 128  # tokens per example; longer ones are cut (and counted)
    group_by_length: bool = False  # batch examples of similar length (less padding)
    seed: int = 0
    bf16: bool | None = None  # autocast; None: on CUDA only
    compile: bool = False  # torch.compile the training graph
    fsdp: bool = False  # under torchrun: shard the graph with FSDP2 instead of replicating it (DDP)
    fsdp_offload: bool = False  # with fsdp on GPUs: the shards wait in CPU memory between uses
    device: str | None = None  # default: CUDA (this rank's GPU) when available, else CPU
    fields: Fields = field(default_factory=Fields)  # which row fields hold text, pair and label
    label_names: list[str] | None = None  # class order; default: the model config's id2label
    eval_every: int | None = None  # steps; evaluation also runs after each epoch and at the end
    save_every: int | None = 100  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    progress: bool = True  # progress bar on rank 0
    speed_passes: list[str] | None = None  # training-graph rewrites (rewrite.speed); None: every exact one
    dropout_parity: bool = False  # keep Hugging Face's train-mode dropout masks bit for bit (no rows, fast_dropout)
    checkpoint: bool = False  # activation checkpointing per block (the checkpoint speed pass)


@dataclass
class TrainResult:
    """What a run did: optimizer steps, the last step's loss, the last evaluation, all metric records."""

    steps: int
    train_loss: float | None
    eval: dict[str, float] | None
    history: list[dict[str, Any]]
    output_dir: Path | None
    resumed_from: int | None
    tokens_per_s: float | None


def check_config(config: TrainConfig, task: str) -> None:
    """Refuses options no run can use, before any work (one sentence naming the option)."""
    if task not in TRAINING_TASKS:
        raise RewriteError(f"training task {task!r} is not supported; use --task with one of {', '.join(TRAINING_TASKS)}")
    positive = {"batch_size": config.batch_size, "grad_accum": config.grad_accum, "max_length": config.max_length,
                "keep_checkpoints": config.keep_checkpoints}
    positive.update({k: v for k, v in (("epochs", config.epochs), ("max_steps", config.max_steps),
                                        ("eval_every", config.eval_every), ("save_every", config.save_every))
                     if v is not None})
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise RewriteError(f"{name} {value!r} is not allowed; use a whole number of at least 1")
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        raise RewriteError(f"learning rate {config.lr!r} is not allowed; use a finite number greater than 0")
    for name in ("weight_decay", "warmup_ratio", "max_grad_norm"):
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise RewriteError(f"{name} {value!r} is not allowed; use a finite number of at least 0")
    if config.warmup_ratio > 1 or (isinstance(config.warmup_steps, int) and config.warmup_steps < 0):
        raise RewriteError("warmup is not allowed: warmup_ratio must be in [0, 1] and warmup_steps at least 0")
    if config.output_dir is not None:
        check_directory(config.output_dir, "output directory")
    if config.schedule not in SCHEDULES:
        raise RewriteError(f"schedule {config.schedule!r} is not known; use one of {', '.join(SCHEDULES)}")
    if config.resume and config.output_dir is None:
        raise RewriteError("resume needs the output directory of the run to continue; set output_dir")


# ---------------------------------------------------------------- data


@dataclass
class _Data:
    encoded: TokenizedExamples
    tokenizer: Any
    task: str
    input_names: list[str]
    fingerprint: str  # of the examples: a resumed run must train on the same ones

    def batch(self, indices: Sequence[int], *seed: int) -> dict[str, torch.Tensor]:
        """A padded batch; example i's masked-LM mask is drawn from `(*seed, i)`, so a resumed run, or one on
        another number of ranks, draws the same ones."""
        return data.collate(self.encoded, indices, self.tokenizer, self.task, self.input_names,
                            [_seed(*seed, i) for i in indices])


def _label_names(gm: fx.GraphModule, config: TrainConfig, task: str) -> list[str]:
    if task != CLASSIFICATION:
        return []
    if config.label_names:
        return list(config.label_names)
    id2label = getattr(info(gm).config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label)]


def _load_data(gm: fx.GraphModule, source, config: TrainConfig, task: str) -> _Data:
    tokenizer = require_tokenizer(gm, "to encode text data")
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], Example):
        examples = list(source)
    else:
        examples = data.read_examples(source, task=task, fields=config.fields,
                                      label_names=_label_names(gm, config, task))
    encoded = (templates.encode_examples(gm, examples, config.max_length) if templates.uses_template(gm)
               else data.encode(examples, tokenizer, config.max_length))
    return _Data(encoded, tokenizer, task, input_names(gm), _fingerprint(examples))


def _fingerprint(examples: Sequence[Example]) -> str:
    """A short sha256 of the examples' texts and labels (not of where they were read from)."""
    rows = json.dumps([(e.text, e.pair, e.label) for e in examples]).encode()
    return hashlib.sha256(rows).hexdigest()[:16]


# ---------------------------------------------------------------- optimization


def _freeze_base(gm: fx.GraphModule, master_fp32: bool) -> None:
    """Only the parameters the passes listed as trainable require grad (PEFT freezes the base); under
    bf16 autocast those are kept, and updated, in fp32."""
    names = info(gm).trainable or []
    if not names:
        raise RewriteError("the graph has no trainable parameters; run a pass such as lora first")
    apply_trainable(gm)
    for name in names if master_fp32 else []:
        param = gm.get_parameter(name)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def _optimizer(named: list[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D) get no weight decay, as in Hugging Face's Trainer."""
    decay = [p for _, p in named if p.dim() >= 2]
    rest = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _scheduler(optimizer, config: TrainConfig, total: int):
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total)
    return get_scheduler(SCHEDULES[config.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# ---------------------------------------------------------------- one batch


def _seed(*parts: int) -> int:
    """A generator seed from integers (tuple hashes of ints are the same in every process)."""
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class _Objective:
    """How a batch goes through the graph and what it is scored by."""

    task: str
    loss_fn: LossFn | None
    input_names: list[str]
    device: torch.device
    bf16: bool
    prepended: int

    def autocast(self):
        return _autocast(self.device, self.bf16)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        with self.autocast():
            return model(**graph_inputs(batch, self.input_names))

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        if self.loss_fn is not None:
            return batch["input_ids"].shape[0]
        return item_count(batch["labels"], self.task, self.prepended)

    def loss(self, outputs, batch: dict[str, torch.Tensor], head: Head | None = None) -> torch.Tensor:
        """The summed loss over `items(batch)`: the task loss, or the caller's mean `loss_fn` times the batch size."""
        if self.loss_fn is None:
            with self.autocast():  # a head the graph left to the loss runs in the precision the graph's would
                return loss_sum(outputs, batch["labels"], self.task, self.prepended, head)
        return self.loss_fn(outputs, batch) * batch["input_ids"].shape[0]

    def eval_sums(self, model: nn.Module, dataset: _Data, indices: Sequence[int], batch_size: int,
                  seed: int, batches: int = 0) -> torch.Tensor:
        """[loss sum, loss items, correct, scored] over `indices` of `dataset`, without gradients. `batches`: run the
        model at least that many times (FSDP ranks gather each unit together, so each runs as many batches as the
        fullest), the extra batches on example 0 of `dataset`, not counted."""
        def counts(batch: dict[str, torch.Tensor], outputs) -> list[float]:
            correct, examples = accuracy_counts(outputs, batch["labels"], self.task, self.prepended)
            return [float(self.loss(outputs, batch)), self.items(batch), correct, examples]

        chunks = data.batches(indices, batch_size)
        counted = len(chunks)
        chunks += [[0]] * (batches - counted)
        results = predict_batches(model, (dataset.batch(chunk, seed, -1) for chunk in chunks), self.input_names,
                                  self.device, counts, self.autocast)
        return torch.tensor(results[:counted] or [[0.0] * 4], dtype=torch.float64, device=self.device).sum(0)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        loss_sum, items, correct, scored = sums.tolist()
        return {"loss": loss_sum / max(items, 1.0), "accuracy": correct / max(scored, 1.0)}


# ---------------------------------------------------------------- the run


@dataclass
class _Run:
    """The state of one training run: graph, wrapped model, optimizer, schedule, step, records."""

    gm: fx.GraphModule
    config: TrainConfig
    ctx: distributed.Context
    objective: _Objective
    train: _Data
    eval: _Data | None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        config, ctx = self.config, self.ctx
        if not config.fsdp:  # FSDP moves each unit to the device as it shards it: never the whole model at once
            self.gm.to(ctx.device)
        _freeze_base(self.gm, master_fp32=self.objective.bf16)
        passes = speed.resolve(config.speed_passes, dropout_parity=config.dropout_parity,
                               custom_loss=self.objective.loss_fn is not None, checkpoint=config.checkpoint,
                               sharded=config.fsdp)
        if config.fsdp:  # FSDP shards the graph itself in place: the speed passes rewrite it, no twin
            flat = speed.rewrite_in_place(self.gm, passes)
            self.layout = distributed.shard(self.gm, ctx, checkpoint=config.checkpoint, bf16=self.objective.bf16,
                                            offload=config.fsdp_offload, flat=flat)
            self.head, wrapped = None, self.gm
        else:
            self.layout = None
            graphs = speed.graphs(self.gm, passes, compile=config.compile)
            self.head, wrapped = head_of(graphs.general), distributed.wrap(graphs, ctx)
        self.sharded = distributed.sharded(self.gm)
        self.named = [(name, self.gm.get_parameter(name)) for name in info(self.gm).trainable]
        self.model = torch.compile(wrapped) if config.compile and config.fsdp else wrapped
        micro = data.micro_batches_per_epoch(len(self.train.encoded), ctx.world, config.batch_size)
        self.steps_per_epoch = math.ceil(micro / config.grad_accum)
        self.epoch_cache: tuple[int, list[list[int]]] = (-1, [])
        self.total = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = _optimizer(self.named, config)
        self.scheduler = _scheduler(self.optimizer, config, self.total)
        self.out = Path(config.output_dir) if config.output_dir is not None else None
        self.log = checkpoint.MetricsLog(self.out / checkpoint.METRICS_NAME if self.out and ctx.main else None)
        self.checkpoints = (checkpoint.RunCheckpoints(self.out, ctx, config.keep_checkpoints,
                                                      _settings(config, ctx.world, self.objective.bf16, self.train))
                            if self.out is not None else None)
        self.last_eval: dict[str, float] | None = None
        self.last_loss: float | None = None
        self.tokens = 0.0
        self.seconds = 0.0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (example indices) of `epoch`, computed once per epoch."""
        if self.epoch_cache[0] != epoch:
            config, ctx = self.config, self.ctx
            order = data.epoch_order(self.train.encoded.lengths, ctx.world, config.batch_size, seed=config.seed,
                                     epoch=epoch, group_by_length=config.group_by_length)
            self.epoch_cache = (epoch, data.batches(data.shard(order, ctx.rank, ctx.world), config.batch_size))
        return self.epoch_cache[1]

    def window(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step (a pure function of seed and step)."""
        config, ctx = self.config, self.ctx
        epoch, index = divmod(self.step, self.steps_per_epoch)
        micro = self.epoch_batches(epoch)[index * config.grad_accum:(index + 1) * config.grad_accum]
        return [to_device(self.train.batch(m, config.seed, self.step), ctx.device) for m in micro]

    def optimizer_step(self, window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Accumulates the window's gradients, each micro-batch's loss sum divided by the item count
        of the whole window on all ranks (times the world size, which DDP's averaging divides out)."""
        ctx, objective = self.ctx, self.objective
        items = float(ctx.sum(torch.tensor(float(sum(objective.items(b) for b in window)), device=ctx.device)))
        scale = ctx.world / max(items, 1.0)
        loss_sum = torch.zeros((), device=ctx.device)
        for index, batch in enumerate(window):
            with distributed.no_sync(self.model, skip=index < len(window) - 1):
                total = objective.loss(objective.forward(self.model, batch), batch, self.head)
                (total * scale).backward()
            loss_sum += total.detach().float()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named], max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b["attention_mask"].sum() for b in window).to(loss_sum)
        loss_sum, tokens = ctx.sum(torch.stack([loss_sum, tokens])).tolist()
        return {"loss": loss_sum / max(items, 1.0), "lr": lr, "grad_norm": distributed.scalar(grad_norm),
                "tokens": tokens}

    def evaluate(self) -> dict[str, float]:
        """Eval-mode metrics over the eval set, each rank on every `world`-th example, through the training graph
        itself switched to eval mode (a sharded graph gathers one unit at a time, as in training)."""
        config, ctx = self.config, self.ctx
        ordered = data.by_length(self.eval.encoded.lengths)
        batches = data.micro_batches_per_epoch(len(ordered), ctx.world, config.batch_size) if self.sharded else 0
        with eval_mode(self.gm):
            sums = self.objective.eval_sums(self.gm, self.eval, ordered[ctx.rank::ctx.world], config.batch_size,
                                            config.seed, batches)
        return self.objective.metrics(ctx.sum(sums))

    def record(self, split: str, values: dict[str, float]) -> None:
        entry = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "split": split, **values}
        self.history.append(entry)
        self.log.write(entry)

    def write_outputs(self) -> None:
        """The trained graph and its PEFT adapter beside the checkpoints, written by rank 0. A sharded
        graph's parameters are gathered whole to rank 0 only, one at a time, and the flat graph over them is
        written; the graph itself stays sharded."""
        trained = self.gm
        if self.sharded:
            full = distributed.full_state(self.gm)
            trained = self.layout.gathered_twin(self.gm, full) if self.ctx.main else None
        if not (self.out and self.ctx.main):
            return
        save(trained, self.out / "model.pt2")
        try:
            save_adapter(trained, self.out / "adapter")
        except RewriteError as error:
            log.warning("no PEFT adapter written (%s); the trained graph is in %s", error, self.out / "model.pt2")


_RESUME_SETTINGS = ("task", "epochs", "max_steps", "grad_accum", "lr", "weight_decay", "warmup_steps",
                    "warmup_ratio", "schedule", "max_grad_norm", "max_length", "group_by_length", "seed")


def _settings(config: TrainConfig, world: int, bf16: bool, train_set: _Data) -> dict[str, Any]:
    """The hyperparameters, precision and data that decide a run's trajectory: a resumed run must use the same.
    The batch is the global one (`batch_size` on each of `world` ranks): every micro-batch then holds the same
    examples on any number of ranks."""
    return {**{name: getattr(config, name) for name in _RESUME_SETTINGS},
            checkpoint.GLOBAL_BATCH: world * config.batch_size, "bf16": bf16, "data_sha256": train_set.fingerprint}


def _mark_trained(gm: fx.GraphModule) -> None:
    """Fresh modules (a new head) stop being "untrained" once training has optimized them."""
    trained = info(gm).trainable
    info(gm).untrained = [m for m in info(gm).untrained
                             if not any(name.startswith(m + ".") for name in trained)]


# ---------------------------------------------------------------- the loop


REFRESH_S = 0.5  # the progress display redraws at most this often, from the loop (no refresh thread)


def _progress(run: _Run) -> Progress:
    """A display the loop redraws itself: rich's auto-refresh thread competes with the compute threads
    for the cores (on a loaded 2-core machine it made training several times slower)."""
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
               TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), auto_refresh=False,
                    disable=not (run.config.progress and run.ctx.main))


def _due(every: int | None, step: int) -> bool:
    return bool(every) and step % every == 0


def _fit(run: _Run) -> None:
    """Steps until the total; evaluates every `eval_every` steps, per epoch and at the end; checkpoints
    every `save_every` steps and at the end."""
    config = run.config
    with _progress(run) as progress:
        bar = progress.add_task("train", total=run.total, completed=run.step, loss=math.nan, lr=config.lr, tps=0.0)
        drawn = time.perf_counter()
        while run.step < run.total:
            started = time.perf_counter()
            stats = run.optimizer_step(run.window())
            elapsed = time.perf_counter() - started
            run.step += 1
            run.tokens += stats["tokens"]
            run.seconds += elapsed
            run.last_loss = stats["loss"]
            run.record("train", {"loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                                 "tokens_per_s": stats["tokens"] / elapsed})
            progress.update(bar, completed=run.step, loss=stats["loss"], lr=stats["lr"], tps=run.tokens / run.seconds)
            final = run.step == run.total
            if final or time.perf_counter() - drawn >= REFRESH_S:
                progress.refresh()
                drawn = time.perf_counter()
            if run.eval is not None and (_due(config.eval_every, run.step) or _due(run.steps_per_epoch, run.step)
                                         or final):
                run.last_eval = run.evaluate()
                run.record("eval", run.last_eval)
            if run.out and (_due(config.save_every, run.step) or final):
                run.checkpoints.save(run.gm, run.optimizer, run.scheduler, run.step)


def prepended_positions(gm: fx.GraphModule) -> int:
    """Positions the graph's sequence outputs hold before the input's own (prompt tuning without
    strip_virtual); language-modeling labels are padded by this many -100s."""
    return int(info(gm).prepended_positions)


def _objective(gm: fx.GraphModule, config: TrainConfig, task: str, loss_fn: LossFn | None,
               device: torch.device) -> _Objective:
    bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    return _Objective(task, loss_fn, input_names(gm), device, bf16, prepended_positions(gm))


def _task(gm: fx.GraphModule, config: TrainConfig) -> str:
    task = config.task or info(gm).task
    check_config(config, task)
    return task


def _check_world(config: TrainConfig, ctx: distributed.Context) -> None:
    if config.fsdp_offload and not (config.fsdp and ctx.device.type == "cuda"):
        raise RewriteError("fsdp_offload (--fsdp-offload) keeps FSDP's shards in CPU memory between their uses on a "
                           f"GPU, but this run {'is on the CPU' if config.fsdp else 'does not use --fsdp'}; use it "
                           "with --fsdp on GPUs, or drop it")
    if config.fsdp and ctx.world == 1:
        raise RewriteError("fsdp (--fsdp) shards the graph over torchrun's processes, but this run is a single "
                           "process; run it under torchrun --nproc_per_node N with N of at least 2, or drop --fsdp")


def _start(run: _Run) -> int | None:
    """Resumes from the newest checkpoint (returns its step), or starts a fresh run (None)."""
    if run.config.resume:
        resumed = run.checkpoints.restore(run.gm, run.optimizer, run.scheduler)
        run.step = resumed or 0
        return resumed
    if run.checkpoints is not None:
        run.checkpoints.start_fresh()
    return None


def train(
    gm: fx.GraphModule,
    train_data: DataSource,
    *,
    eval_data: DataSource | None = None,
    config: TrainConfig,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Trains `gm`'s trainable parameters in place (the module docstring gives the whole contract)."""
    task = _task(gm, config)
    ctx = distributed.setup(config.device)
    try:
        _check_world(config, ctx)
        check_weight_shapes(gm)
        torch.manual_seed(config.seed + ctx.rank)
        objective = _objective(gm, config, task, loss_fn, ctx.device)
        train_set = _load_data(gm, train_data, config, task)
        eval_set = _load_data(gm, eval_data, config, task) if eval_data is not None else None
        gm.train()
        run = _Run(gm, config, ctx, objective, train_set, eval_set)
        with run.checkpoints.locked() if run.checkpoints is not None else contextlib.nullcontext():
            resumed = _start(run)
            try:
                _fit(run)
            finally:
                if not run.sharded:
                    gm.eval()
                run.log.close()
            _mark_trained(gm)
            run.write_outputs()
            ctx.barrier()
        tokens_per_s = run.tokens / run.seconds if run.seconds else None
        return TrainResult(run.step, run.last_loss, run.last_eval, run.history, run.out, resumed, tokens_per_s)
    finally:
        ctx.close()


def evaluate(gm: fx.GraphModule, eval_data: DataSource, *, config: TrainConfig,
             loss_fn: LossFn | None = None) -> dict[str, float]:
    """Eval-mode loss and accuracy (of examples; of target tokens for LM tasks) of `gm` on a data set,
    in this process, on the device its parameters are on."""
    task = _task(gm, config)
    dataset = _load_data(gm, eval_data, config, task)
    objective = _objective(gm, config, task, loss_fn, next(gm.parameters()).device)
    with eval_mode(gm):
        sums = objective.eval_sums(gm, dataset, data.by_length(dataset.encoded.lengths), config.batch_size,
                                   config.seed)
    return objective.metrics(sums)
