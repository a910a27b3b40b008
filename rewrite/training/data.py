"""Training data: JSONL, CSV and TSV files (or in-memory rows) -> tokenized examples -> padded batches.

Classification rows have a text field (optionally a second text for pairs) and a label field; a label
is a class id, a label name, or a probability vector over the classes (soft targets, for
distillation). Language-modeling rows have a text field only. Every bad row is reported with its file
and line, and the whole file is rejected: training on silently skipped rows hides data bugs.

Sequences are tokenized once, truncated to `max_length` (how many were cut is logged), and padded
per batch, not to a global maximum. Batches come from a per-epoch permutation seeded by
`(seed, epoch)`, so a resumed run sees exactly the batches an uninterrupted one would; under
`torchrun` each rank takes an interleaved share, so one global batch of `world * b` examples is the
same set of examples as a single-process batch of that size.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from rewrite.errors import RewriteError
from rewrite.text.examples import Example, TokenizedExamples, pad_ids, pad_rows

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CLASSIFICATION = "seq-cls"
LM_TASKS = ("causal-lm", "masked-lm")
MLM_PROBABILITY = 0.15
_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_SHOWN_ERRORS = 5


@dataclass(frozen=True)
class Fields:
    """Which row fields hold the text, the optional second text of a pair, and the label."""

    text: str = "text"
    pair: str | None = None
    label: str = "label"
    columns: tuple[str, ...] | None = None  # a CSV/TSV without a header: its columns' names, in order


def _rows(path: Path, columns: Sequence[str] | None = None) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) pairs; a row that cannot be parsed comes back as the reason, a string.

    A UTF-8 byte-order mark is dropped; CSV/TSV fields may be as long as the file; `columns` names the
    columns of a file without a header row."""
    suffix = path.suffix.lower()
    csv.field_size_limit(max(csv.field_size_limit(), min(path.stat().st_size + 1, sys.maxsize)))
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if suffix == ".jsonl":
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    yield number, f"not valid JSON ({error.msg})"
                    continue
                yield number, row if isinstance(row, dict) else "not a JSON object"
            return
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        reader = csv.reader(handle, delimiter=_DELIMITERS[suffix], quoting=quoting)
        header = list(columns) if columns else next(reader, None)
        if header is None:
            return
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                yield reader.line_num, f"{len(row)} columns where the header has {len(header)}"
                continue
            yield reader.line_num, dict(zip(header, row))


def _label_id(value: Any, names: Sequence[str]) -> int | tuple[float, ...] | str:
    """A class id, a probability vector, or the reason the value is no label (a string)."""
    count = len(names)
    if isinstance(value, bool):
        return f"label {value!r} is not a class"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
        if value in names:
            return names.index(value)
        if value.lstrip("-").isdigit():
            value = int(value)
    if isinstance(value, int):
        return value if 0 <= value < count else f"label {value} is outside 0..{count - 1}"
    if isinstance(value, (list, tuple)):
        if len(value) != count or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in value):
            return f"soft label {value!r} is not {count} non-negative probabilities"
        return tuple(float(v) for v in value)
    return f"label {value!r} is not known"


def _text(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise ValueError(f"field {field!r} is missing")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {field!r} is empty" if isinstance(value, str) else f"field {field!r} is not text")
    return value


def _example(row: dict[str, Any], where: str, task: str, fields: Fields, names: Sequence[str]) -> Example:
    """Validates one row; raises ValueError with the reason."""
    text = _text(row, fields.text)
    pair = _text(row, fields.pair) if fields.pair else None
    if task != CLASSIFICATION:
        return Example(text, pair, None, where)
    if fields.label not in row or row[fields.label] in (None, ""):
        raise ValueError(f"field {fields.label!r} is missing")
    label = _label_id(row[fields.label], names)
    if isinstance(label, str):
        raise ValueError(label)
    return Example(text, pair, label, where)


def _expected(task: str, fields: Fields, names: Sequence[str]) -> str:
    texts = f"a non-empty {fields.text!r}" + (f" and {fields.pair!r}" if fields.pair else "")
    if task != CLASSIFICATION:
        return f"every row needs {texts}"
    return f"every row needs {texts} and a {fields.label!r} among {', '.join(names)} (or 0..{len(names) - 1})"


def read_examples(
    source: str | Path | Iterable[dict[str, Any]],
    *,
    task: str,
    fields: Fields = Fields(),
    label_names: Sequence[str] = (),
) -> list[Example]:
    """Reads and validates a `.jsonl`/`.csv`/`.tsv` file or an iterable of row dicts.

    TSV is read with quoting disabled (SST-2's sentences hold bare quote characters); CSV with
    standard quoting; both need a header row. Any bad row is an error naming file and line.
    """
    if task == CLASSIFICATION and len(label_names) < 2:
        raise RewriteError(f"classification needs at least 2 label names, got {list(label_names)!r}")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix.lower() not in (".jsonl", *_DELIMITERS):
            raise RewriteError(f"data file {str(path)!r} has an unknown format; use .jsonl, .csv or .tsv")
        if not path.is_file():
            raise RewriteError(f"data file {str(path)!r} does not exist")
        rows = ((f"{path}:{number}", row) for number, row in _rows(path, fields.columns))
        name = str(path)
    else:
        rows = ((f"row {number}", row) for number, row in enumerate(source, 1))
        name = "the training rows"
    examples, errors, found = [], [], None
    try:
        for where, row in rows:
            try:
                if isinstance(row, str):
                    raise ValueError(row)
                found = found or list(row)
                examples.append(_example(row, where, task, fields, names=label_names))
            except ValueError as error:
                errors.append(f"{where}: {error}")
    except UnicodeDecodeError as error:
        raise RewriteError(f"{name} is not UTF-8 text (byte {error.object[error.start]:#x} at offset {error.start}); "
                           "save it as UTF-8") from None
    if errors:
        shown = "; ".join(errors[:_SHOWN_ERRORS]) + ("; ..." if len(errors) > _SHOWN_ERRORS else "")
        columns = f"; the rows' fields are {', '.join(map(str, found))}" if found else ""
        headerless = found and not fields.columns and Path(name).suffix.lower() in _DELIMITERS
        header = " (if the file has no header row, name its columns with --columns)" if headerless else ""
        raise RewriteError(f"{len(errors)} bad row(s) in {name} ({shown}){columns}{header}; "
                           f"{_expected(task, fields, label_names)}")
    if not examples:
        raise RewriteError(f"{name} holds no rows; {_expected(task, fields, label_names)}")
    return examples


def encode(examples: Sequence[Example], tokenizer, max_length: int) -> TokenizedExamples:
    """Tokenizes once, truncating to `max_length`; counts and logs how many examples were cut."""
    texts = [e.text for e in examples]
    pairs = [e.pair for e in examples] if examples[0].pair is not None else None
    full = tokenizer(texts, pairs)
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    features = [{key: full[key][i] for key in full.keys()} for i in range(len(examples))]
    if long:
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                        truncation=True, max_length=max_length)
        for j, i in enumerate(long):
            features[i] = {key: cut[key][j] for key in cut.keys()}
        log.warning("%d of %d examples were longer than %d tokens and were truncated (first: %s)",
                    len(long), len(examples), max_length, examples[long[0]].where)
    labels = [e.label for e in examples] if examples[0].label is not None else None
    return TokenizedExamples(features, labels, len(long))


def _label_tensor(labels: list[int | tuple[float, ...]]) -> torch.Tensor:
    """Class ids as a long tensor; if any label is soft, every label as a probability row."""
    soft = [label for label in labels if isinstance(label, tuple)]
    if not soft:
        return torch.tensor(labels, dtype=torch.long)
    count = len(soft[0])
    rows = [label if isinstance(label, tuple) else [float(i == label) for i in range(count)] for label in labels]
    return torch.tensor(rows, dtype=torch.float32)


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, tokenizer, generator: torch.Generator):
    """BERT's masking: 15% of real tokens are targets; of those 80% [MASK], 10% random, 10% unchanged."""
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape, generator=generator) < MLM_PROBABILITY) & ~special
    labels[~chosen] = IGNORE_INDEX
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    randomized = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[randomized] = torch.randint(len(tokenizer), input_ids.shape, generator=generator)[randomized]
    return masked, labels


def _mask_rows(input_ids: torch.Tensor, special: torch.Tensor, real: torch.Tensor, tokenizer,
               seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_tokens` on each row's real tokens, drawn from a generator seeded by the row's seed: a row's mask
    depends neither on its neighbours nor on the batch's padding."""
    masked, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    for row, seed in enumerate(seeds):
        keep = real[row]
        masked[row, keep], labels[row, keep] = mask_tokens(input_ids[row, keep], special[row, keep], tokenizer,
                                                           torch.Generator().manual_seed(seed))
    return masked, labels


def collate(encoded: TokenizedExamples, indices: Sequence[int], tokenizer, task: str, input_names: Sequence[str],
            mask_seeds: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """One padded batch: the graph's inputs plus `labels` (class ids, soft rows, or token targets).

    Causal-LM labels are the input ids with padding (and `encoded.reserved` ids) set to -100 (the
    loss shifts them); masked-LM labels are the masked positions' ids, chosen among real tokens only: never
    special, padding or reserved positions. Each example is masked from its own seed (`mask_seeds`, one per
    index), so its mask is reproducible and the same in any batch: on any number of ranks.
    """
    left = getattr(tokenizer, "padding_side", "right") == "left"
    features = [encoded.features[i] for i in indices]
    batch = {k: torch.from_numpy(v) for k, v in pad_ids([f["input_ids"] for f in features], tokenizer).items()}
    for name in input_names:
        if name not in batch:
            rows = pad_rows([f.get(name, [0] * len(f["input_ids"])) for f in features], 0, left)
            batch[name] = torch.from_numpy(rows)
    if task == CLASSIFICATION:
        batch["labels"] = _label_tensor([encoded.labels[i] for i in indices])
        return batch
    no_target = (batch["attention_mask"] == 0) | torch.isin(batch["input_ids"], torch.tensor(encoded.reserved,
                                                                                                dtype=torch.long))
    if task == "causal-lm":
        batch["labels"] = batch["input_ids"].masked_fill(no_target, IGNORE_INDEX)
    else:
        special = pad_rows([tokenizer.get_special_tokens_mask(f["input_ids"], already_has_special_tokens=True)
                            for f in features], 1, left)
        special = torch.from_numpy(special).bool() | no_target
        batch["input_ids"], batch["labels"] = _mask_rows(batch["input_ids"], special, batch["attention_mask"] == 1,
                                                         tokenizer, mask_seeds)
    return batch


def epoch_order(lengths: Sequence[int], world: int, batch_size: int, *, seed: int, epoch: int,
                group_by_length: bool = False) -> list[int]:
    """The epoch's global example order: a permutation seeded by `(seed, epoch)`.

    With `group_by_length`, each run of 50 global batches (`world * batch_size` examples each) is
    sorted by length and the batches are then shuffled, so a batch holds examples of similar length
    and little padding (Hugging Face's `group_by_length`). SST-2's phrases pad to 3x their tokens
    in random batches, 1.07x grouped.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return order
    step = world * batch_size
    chunk = 50 * step
    grouped = [i for start in range(0, len(order), chunk)
               for i in sorted(order[start:start + chunk], key=lambda i: -lengths[i])]
    full = [grouped[i:i + step] for i in range(0, len(grouped) - len(grouped) % step, step)]
    shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in shuffled for i in batch] + grouped[len(full) * step:]


def shard(order: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's share of an epoch order: the order padded (by repeating its start) to a multiple of
    `world`, then every `world`-th entry from `rank` (torch's DistributedSampler rule). Batch k of every
    rank together is batch k of a single process with `world` times the batch size."""
    order = list(order)
    padded = order + order[: (-len(order)) % world]
    return padded[rank::world]


def by_length(lengths: Sequence[int]) -> list[int]:
    """Indices longest first: evaluation batches with the least padding (the metrics do not depend on order)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]


def micro_batches_per_epoch(size: int, world: int, batch_size: int) -> int:
    return math.ceil(math.ceil(size / world) / batch_size)
