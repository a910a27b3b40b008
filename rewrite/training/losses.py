"""Task losses, as Hugging Face computes them from `labels`: classification (soft targets allowed),
next-token and masked-token prediction, as sums with the item count they are sums over (so gradient
accumulation and several ranks give the update of one big batch), and accuracy counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewrite.training.data import CLASSIFICATION, IGNORE_INDEX
from rewrite.errors import RewriteError
from rewrite.training.head_loss import Head, next_token_labels


def logits_of(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast for the softmax; fp32 logits are used as they are (no copy)."""
    return logits if logits.dtype == torch.float32 else logits.float()


def _prepend_ignored(labels: torch.Tensor, prepended: int) -> torch.Tensor:
    """Token labels for a graph whose sequence outputs start with `prepended` positions the input does not
    have (prompt tuning's virtual tokens): those positions get -100, as PEFT prepends."""
    return F.pad(labels, (prepended, 0), value=IGNORE_INDEX) if prepended else labels


def _aligned(labels: torch.Tensor, logits: torch.Tensor, prepended: int) -> torch.Tensor:
    if labels.shape[1] + prepended != logits.shape[1]:
        raise RewriteError(f"the graph's logits have {logits.shape[1]} positions for {labels.shape[1]} input tokens "
                           f"({prepended} prepended by its passes); the language-modeling loss cannot align them")
    return _prepend_ignored(labels, prepended)


def loss_sum(outputs, labels: torch.Tensor, task: str, prepended: int = 0, head: Head | None = None) -> torch.Tensor:
    """The summed task loss; `item_count` is what it is a sum over. With `head`, the outputs are the
    hidden states that head reads (a pass left the head to the loss) and the loss applies it."""
    logits = logits_of(outputs)
    if task == CLASSIFICATION:
        logits = _upcast(logits)
        if labels.is_floating_point():
            return -(labels * F.log_softmax(logits, dim=-1)).sum()
        return F.cross_entropy(logits, labels, reduction="sum")
    labels = _aligned(labels, logits, prepended)
    if head is not None:
        return head.loss_sum(logits, labels, task)
    if task == "causal-lm":
        # Shift the labels, not the logits: the [batch, seq, vocab] tensor is never copied.
        return F.cross_entropy(_upcast(logits).flatten(0, 1), next_token_labels(labels).flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    targets = labels != IGNORE_INDEX  # masked-lm: only the masked positions' rows are read
    return F.cross_entropy(_upcast(logits[targets]), labels[targets], reduction="sum")


def item_count(labels: torch.Tensor, task: str, prepended: int = 0) -> int:
    """Examples (classification) or target tokens (language modeling) in a batch."""
    if task == CLASSIFICATION:
        return labels.shape[0]
    if task == "causal-lm":  # a prepended position predicts the first token, which is then a target too
        return int((_prepend_ignored(labels, prepended)[:, 1:] != IGNORE_INDEX).sum())
    return int((labels != IGNORE_INDEX).sum())


def task_loss(outputs, batch: dict[str, torch.Tensor], task: str, prepended: int = 0) -> torch.Tensor:
    """The mean task loss of one batch, as Hugging Face computes it from `labels`; `prepended`: see
    `rewrite.training.train.prepended_positions`."""
    return loss_sum(outputs, batch["labels"], task, prepended) / max(item_count(batch["labels"], task, prepended), 1)


def accuracy_counts(outputs, labels: torch.Tensor, task: str = CLASSIFICATION, prepended: int = 0) -> tuple[int, int]:
    """(correct, scored): examples for classification, target tokens for language modeling (the
    masked positions of a masked LM, the next tokens of a causal LM)."""
    logits = logits_of(outputs)
    if task == CLASSIFICATION:
        target = labels.argmax(-1) if labels.is_floating_point() else labels
        return int((logits.argmax(-1) == target).sum()), labels.shape[0]
    labels = _aligned(labels, logits, prepended)
    if task == "causal-lm":
        labels = next_token_labels(labels)
    chosen = labels != IGNORE_INDEX
    return int((logits[chosen].argmax(-1) == labels[chosen]).sum()), int(chosen.sum())
