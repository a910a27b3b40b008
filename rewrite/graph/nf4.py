"""NF4 weights (QLoRA's 4-bit NormalFloat) exactly as bitsandbytes stores and computes them.

A projection's weight `W [N=out, K=in]` is flattened row-major and cut into blocks of `block_size`; each block
keeps its largest magnitude (`absmax`, fp32) and each weight the index of the nearest of NF4's 16 values to
`w / absmax` (a value exactly between two goes to the lower one):

- `qweight` uint8 `[ceil(N*K / 2)]`: two indices a byte, the FIRST in the HIGH nibble (MatMulNBits' order is the
  other way round).
- `absmax` fp32 `[n_blocks]`; with double quantization (QLoRA's default) the block absmaxes are quantized too:
  `offset` (fp32, 0-d) is their mean, `qabsmax` uint8 `[n_blocks]` holds each `absmax - offset` as an index into
  bitsandbytes' signed 8-bit dynamic map, and `absmax` then holds fp32 `[ceil(n_blocks / 256)]`, the largest
  magnitude of each `STATISTICS_BLOCK` of them, quantized as bitsandbytes' CPU quantizer does (a lookup table).

The weight is `code[q] * absmax` in fp32 (with double quantization, `absmax = dynamic[qabsmax] * absmax2 +
offset` first), bit for bit what `bitsandbytes.functional.dequantize_4bit` and a training `Linear4bit` compute
and what ONNX Runtime's `com.microsoft.MatMulBnb4` computes from the same bytes. (bitsandbytes 0.50's CPU
`dequantize_4bit` disagrees with its own quantizer where a block spans two rows (`in < block_size`);
in eval mode on AVX512-BF16 CPUs `Linear4bit` multiplies in bf16.) The graph calls `rewrite::matmul_nf4`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

OP_NAME = "rewrite::matmul_nf4"
BLOCK_SIZES = tuple(2**i for i in range(5, 13))  # 32 ... 4096, what bitsandbytes accepts
DEFAULT_BLOCK_SIZE = 64
STATISTICS_BLOCK = 256  # bitsandbytes' block for the double-quantized absmaxes
TENSORS = ("qweight", "absmax", "qabsmax", "offset")  # a quantized module's buffers, `<module path>.<name>`

# bitsandbytes' `get_4bit_type("nf4")`, float32 (QLoRA's normal quantiles, hard-coded there too).
CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted fp32 values, a decimal exponent from 1e-6 to 1
    and a linear fraction whose bits grow as the exponent shrinks."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data + [0] * (256 - len(data))), dtype=torch.float32)


DYNAMIC = _dynamic_map()
ZERO = 7  # the index of 0.0, which pads an odd count of weights
CHUNK = 1 << 22
"""Elements quantized at a time, in both formats (whole NF4 blocks; whole int4/int8 rows): the quantizer's
temporaries, several times its input, stay small beside the weight (a 7B model's 0.5 GiB embeddings included)."""
LOOKUP = 65536


@dataclass(frozen=True)
class Packed:
    """A weight as bitsandbytes' NF4 holds it (`qabsmax` and `offset` only with double quantization)."""

    qweight: torch.Tensor
    absmax: torch.Tensor
    qabsmax: torch.Tensor | None
    offset: torch.Tensor | None


def _rows(values: torch.Tensor, block: int) -> torch.Tensor:
    """A flat tensor as `[n_blocks, block]`, the last block zero-padded."""
    return torch.nn.functional.pad(values, (0, -values.numel() % block)).view(-1, block)


def _nf4_indices(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' 4-bit quantizer on a flat fp32 tensor: per block the absmax, per value the code index nearest
    to `value * (1 / absmax)` (a shorter last block divides), found between the codes' midpoints."""
    n = values.numel()
    rows = _rows(values, block)
    absmax = rows.abs().amax(-1)
    scaled = rows * (1.0 / absmax.clamp(min=1e-38))[:, None]
    if n % block:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = rows[-1] / absmax[-1]
    code = CODE.to(values.device)
    index = torch.bucketize(scaled.clamp(-1, 1).view(-1)[:n], (code[:-1] + code[1:]) / 2)
    return index.to(torch.uint8), absmax


def _dynamic_lookup() -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer looks values up in a 65536-entry table over [-1, 1]: entry `i` (the value
    `-1 + 2i / 65535`) holds the index of the first code whose upper midpoint is not below it."""
    grid = -1.0 + (2.0 * torch.arange(LOOKUP, dtype=torch.float32)) / (LOOKUP - 1)
    return torch.searchsorted(0.5 * (DYNAMIC[:-1] + DYNAMIC[1:]), grid).to(torch.uint8)


def _dynamic_indices(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU `quantize_blockwise` (blocks of `STATISTICS_BLOCK`) on a flat fp32 tensor: per block the
    absmax, per value `value * (1 / absmax)` rounded to the table's grid, `((v + 1) * 0.5) * 65535 + 0.5`
    truncated, and looked up (an all-zero block stores zeros)."""
    n = values.numel()
    rows = _rows(values, STATISTICS_BLOCK)
    absmax = rows.abs().amax(-1)
    scaled = (rows * (1.0 / absmax)[:, None]).clamp(-1, 1)
    grid = torch.trunc(((scaled + 1.0) * 0.5) * (LOOKUP - 1) + 0.5).long()
    index = torch.where(absmax[:, None] == 0, 0, _DYNAMIC_LOOKUP.to(values.device)[grid.clamp(0, LOOKUP - 1)])
    return index.view(-1)[:n].to(torch.uint8), absmax


_DYNAMIC_LOOKUP = _dynamic_lookup()


def _expand(values: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """`values * scale[i // block]`, one fp32 product each. `values` (a fresh tensor, which callers give) is
    scaled in place where it fills whole blocks: dequantizing a projection in every QLoRA forward and backward then
    allocates its weight once, not three times (padded copy, product)."""
    if values.numel() % block == 0:
        return values.view(-1, block).mul_(scale[:, None]).view(-1)
    return (_rows(values, block) * scale[:, None]).view(-1)[: values.numel()]


def _pairs(index: torch.Tensor) -> torch.Tensor:
    """Indices two to a byte, the first in the high nibble (an odd count padded with the index of 0.0)."""
    index = torch.nn.functional.pad(index, (0, index.numel() % 2), value=ZERO)
    return (index[0::2] << 4) | index[1::2]


def quantize(weight: torch.Tensor, block_size: int, double_quant: bool) -> Packed:
    """`weight [N, K]` as `bitsandbytes.functional.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
    compress_statistics=double_quant)` stores it."""
    chunks = [_nf4_indices(part.float(), block_size) for part in weight.detach().reshape(-1).split(CHUNK)]
    qweight = torch.cat([_pairs(index) for index, _ in chunks])
    absmax = torch.cat([absmax for _, absmax in chunks])
    if not double_quant:
        return Packed(qweight, absmax, None, None)
    offset = absmax.mean()
    qabsmax, absmax2 = _dynamic_indices(absmax - offset)
    return Packed(qweight, absmax2, qabsmax, offset)


def block_absmax(absmax: torch.Tensor, qabsmax: torch.Tensor | None, offset: torch.Tensor | None) -> torch.Tensor:
    """Each block's fp32 absmax, the double quantization undone as bitsandbytes does (MatMulBnb4's `absmax`)."""
    if qabsmax is None:
        return absmax
    return _expand(DYNAMIC.to(absmax.device)[qabsmax.long()], absmax, STATISTICS_BLOCK) + offset


_BYTE_CODES = torch.stack([CODE.repeat_interleave(16), CODE.repeat(16)], -1)
"""Each packed byte's two code values, high nibble first: one lookup per byte dequantizes (training runs it for
every NF4 projection in the forward and again in the backward)."""


def dequantize(qweight: torch.Tensor, absmax: torch.Tensor, qabsmax: torch.Tensor | None,
               offset: torch.Tensor | None, k: int, n: int, block_size: int) -> torch.Tensor:
    """The `[N, K]` fp32 weight: `code[q] * absmax`."""
    codes = _BYTE_CODES.to(absmax.device)[qweight.int()].view(-1)[: n * k]
    return _expand(codes, block_absmax(absmax, qabsmax, offset), block_size).view(n, k)


@torch.library.custom_op(OP_NAME, mutates_args=())
def matmul_nf4(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, qabsmax: Optional[torch.Tensor],
               offset: Optional[torch.Tensor], bias: Optional[torch.Tensor], k: int, n: int, block_size: int,
               statistics_block: int) -> torch.Tensor:
    """`x @ dequantize(...).T (+ bias)` in x's dtype: one `Linear4bit` (`statistics_block` is 0 without double
    quantization)."""
    weight = dequantize(qweight, absmax, qabsmax, offset, k, n, block_size).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


@matmul_nf4.register_fake
def _(x, qweight, absmax, qabsmax, offset, bias, k, n, block_size, statistics_block):
    return x.new_empty(*x.shape[:-1], n)


def _setup(ctx, inputs, output) -> None:
    x, qweight, absmax, qabsmax, offset, bias, k, n, block_size, _ = inputs
    ctx.save_for_backward(qweight, absmax, qabsmax, offset)
    ctx.shape, ctx.bias_grad = (k, n, block_size), bias is not None and bias.requires_grad


def _backward(ctx, grad: torch.Tensor):
    """The packed weights are constants: the gradient flows to the input (and a trained bias) only."""
    qweight, absmax, qabsmax, offset = ctx.saved_tensors
    grad_x = grad @ dequantize(qweight, absmax, qabsmax, offset, *ctx.shape).to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
    return grad_x, None, None, None, None, grad_bias, None, None, None, None


matmul_nf4.register_autograd(_backward, setup_context=_setup)
OP = torch.ops.rewrite.matmul_nf4.default
