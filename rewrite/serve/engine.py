"""Continuous batching across adapters: one thread runs every decoding step of every request as one ONNX
Runtime call on the cached model.

Each turn of the loop admits waiting requests (up to the batch limit), prefills them together (padded on the side
the model's cache layout names: right, or left for an unlowered sliding-window model), merges their caches into the
running batch (the shorter cache padded on that side of the past axis, its mask zero there, each row's positions
continuing as `rewrite.runtime.cache.positions` counts them), decodes one token for every row, emits, and retires
finished or cancelled rows (their rows sliced out, past columns on that side that are padding in every remaining
row trimmed). Masked positions weigh exactly zero (the exported mask's large
negative number underflows in the softmax), so each row continues as it would alone.

On a model exported `--mixed-adapters` each row picks its adapter through `adapter_index`; row 0 of the stacked
adapter inputs is the base (an adapter file that sets nothing, so every slot holds the model's own default).
The stacked inputs are rebuilt only when the set of adapters changes; an unloaded adapter stays in the stack
until its last running request leaves. A model with single-adapter slots (`--adapter-slots`) or no slots serves
the base only. A model that takes no position ids and pads on the left (a prompt-tuned prefix, which counts positions from its
cache length, so padding would shift them) serves one request at a time.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from rewrite.errors import RewriteError
from rewrite.runtime.adapters import read_adapter, stacked_feeds
from rewrite.runtime.cache import empty_past, positions
from rewrite.runtime.generate import CachedModel, Sampling
from rewrite.runtime.slots import INDEX

log = logging.getLogger(__name__)


class Refused(Exception):
    """The engine cannot take a request now (`status`: the HTTP status that says so)."""

    status = 503


class QueueFull(Refused):
    status = 429


class Draining(Refused):
    status = 503


@dataclass(frozen=True)
class Event:
    """What a request produced since its last event: new text, and why it ended once it has."""

    text: str
    tokens: int
    finish: str | None = None  # "stop", "length" or "error"
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One prompt to continue: its token ids, adapter (None: the base), limits, sampling and where events go."""

    ids: np.ndarray
    max_tokens: int
    emit: Callable[[Event], None]
    sampling: Sampling = Sampling()
    adapter: str | None = None
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    done: bool = False
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    def finish(self, text: str, reason: str, error: str | None = None) -> None:
        self.done = True
        self.emit(Event(text, len(self.tokens), reason, error))


@dataclass
class Batch:
    """The running rows: their requests, last tokens, masks over the past (+1 per step), next positions, caches."""

    requests: list[Request]
    last: np.ndarray
    mask: np.ndarray
    next_position: np.ndarray
    past: list[np.ndarray]
    side: str  # where rows are padded: the model's `CacheLayout.padding`

    def merge(self, other: "Batch") -> "Batch":
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad = lambda a, axis: np.pad(a, [((0, width - a.shape[axis]) if self.side == "right"  # noqa: E731
                                          else (width - a.shape[axis], 0)) if i == axis else (0, 0)
                                         for i in range(a.ndim)])
        return Batch(self.requests + other.requests, np.concatenate([self.last, other.last]),
                     np.concatenate([pad(self.mask, 1), pad(other.mask, 1)]),
                     np.concatenate([self.next_position, other.next_position]),
                     [np.concatenate([pad(a, 2), pad(b, 2)]) for a, b in zip(self.past, other.past)], self.side)

    def keep(self, rows: np.ndarray) -> "Batch":
        """Only `rows` (a boolean per row), without the past columns on the padded side that are padding in all of
        them (a lowered model's rows hold their cache from the start, one entry per real token, so none is cut)."""
        mask = self.mask[rows]
        used = np.flatnonzero(mask.any(0))
        if self.side == "right":
            columns = slice(0, used[-1] + 1 if used.size else 0)
        else:
            columns = slice(used[0] if used.size else mask.shape[1], mask.shape[1])
        return Batch([r for r, k in zip(self.requests, rows) if k], self.last[rows], mask[:, columns],
                     self.next_position[rows], [p[rows][:, :, columns] for p in self.past], self.side)


class AdapterStack:
    """The mixed model's stacked adapter inputs for the adapters in use, row 0 the base."""

    def __init__(self, model: CachedModel):
        self.model = model
        self.layout = model.schema.slots
        self.mixed = bool(self.layout and self.layout.mixed)
        self.names: list[str | None] = [None]
        self.feeds: dict[str, np.ndarray] = {}
        if self.mixed:
            self._directory = tempfile.TemporaryDirectory(prefix="rewrite-serve-")
            self.base = Path(self._directory.name) / "base.onnx_adapter"
            empty = ort.AdapterFormat()
            empty.set_adapter_version(1)
            empty.set_model_version(self.layout.fingerprint)
            empty.set_parameters({})
            empty.export_adapter(str(self.base))
            self.feeds = stacked_feeds([self.base], model.path, [0])

    def check(self, name: str, path: str | Path) -> None:
        """Refuses, in one sentence, a file this model cannot serve next to its other adapters."""
        if not self.mixed:
            kind = "adapter slots for one adapter at a time" if self.layout else "no adapter slots"
            raise RewriteError(f"model {str(self.model.path)!r} has {kind}, so it serves the base model only; export "
                               "it with `rewrite export X.pt2 --onnx m.onnx --with-cache --mixed-adapters` to serve "
                               f"adapter {name!r}")
        read_adapter(path, self.layout)

    def update(self, files: dict[str, str]) -> None:
        """Restacks when the adapters in use (`files`, by name) are not the ones stacked."""
        if set(files) != set(self.names[1:]):
            names = sorted(files)
            self.feeds = stacked_feeds([self.base, *(files[n] for n in names)], self.model.path, [0])
            self.names = [None, *names]

    def run_feeds(self, requests: list[Request]) -> dict[str, np.ndarray]:
        if not self.mixed:
            return {}
        index = np.asarray([self.names.index(r.adapter) for r in requests], dtype=np.int64)
        return self.feeds | {INDEX: index}


class Engine:
    """The scheduler: `submit` and `cancel` from any thread; `run` (in its own thread) until `stop`."""

    def __init__(self, model: CachedModel, max_batch: int = 32, max_queue: int = 256, metrics=None):
        self.model = model
        self.max_batch = max_batch if model.layout.position_ids or model.layout.padding == "right" else 1
        self.max_queue = max_queue
        self.metrics = metrics
        self.stack = AdapterStack(model)
        self.adapters: dict[str, str] = {}  # routable adapters, by name
        self.in_use: dict[str, str] = {}  # files of unloaded adapters whose requests still run
        self.waiting: list[Request] = []
        self.batch: Batch | None = None
        self.draining = self.stopping = False
        self.lock = threading.Condition()
        special = model.special
        eos = special["eos_token_id"]
        self.eos = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.pad = special["pad_token_id"] if special["pad_token_id"] is not None else 0
        self.thread = threading.Thread(target=self.run, name="rewrite-engine", daemon=True)

    # -- called from the server's threads

    def load(self, name: str, path: str | Path) -> None:
        self.stack.check(name, path)
        with self.lock:
            self.adapters[name] = str(path)
            self.lock.notify()

    def unload(self, name: str) -> None:
        with self.lock:
            self.in_use[name] = self.adapters.pop(name)
            self.lock.notify()

    def submit(self, request: Request) -> None:
        with self.lock:
            if self.draining:
                raise Draining("the server is shutting down and takes no new requests; retry on another instance")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue holds its limit of {self.max_queue} waiting requests; retry later")
            self.waiting.append(request)
            self._gauges()
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        """The request's row leaves at the next step (its client went away)."""
        request.cancelled = True

    def drain(self) -> None:
        with self.lock:
            self.draining = True

    def stop(self) -> None:
        """Refuses new requests, lets the admitted ones finish, and waits for the loop to end."""
        with self.lock:
            self.draining = self.stopping = True
            self.lock.notify()
        if self.thread.is_alive():
            self.thread.join()

    @property
    def running(self) -> int:
        return len(self.batch.requests) if self.batch else 0

    # -- the loop

    def run(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.batch and not self.stopping:
                    self.lock.wait()
                if self.stopping and not self.waiting and not self.batch:
                    return
                admitted = self._admit()
                self._gauges(len(admitted))
                files = self.adapters | {r.adapter: self.in_use[r.adapter] for r in self._rows() + admitted
                                         if r.adapter in self.in_use}
                self.in_use = {n: f for n, f in self.in_use.items() if n in files}
            try:
                self.stack.update(files)
                if admitted:
                    self._join(self._prefill(admitted))
                if self.batch:
                    self._decode()
            except Exception as error:  # noqa: BLE001 (an ONNX Runtime failure ends the batch's requests, not the server)
                log.exception("a batch failed")
                for request in self._rows() + admitted:
                    if not request.done:
                        request.finish("", "error", f"the model failed on this batch ({type(error).__name__})")
                self.batch = None
            with self.lock:
                self._gauges()

    def _rows(self) -> list[Request]:
        return list(self.batch.requests) if self.batch else []

    def _admit(self) -> list[Request]:
        self.waiting = [r for r in self.waiting if not r.cancelled]
        room = self.max_batch - self.running
        admitted, self.waiting = self.waiting[:room], self.waiting[room:]
        for request in admitted:
            if request.adapter is not None and request.adapter not in self.adapters:
                request.finish("", "error", f"adapter {request.adapter!r} was unloaded before the request ran")
        return [r for r in admitted if not r.done]

    def _prefill(self, requests: list[Request]) -> Batch:
        width = max(len(r.ids) for r in requests)
        ids = np.full((len(requests), width), self.pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, request in enumerate(requests):
            start = 0 if self.model.layout.padding == "right" else width - len(request.ids)
            ids[row, start:start + len(request.ids)] = request.ids
            mask[row, start:start + len(request.ids)] = 1
        position_ids = positions(mask)
        logits, past = self.model.step(ids, mask, position_ids, empty_past(self.model.layout, len(requests)),
                                       (self.stack.run_feeds(requests), None, None))
        self._record(len(requests))
        batch = Batch(requests, np.zeros(len(requests), dtype=np.int64), mask, mask.sum(-1), past,
                      self.model.layout.padding)
        self._take(batch, logits)
        return batch

    def _join(self, batch: Batch) -> None:
        self.batch = batch if self.batch is None else self.batch.merge(batch)
        self._retire()

    def _decode(self) -> None:
        batch = self.batch
        mask = np.concatenate([batch.mask, np.ones_like(batch.mask[:, :1])], 1)
        logits, batch.past = self.model.step(batch.last[:, None], mask, batch.next_position[:, None], batch.past,
                                             (self.stack.run_feeds(batch.requests), None, None))
        self._record(len(batch.requests))
        batch.mask, batch.next_position = mask, batch.next_position + 1
        self._take(batch, logits)
        self._retire()

    def _retire(self) -> None:
        keep = np.asarray([not (r.done or r.cancelled) for r in self.batch.requests], dtype=bool)
        self.batch = self.batch.keep(keep) if keep.any() else None

    def _take(self, batch: Batch, logits: np.ndarray) -> None:
        """Each row's next token from its own sampling and generator, emitted as text."""
        for row, request in enumerate(batch.requests):
            if request.cancelled:
                continue
            token = int(request.sampling.pick(logits[row:row + 1], request.rng)[0])
            batch.last[row] = token
            self._emit(request, token)

    def _emit(self, request: Request, token: int) -> None:
        """New text up to where a stop string could still begin or a character is still incomplete."""
        request.tokens.append(token)
        if self.metrics:
            self.metrics.generated.inc()
        if token in self.eos and not request.ignore_eos:
            return request.finish(self._text(request)[request.sent:], "stop")
        text = self._text(request)
        cut = min((i for i in (text.find(s, max(0, request.sent - len(s))) for s in request.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            return request.finish(text[request.sent:cut], "stop")
        if len(request.tokens) >= request.max_tokens:
            return request.finish(text[request.sent:], "length")
        safe = len(text.rstrip("\ufffd"))
        safe -= max((k for s in request.stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        if safe > request.sent:
            request.emit(Event(text[request.sent:safe], len(request.tokens)))
            request.sent = safe

    def _text(self, request: Request) -> str:
        return self.model.tokenizer.decode(request.tokens, skip_special_tokens=True)

    def _record(self, rows: int) -> None:
        if self.metrics:
            self.metrics.batch_size.observe(rows)

    def _gauges(self, admitted: int = 0) -> None:
        """Admitted requests count as running from before their first token."""
        if self.metrics:
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.running.set(self.running + admitted)
