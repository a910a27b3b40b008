"""Training checkpoints and the metrics log, both safe against a kill at any moment.

A checkpoint is a directory `checkpoints/step-00000120/` holding the trainable weights under PEFT's
key names (`adapter_model.safetensors`), the optimizer, scheduler and RNG states
(`trainer_state.pt`) and `checkpoint.json`. It is written under a temporary name and renamed when
complete, so every `step-*` directory is whole; leftovers of a killed write start with a dot and are
swept on resume. The metrics log is cut back to the resumed step, so it reads like one unbroken run.
`RunCheckpoints` is a training run's side of this: save, start fresh, resume (with every rank's RNG).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import fx

from rewrite import distributed
from rewrite.adapter import PREFIX, WEIGHTS_NAME
from rewrite.atomic import atomic_path
from rewrite.errors import RewriteError
from rewrite.ir import info

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.pt"
INFO_NAME = "checkpoint.json"
_STEP_DIR = re.compile(r"step-(\d+)")


def _discard(path: Path) -> None:
    """Renames first, so a kill during deletion never leaves a half-deleted `step-*` directory."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def completed(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def sweep(root: Path) -> None:
    """Removes the dot-named leftovers of writes or deletions that a kill interrupted."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".step-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def write(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int) -> Path:
    """Writes checkpoint `step` atomically and keeps only the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        safetensors.torch.save_file(weights, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        torch.save(state, tmp / STATE_NAME)
        (tmp / INFO_NAME).write_text(json.dumps({"step": step, "world_size": state["world_size"]}))
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in completed(root)[:-keep]:
        _discard(old)
    return final


def read(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and trainer state of one checkpoint directory."""
    try:
        weights = safetensors.torch.load_file(directory / WEIGHTS_NAME)
        state = torch.load(directory / STATE_NAME, weights_only=True)
    except (OSError, RuntimeError, safetensors.SafetensorError) as error:
        raise RewriteError(f"checkpoint {str(directory)!r} could not be read ({error}); delete it to resume "
                           "from the one before") from error
    return weights, state


class MetricsLog:
    """Appends one JSON object per line, flushed at once; `path=None` (ranks other than 0) writes nothing.

    The file is opened at the first record, after a resume has cut it back (`cut_log` replaces it).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._handle = None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def cut_log(path: Path, step: int) -> None:
    """Keeps the records up to `step` (dropping a torn last line): what a resumed run will not redo."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


@dataclass
class RunCheckpoints:
    """A training run's checkpoints under `<out>/checkpoints`: writing them (every rank takes part, rank 0
    writes), refusing to start a fresh run over an old one's, and resuming from the newest."""

    out: Path
    ctx: distributed.Context
    keep: int

    @property
    def root(self) -> Path:
        return self.out / "checkpoints"

    def save(self, gm: fx.GraphModule, optimizer, scheduler, step: int) -> None:
        """Gathers shards and every rank's RNG state; rank 0 writes checkpoint `step`."""
        weights = distributed.trainable_state(gm)
        optimizer_state = distributed.optimizer_state(gm, optimizer)
        states = self.ctx.gather(_rng_state())
        if not self.ctx.main:
            return
        state = {"step": step, "world_size": self.ctx.world, "optimizer": optimizer_state,
                 "scheduler": scheduler.state_dict(), "rng": states}
        weights = {PREFIX + name: weights[name].contiguous() for name in info(gm).trainable}
        write(self.root, step, weights, state, self.keep)

    def start_fresh(self) -> None:
        """A new run must not mix with an old one's checkpoints (a later resume would pick them up)."""
        if completed(self.root):
            raise RewriteError(f"output directory {str(self.out)!r} already holds a run's checkpoints; continue it "
                               "with resume (--resume), or train into an empty directory")
        if self.ctx.main:
            cut_log(self.out / METRICS_NAME, 0)

    def restore(self, gm: fx.GraphModule, optimizer, scheduler) -> int | None:
        """Loads the newest complete checkpoint, if any, into the graph, optimizer, scheduler and RNGs;
        returns its step."""
        if self.ctx.main:
            sweep(self.root)
        self.ctx.barrier()
        found = completed(self.root)
        if not found:
            log.warning("no complete checkpoint in %s; starting from step 0", self.root)
            if self.ctx.main:
                cut_log(self.out / METRICS_NAME, 0)
            return None
        step, directory = found[-1]
        weights, state = read(directory)
        distributed.load_trainable(gm, _trainable_weights(gm, weights, directory))
        distributed.load_optimizer(gm, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["world_size"] == self.ctx.world:
            _set_rng_state(state["rng"][self.ctx.rank])
        else:
            log.warning("checkpoint %s was written by %d ranks, resuming on %d: data order and dropout differ "
                        "from an uninterrupted run", directory, state["world_size"], self.ctx.world)
        if self.ctx.main:
            cut_log(self.out / METRICS_NAME, step)
        return step


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_weights(gm: fx.GraphModule, weights: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights by parameter name; every trainable parameter must be there."""
    missing = [PREFIX + name for name in info(gm).trainable if PREFIX + name not in weights]
    if missing:
        raise RewriteError(f"checkpoint {str(source)!r} has no weight {missing[0]}; it was written for another graph")
    return {name: weights[PREFIX + name] for name in info(gm).trainable}
