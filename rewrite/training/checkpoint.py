"""Training checkpoints and the metrics log, both safe against a kill at any moment.

A checkpoint is a directory `checkpoints/step-00000120/` holding every rank's shards of the trainable
weights and of the optimizer state, written by `torch.distributed.checkpoint` (`__<rank>_0.distcp` files
and `.metadata`, keyed by parameter name, so it loads on any number of ranks), the scheduler and every
rank's RNG state (`trainer_state.pt`) and `checkpoint.json`. All ranks write into one temporary directory
that rank 0 chose; rank 0 adds the small files and renames it when complete, so every `step-*` directory
is whole (one without `.metadata` is unreadable); leftovers of a killed write start with a dot and are
swept on resume. Checkpoints of earlier versions (the full weights in `adapter_model.safetensors`, the
optimizer in `trainer_state.pt`) still resume. The metrics log is cut back to the resumed step, so it
reads like one unbroken run. `RunCheckpoints` is a training run's side of this: save, start fresh,
resume (with every rank's RNG; from the newest checkpoint that reads whole, removing newer damaged
ones), and an OS lock on the output directory that refuses a second run into it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import safetensors.torch
import torch
from filelock import FileLock, Timeout
from torch import fx
from torch.distributed.checkpoint import CheckpointException, FileSystemReader

from rewrite.training import distributed
from rewrite.adapters.peft_files import PREFIX, WEIGHTS_NAME
from rewrite.atomic import atomic_path, share
from rewrite.errors import RewriteError
from rewrite.graph.ir import info

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.pt"
INFO_NAME = "checkpoint.json"
METADATA_NAME = ".metadata"  # torch.distributed.checkpoint's index of the shards, written last
LOCK_NAME = ".rewrite-train.lock"  # held (flock) while a run writes into its output directory
GLOBAL_BATCH = "global_batch_size"  # the setting: examples per micro-batch over all ranks
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


def write(root: Path, step: int, shards: Callable[[Path], None], state: dict[str, Any], keep: int,
          settings: dict[str, Any] | None = None, ctx: distributed.Context | None = None) -> Path | None:
    """Writes checkpoint `step` atomically and keeps only the newest `keep` checkpoints (a collective):
    `shards(directory)` writes every rank's part into the temporary directory rank 0 chose, then rank 0
    adds the trainer `state` and the `settings` (the hyperparameters a resumed run must share) and renames
    it. Returns the checkpoint's directory on rank 0."""
    ctx = ctx or distributed.Context(0, 1, torch.device("cpu"), owns_group=False)
    final = root / f"step-{step:08d}"
    tmp = _shared_temporary(root, final.name, ctx)
    try:
        shards(tmp)
        ctx.barrier()
        if not ctx.main:
            return None
        torch.save(state, tmp / STATE_NAME)
        (tmp / INFO_NAME).write_text(json.dumps({"step": step, "world_size": state["world_size"],
                                                 "settings": settings or {}}))
        if final.exists():
            _discard(final)
        share(tmp)
        os.replace(tmp, final)
    finally:
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
    for _, old in completed(root)[:-keep]:
        _discard(old)
    return final


def _shared_temporary(root: Path, name: str, ctx: distributed.Context) -> Path:
    """The temporary directory rank 0 made for checkpoint `name`, on every rank; when rank 0 could not make
    it, every rank raises its error (rather than the others waiting for it)."""
    made: Path | OSError | None = None
    if ctx.main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            made = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        except OSError as error:
            made = error
    made = ctx.gather(made)[0]
    if isinstance(made, OSError):
        raise made
    return made


class Unreadable(RewriteError):
    """A checkpoint directory that is not whole (damaged or cut short after it was written): resume
    falls back to the one before."""

    def __init__(self, directory: Path, reason: str):
        super().__init__(f"checkpoint {str(directory)!r} is unreadable ({reason})")
        self.directory = directory


_STATE_KEYS = ("world_size", "scheduler", "rng")
_DAMAGED = (ValueError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
            safetensors.SafetensorError)  # what loading a truncated or overwritten part raises (not a refused read)


def _part(directory: Path, name: str, load: Callable[[Path], Any]) -> Any:
    try:
        return load(directory / name)
    except FileNotFoundError as error:
        raise Unreadable(directory, f"{name} is missing") from error
    except _DAMAGED as error:
        raise Unreadable(directory, f"{name} is damaged") from error


@dataclass
class Saved:
    """One checkpoint as read: its settings (the hyperparameters of the run that wrote it; empty for older
    checkpoints), trainer state, and the shapes of its trainable weights by parameter name; `weights` holds
    the full weights of a checkpoint written before they were sharded (None otherwise)."""

    directory: Path
    settings: dict[str, Any]
    state: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    weights: dict[str, torch.Tensor] | None = None

    def load(self, gm: fx.GraphModule, optimizer) -> None:
        """Loads the trainable weights and the optimizer state into `gm` and `optimizer` (a collective)."""
        names = info(gm).trainable
        _check_same_graph(gm, self.shapes, self.directory)
        if self.weights is not None:
            distributed.load_trainable(gm, {name: self.weights[name] for name in names})
            distributed.load_optimizer(gm, optimizer, self.state["optimizer"])
            return
        try:
            distributed.load_shards(gm, optimizer, names, self.directory)
        except CheckpointException as error:  # every rank raises it when any rank failed to read its part
            raise Unreadable(self.directory, "its shards (*.distcp) are damaged or missing") from error


def read(directory: Path) -> Saved:
    """A checkpoint directory's small parts and index, checked to be whole (its shards are read by `Saved.load`)."""
    header = _part(directory, INFO_NAME, lambda path: json.loads(path.read_text(encoding="utf-8")))
    state = _part(directory, STATE_NAME, lambda path: torch.load(path, weights_only=True))
    if not isinstance(header, dict) or not isinstance(header.get("settings") or {}, dict):
        raise Unreadable(directory, f"{INFO_NAME} is damaged")
    earlier = (directory / WEIGHTS_NAME).is_file() and not (directory / METADATA_NAME).exists()
    if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS + ("optimizer",) * earlier):
        raise Unreadable(directory, f"{STATE_NAME} is damaged")
    settings = _global_batch(header.get("settings") or {}, state["world_size"])
    if earlier:
        weights = _part(directory, WEIGHTS_NAME, safetensors.torch.load_file)
        weights = {name[len(PREFIX):]: value for name, value in weights.items() if name.startswith(PREFIX)}
        return Saved(directory, settings, state, {name: tuple(v.shape) for name, v in weights.items()}, weights)
    index = _part(directory, METADATA_NAME, lambda path: FileSystemReader(path.parent).read_metadata())
    shapes = {key[len("model."):]: tuple(meta.size) for key, meta in index.state_dict_metadata.items()
              if key.startswith("model.")}
    return Saved(directory, settings, state, shapes)


def _global_batch(settings: dict[str, Any], world: int) -> dict[str, Any]:
    """Settings written with the batch size per rank (before the global batch was recorded) in today's terms."""
    if "batch_size" not in settings:
        return settings
    settings = dict(settings)
    settings[GLOBAL_BATCH] = settings.pop("batch_size") * world
    return settings


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
    settings: dict[str, Any] = field(default_factory=dict)  # hyperparameters a resumed run must share

    @property
    def root(self) -> Path:
        return self.out / "checkpoints"

    def save(self, gm: fx.GraphModule, optimizer, scheduler, step: int) -> None:
        """Every rank writes its shards; rank 0 adds the scheduler and every rank's RNG state."""
        state = {"step": step, "world_size": self.ctx.world, "scheduler": scheduler.state_dict(),
                 "rng": self.ctx.gather(_rng_state())}
        names = info(gm).trainable
        write(self.root, step, lambda directory: distributed.save_shards(gm, optimizer, names, directory), state,
              self.keep, self.settings, self.ctx)

    def start_fresh(self) -> None:
        """A new run must not mix with an old one's checkpoints (a later resume would pick them up)."""
        sweep(self.root)
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
        step, saved, unreadable = self._load_newest(found, gm, optimizer)
        directory, state = saved.directory, saved.state
        scheduler.load_state_dict(state["scheduler"])
        if state["world_size"] == self.ctx.world:
            _set_rng_state(state["rng"][self.ctx.rank])
        else:
            log.warning("checkpoint %s was written by %d ranks, resuming on %d: the batches are the same, but "
                        "dropout is drawn per rank and differs from an uninterrupted run",
                        directory, state["world_size"], self.ctx.world)
        if self.ctx.main:
            for skipped in unreadable:  # a later save at its step, or the pruning of older ones, would trip on it
                _discard(skipped.directory)
            cut_log(self.out / METRICS_NAME, step)
            if unreadable:
                log.warning("%s; removed it and resuming from step %d (checkpoint %s)",
                            "; ".join(map(str, unreadable)), step, directory)
            else:
                log.info("resuming from step %d (checkpoint %s)", step, directory)
        return step

    def _load_newest(self, found: list[tuple[int, Path]], gm: fx.GraphModule,
                     optimizer) -> tuple[int, Saved, list[Unreadable]]:
        """Loads the newest checkpoint that reads whole; its step, what `read` gave, and the errors of the
        newer ones that do not. Other settings or another graph than a checkpoint's are refused."""
        unreadable: list[Unreadable] = []
        for step, directory in reversed(found):
            try:
                saved = read(directory)
                _check_same_settings(saved.settings, self.settings, directory, self.ctx.world)
                saved.load(gm, optimizer)
                return step, saved, unreadable
            except Unreadable as error:
                unreadable.append(error)
        raise RewriteError(f"no checkpoint in {str(self.root)!r} can be read (the newest: {unreadable[0]}); "
                           f"delete {str(self.root)!r} to train from step 0")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds an OS lock on the output directory for the run (rank 0 takes it for all ranks), so a
        second run into it is refused; the OS drops the lock with the process, so a killed run's lock
        file never blocks a later run. Leftovers of an interrupted write are swept on the way out."""
        lock = _lock(self.out) if self.ctx.main else None
        if not self.ctx.gather(lock is not None)[0]:
            raise RewriteError(f"output directory {str(self.out)!r} is in use by another training run; wait for it "
                               "to end, or train into another --output-dir")
        try:
            yield
        finally:
            if lock is not None:
                sweep(self.root)
                lock.release()


def _lock(out: Path) -> FileLock | None:
    """The output directory's lock, held; None when another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def _check_same_settings(saved: dict[str, Any], current: dict[str, Any], directory: Path, world: int) -> None:
    batch = saved.get(GLOBAL_BATCH)
    if batch is not None and batch % world:
        raise RewriteError(f"checkpoint {str(directory)!r} was written with a global batch of {batch} examples, "
                           f"which {world} ranks cannot share evenly; resume on a number of ranks that divides "
                           f"{batch}, with --batch-size {batch} divided by it")
    changed = [f"{name} {saved[name]!r} -> {current[name]!r}" for name in current
               if name in saved and saved[name] != current[name]]
    if changed:
        per_rank = f" (--batch-size {batch // world} on {world} rank{'s' * (world > 1)})" if (
            batch is not None and batch != current.get(GLOBAL_BATCH)) else ""
        raise RewriteError(f"--resume with other data or hyperparameters than checkpoint {str(directory)!r} was "
                           f"written with ({'; '.join(changed)}); resume with the same ones{per_rank}, or train "
                           "into a new --output-dir")


def _check_same_graph(gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """The checkpoint's trainable weights must be the graph's, by name and shape."""
    wanted = {name: tuple(gm.get_parameter(name).shape) for name in info(gm).trainable}  # global shapes if sharded
    for name in sorted(wanted.keys() | shapes.keys()):
        if name not in shapes:
            problem = f"has no weight {name}"
        elif name not in wanted:
            problem = f"has a weight {name} that the graph does not train"
        elif shapes[name] != wanted[name]:
            problem = f"has weight {name} of shape {list(shapes[name])} where the graph's is {list(wanted[name])}"
        else:
            continue
        raise RewriteError(f"checkpoint {str(source)!r} {problem}; it was written for another graph (resume the "
                           "graph it was trained from, or train into a new --output-dir)")


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
