"""Language-modeling loss without the full logits: the output head and cross-entropy run together, on
the positions that have labels only, a chunk of rows at a time.

A causal LM's `[batch, seq, vocab]` fp32 logits (and their log-softmax and gradient, each as large)
are most of its training memory at a 32k vocabulary. `head_loss_sum` never holds more than one
chunk's logits: the forward computes each chunk's loss and, when gradients are wanted, its
gradients too (softmax minus one-hot, times the head weight), so the backward only scales them, and
the head costs no recomputation. The numbers are those of `cross_entropy(linear(hidden, W, b))`.
A pass that cuts the head from the graph (`passes/chunked_loss.py`) leaves it to this function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from rewrite.training.data import IGNORE_INDEX
from rewrite.graph.ir import info, tensor_at

CHUNK_ELEMENTS = 2 ** 22  # logits per chunk (16 MiB in fp32; a logsumexp temporary as large)


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's targets per position: position t predicts token t + 1 (the labels shift, not the logits)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@dataclass
class Head:
    """An output projection the graph left to the loss: logits = hidden @ W.T + b (hidden @ W when transposed)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
        """The summed cross-entropy of `labels` ([batch, seq], already aligned with `hidden`'s positions)."""
        if task == "causal-lm":
            labels = next_token_labels(labels)
        targets = labels != IGNORE_INDEX
        weight = self.weight.T if self.transposed else self.weight
        return head_loss_sum(hidden[targets], labels[targets], weight, self.bias)


def head_of(gm: fx.GraphModule) -> Head | None:
    """The head a `chunked_loss` pass cut from `gm`'s logits output, if any."""
    record = info(gm).loss_head
    if record is None:
        return None
    bias = tensor_at(gm, record.bias) if record.bias else None
    return Head(tensor_at(gm, record.weight), bias, record.transposed)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: autocast's where it is on (as `nn.Linear` would run), else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias`, chunked over rows; gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, dtype):
        want_hidden, _, want_weight, want_bias, _ = ctx.needs_input_grad
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start:start + rows].to(dtype)
                t = targets[start:start + rows]
                logits = F.linear(h, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (want_hidden or want_weight or want_bias):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                if want_bias:
                    grad_bias += grad.sum(0)
                grad = grad.to(dtype)
                if want_hidden:
                    grad_hidden[start:start + rows] = grad @ w
                if want_weight:
                    grad_weight += grad.T.float() @ h.float()
        ctx.save_for_backward(grad_hidden, *(g.to(p.dtype) if g is not None else None
                                             for g, p in ((grad_weight, weight), (grad_bias, bias))))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = [g * grad_output.to(g.dtype) if g is not None else None for g in ctx.saved_tensors]
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, None, grad_weight, grad_bias, None


def head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`cross_entropy(linear(hidden, weight, bias).float(), targets, reduction="sum")` for [rows, width]
    hidden states, without holding more than a chunk of the logits."""
    return _HeadCrossEntropy.apply(hidden, targets, weight, bias, _compute_dtype(hidden))
