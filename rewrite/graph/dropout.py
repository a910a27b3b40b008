"""Dropout for CPU training from 16-bit random lanes: the same distribution, a fifth of the drawing time.

On CPU, `torch.dropout` draws its keep mask with `bernoulli_`, element by element (39 ms for one
MiniLM attention-probability mask, 32 x 12 x 128 x 128), and `scaled_dot_product_attention` with
`dropout_p > 0` leaves its fused kernel for the math path. `keep_mask` takes four independent
uniform 16-bit lanes from each full-range 64-bit word of torch's generator (9 ms for that mask):
an element is dropped with probability `round(p * 2**16) / 2**16` (0.1 -> 0.1000061), and the kept
ones are divided by `1 - p`, as torch does. The draws come from torch's global generator, so
`torch.manual_seed`, checkpointed RNG state and activation checkpointing replay them.

`dropout` and `attention` take the arguments of `aten.dropout` and `aten.scaled_dot_product_attention`
(the `fast_dropout` pass swaps them in, `rewrite.graph.modes` switches their train flags) and are those ops
wherever this does not apply: eval mode, another device, `torch.compile`, a trainable attention bias.
Under CPU autocast they return the dtypes torch's ops would.
"""
from __future__ import annotations

import math

import torch

aten = torch.ops.aten
_LANES = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A 0/1 tensor of `shape`: each element 0 (dropped) independently with probability
    `round(p * 2**16) / 2**16`, from torch's generator. Float, because multiplying by it is three
    times faster on CPU than `masked_fill` or `where` with a bool mask."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    lanes = words.view(torch.int16)[:numel].view(shape)
    threshold = round(p * _LANES) - _LANES // 2  # a lane below it drops its element
    return lanes.to(torch.float32).add_(1 - threshold).clamp_(0.0, 1.0).to(dtype)


def _applies(tensor: torch.Tensor, p: float) -> bool:
    """Eager CPU work only: under `torch.compile` Inductor generates its own random numbers."""
    return 0.0 < p < 1.0 and tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """`aten.dropout(input, p, train)` with the mask from `keep_mask` on CPU."""
    if not (train and _applies(input, p)):
        return aten.dropout.default(input, p, train)
    return input * keep_mask(input.shape, p, input.dtype, input.device).div_(1.0 - p)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """`aten.scaled_dot_product_attention` with the attention-probability dropout from `keep_mask` on CPU."""
    if not _applies(query, dropout_p) or (attn_mask is not None and attn_mask.requires_grad):
        return aten.scaled_dot_product_attention.default(query, key, value, attn_mask, dropout_p, is_causal,
                                                         scale=scale, enable_gqa=enable_gqa)
    if enable_gqa:  # each key/value head serves a group of query heads
        group = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(group, -3), value.repeat_interleave(group, -3)
    if is_causal:  # SDPA's causal mask: the upper-left triangle
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    # as SDPA: autocast hands it its dtype, and the math path computes in fp32 and returns that dtype
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    query, key, value = (t.to(dtype).to(compute) for t in (query, key, value))
    with torch.autocast("cpu", enabled=False):
        return _DroppedAttention.apply(query, key, value, attn_mask, dropout_p, scale).to(dtype)


class _DroppedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) with dropout, times v, in the math path's order of operations (q and
    k each scaled by sqrt(scale), the mask scaled by 1 / (1 - p)), so its rounding is the math path's;
    saves the probabilities and the mask (the math path saves the dropped probabilities besides)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, p, scale):
        root = math.sqrt(scale)
        query, key = query * root, key * root
        scores = torch.matmul(query, key.transpose(-2, -1))
        if mask is not None:
            scores = scores.masked_fill_(~mask, -math.inf) if mask.dtype == torch.bool else scores.add_(mask)
        probs = torch.softmax(scores, -1)
        if mask is not None:  # a row with every key masked attends to nothing, as in SDPA
            probs = probs.nan_to_num_(0.0)
        keep = keep_mask(probs.shape, p, probs.dtype, probs.device).div_(1.0 - p)
        ctx.save_for_backward(query, key, value, probs, keep)
        ctx.root = root
        return torch.matmul(probs * keep, value)

    @staticmethod
    def backward(ctx, grad):
        query, key, value, probs, keep = ctx.saved_tensors  # query and key scaled
        want_query, want_key, want_value = ctx.needs_input_grad[:3]
        grad_value = torch.matmul((probs * keep).transpose(-2, -1), grad) if want_value else None
        grad_query = grad_key = None
        if want_query or want_key:
            grad_probs = torch.matmul(grad, value.transpose(-2, -1)).mul_(keep)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_query = torch.matmul(grad_scores, key).mul_(ctx.root) if want_query else None
            grad_key = torch.matmul(grad_scores.transpose(-2, -1), query).mul_(ctx.root) if want_key else None
        return grad_query, grad_key, grad_value, None, None, None
