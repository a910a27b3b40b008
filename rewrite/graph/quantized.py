"""Weight-only int4/int8 quantization exactly as ONNX Runtime's `com.microsoft.MatMulNBits` stores and computes it.

A projection `y = x @ W.T (+ b)` with `W [N=out, K=in]` keeps, per output row and per block of `block_size`
inputs, a scale and (unless symmetric) a zero point, and its weights packed as MatMulNBits' input B:

- `qweight` uint8 `[N, n_blocks, block_size * bits / 8]`; 4-bit element `2j` in the low nibble, `2j+1` in the
  high one; a K that is no multiple of the block is zero-padded (MLAS leaves a stale value in the one nibble
  after an odd K, which the kernel never reads; ours is zero).
- `scales` `[N, n_blocks]` in the weight's dtype.
- `qzeros` uint8 `[N, ceil(n_blocks * bits / 8)]` (4-bit: block `2i` low nibble, an odd count padded with 8);
  none when symmetric, where MatMulNBits uses `2^(bits-1)`.

`quantize` is MLAS' blockwise quantizer (what `onnxruntime.quantization.matmul_nbits_quantizer`'s default config
calls), byte for byte; `dequantize` is the kernel's `(q - zp) * scale`, bit for bit. So the weights a quantized
graph trains over are the weights ONNX Runtime serves. The graph calls one operator, `rewrite::matmul_nbits`,
which torch.export keeps as one node, the ONNX exporter writes as one MatMulNBits node, and the archive decoder
admits by name. NF4 (QLoRA's format, `rewrite.graph.nf4`) is the third `Format`: the functions below that take a
node or a `Format` serve all three, so callers never read a quantized node's arguments by position.

A word-embedding table `[vocab, hidden]` is packed the same way and looked up by `rewrite::gather_nbits`, written
as ONNX Runtime's `com.microsoft.GatherBlockQuantized`, which reads MatMulNBits' packing as is (verified bit-equal):
so a LM head tied to the embeddings multiplies by the very buffers the lookup reads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import fx

from rewrite.graph import nf4
from rewrite.errors import RewriteError
from rewrite.graph.ir import copy_meta, remove_tensor, tensor_at
from rewrite.graph.pipeline import Pass, create, implements, registered

OP_NAME = "rewrite::matmul_nbits"
GATHER_NAME = "rewrite::gather_nbits"
BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what ONNX Runtime's CPU kernel and quantizer accept
DEFAULT_BLOCK_SIZE = 32
TENSORS = ("qweight", "scales", "qzeros")  # a quantized module's buffers, `<module path>.<name>`
DTYPES = ("int4", "int8", "nf4")


@dataclass(frozen=True)
class Format:
    """How a quantized projection stores its weight: `int4`/`int8` as MatMulNBits (`symmetric`: no zero points) or
    `nf4` as bitsandbytes (`double_quant`: the block absmaxes quantized too)."""

    dtype: str
    block_size: int
    symmetric: bool = False
    double_quant: bool = False

    @property
    def bits(self) -> int:
        return 8 if self.dtype == "int8" else 4

    @property
    def tensors(self) -> tuple[str, ...]:
        """The buffers' names, in the order the node reads them."""
        return nf4.TENSORS if self.dtype == "nf4" else TENSORS


@dataclass(frozen=True)
class Packed:
    """A weight as MatMulNBits holds it."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's `roundf`, half away from zero (MLAS rounds so; torch.round rounds half to even)."""
    whole = torch.trunc(x)
    return torch.where((x - whole).abs() >= 0.5, whole + torch.sign(x), whole)


def _blocks(w: torch.Tensor, block: int, fill: float) -> torch.Tensor:
    """`[N, K]` as `[N, n_blocks, block]`, the tail padded with `fill`."""
    n, k = w.shape
    return torch.nn.functional.pad(w, (0, -k % block), value=fill).view(n, -1, block)


def _nibbles(low_high: torch.Tensor) -> torch.Tensor:
    """Pairs along the last axis packed into bytes, the first of each pair in the low nibble."""
    return low_high[..., 0::2] | (low_high[..., 1::2] << 4)


def quantize(weight: torch.Tensor, bits: int, block_size: int, symmetric: bool) -> Packed:
    """`weight [N, K]` quantized along K as MLAS does: asymmetric blocks span `[min(w, 0), max(w, 0)]` with a
    rounded zero point; symmetric ones map the signed value of largest magnitude to `-2^(bits-1)` (so the scale is
    negative when it is positive); values are rounded with the stored scale's reciprocal. Rows are independent, so
    they are quantized `nf4.CHUNK` elements at a time."""
    parts = [_quantize_rows(rows, bits, block_size, symmetric)
             for rows in weight.detach().split(max(1, nf4.CHUNK // weight.shape[1]))]
    joined = {f.name: [getattr(part, f.name) for part in parts] for f in dataclasses.fields(Packed)}
    return Packed(**{name: None if tensors[0] is None else torch.cat(tensors) for name, tensors in joined.items()})


def _quantize_rows(weight: torch.Tensor, bits: int, block_size: int, symmetric: bool) -> Packed:
    n, k = weight.shape
    qmax, mid = 2**bits - 1, 2 ** (bits - 1)
    w = weight.detach().float()
    low, high = _blocks(w, block_size, float("inf")).amin(-1), _blocks(w, block_size, float("-inf")).amax(-1)
    if symmetric:
        signed = torch.where(high.abs() > low.abs(), high, low)
        scales = (-signed / mid).to(weight.dtype)
        zeros = torch.full_like(low, mid, dtype=torch.uint8)
    else:
        low, high = low.clamp(max=0), high.clamp(min=0)
        step = (high - low) / qmax
        zeros = _roundf(torch.where(step != 0, 0 - low / step, low)).clamp(0, qmax).to(torch.uint8)
        scales = step.to(weight.dtype)
    stored = scales.float()
    inverse = torch.where(stored != 0, 1.0 / stored, torch.zeros_like(stored))
    q = _roundf(_blocks(w, block_size, 0.0) * inverse[..., None] + zeros[..., None].float()).clamp(0, qmax)
    q = q.to(torch.uint8).view(n, -1)
    q[:, k:] = 0
    n_blocks = scales.shape[1]
    if bits == 8:
        return Packed(q.view(n, n_blocks, block_size), scales, None if symmetric else zeros)
    packed_zeros = None if symmetric else _nibbles(torch.nn.functional.pad(zeros, (0, n_blocks % 2), value=mid))
    return Packed(_nibbles(q).view(n, n_blocks, block_size // 2), scales, packed_zeros)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, k: int,
               bits: int) -> torch.Tensor:
    """MatMulNBits' weight `[N, K]`: `(q - zp) * scale` in the scales' dtype (not `q*s - zp*s`, which rounds twice).
    Bytes are widened to int32 before the bit operations, which export cleanly."""
    n, n_blocks, _ = qweight.shape
    q = qweight.to(torch.int32)
    if bits == 4:
        q = torch.stack([q & 0xF, q >> 4], -1).view(n, n_blocks, -1)
    if qzeros is None:
        zeros = torch.full((n, n_blocks), 2 ** (bits - 1), dtype=torch.int32, device=qweight.device)
    else:
        zeros = qzeros.to(torch.int32)
        zeros = torch.stack([zeros & 0xF, zeros >> 4], -1).view(n, -1)[:, :n_blocks] if bits == 4 else zeros
    dtype = scales.dtype
    w = (q.to(dtype) - zeros.to(dtype)[..., None]) * scales.view(n, n_blocks)[..., None]
    return w.view(n, -1)[:, :k]


@torch.library.custom_op(OP_NAME, mutates_args=())
def matmul_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    """`x @ dequantize(...).T (+ bias)`: one MatMulNBits."""
    return torch.nn.functional.linear(x, dequantize(qweight, scales, qzeros, k, bits), bias)


@matmul_nbits.register_fake
def _(x, qweight, scales, qzeros, bias, k, n, bits, block_size):
    return x.new_empty(*x.shape[:-1], n)


def _setup(ctx, inputs, output) -> None:
    x, qweight, scales, qzeros, bias, k, n, bits, block_size = inputs
    ctx.save_for_backward(qweight, scales, qzeros)
    ctx.k, ctx.bits, ctx.bias_grad = k, bits, bias is not None and bias.requires_grad


def _backward(ctx, grad: torch.Tensor):
    """The packed weights are constants: the gradient flows to the input (and a trained bias) only."""
    qweight, scales, qzeros = ctx.saved_tensors
    grad_x = grad @ dequantize(qweight, scales, qzeros, ctx.k, ctx.bits)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
    return grad_x, None, None, None, grad_bias, None, None, None, None


matmul_nbits.register_autograd(_backward, setup_context=_setup)
OP = torch.ops.rewrite.matmul_nbits.default
OPS = (OP, nf4.OP)


@torch.library.custom_op(GATHER_NAME, mutates_args=())
def gather_nbits(qweight: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor],
                 k: int, bits: int, block_size: int) -> torch.Tensor:
    """Rows `indices` of the `[vocab, k]` table `dequantize(...)`: one GatherBlockQuantized. Only the rows looked
    up are dequantized, so the float table never exists (its arguments in `aten.embedding`'s order: table, ids)."""
    flat = indices.reshape(-1)
    rows = dequantize(qweight[flat], scales[flat], None if qzeros is None else qzeros[flat], k, bits)
    return rows.reshape(*indices.shape, k)


@gather_nbits.register_fake
def _(qweight, indices, scales, qzeros, k, bits, block_size):
    return scales.new_empty(*indices.shape, k)


GATHER = torch.ops.rewrite.gather_nbits.default
CUSTOM_OPS = (*OPS, GATHER)


def is_quantized(node: fx.Node) -> bool:
    """Whether `node` is a quantized projection."""
    return node.op == "call_function" and node.target in OPS


def is_quantized_lookup(node: fx.Node) -> bool:
    """Whether `node` looks rows up in a quantized table."""
    return node.op == "call_function" and node.target is GATHER


def format_of(node: fx.Node) -> Format:
    """The format a quantized projection or lookup computes with."""
    if node.target is GATHER:
        return Format(f"int{node.args[5]}", node.args[6], symmetric=node.args[3] is None)
    if node.target is nf4.OP:
        return Format("nf4", node.args[8], double_quant=node.args[3] is not None)
    return Format(f"int{node.args[7]}", node.args[8], symmetric=node.args[3] is None)


def quantize_as(weight: torch.Tensor, fmt: Format) -> Packed | nf4.Packed:
    """A float `[N, K]` weight in `fmt`."""
    if fmt.dtype == "nf4":
        return nf4.quantize(weight, fmt.block_size, fmt.double_quant)
    return quantize(weight, fmt.bits, fmt.block_size, fmt.symmetric)


def restore(packed: Packed | nf4.Packed, fmt: Format, k: int, n: int) -> torch.Tensor:
    """The `[N, K]` weight a packed one stands for."""
    if fmt.dtype == "nf4":
        return nf4.dequantize(packed.qweight, packed.absmax, packed.qabsmax, packed.offset, k, n, fmt.block_size)
    return dequantize(packed.qweight, packed.scales, packed.qzeros, k, fmt.bits)


def stored(packed: Packed | nf4.Packed) -> dict[str, torch.Tensor]:
    """A packed weight's tensors by buffer name (absent ones left out)."""
    return {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed) if getattr(packed, f.name) is not None}


def _reads(node: fx.Node) -> dict[str, fx.Node | None]:
    """A quantized node's buffer reads by name."""
    names = format_of(node).tensors
    if node.target is GATHER:
        return dict(zip(names, (node.args[0], *node.args[2:4])))
    return dict(zip(names, node.args[1:1 + len(names)]))


def _bias(node: fx.Node) -> fx.Node | None:
    return node.args[1 + len(format_of(node).tensors)]


def projection_bias(node: fx.Node) -> fx.Node | None:
    """The bias a projection adds itself: `linear(x, W, b)`, Conv1D's `addmm(b, x, W)`."""
    if node.target is torch.ops.aten.linear.default:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0] if node.target is torch.ops.aten.addmm.default else None


def store(gm: fx.GraphModule, weight: str, transposed: bool, fmt: Format, owner: str | None = None
          ) -> Packed | nf4.Packed:
    """Quantizes the weight `weight` names (`[out, in]`, or `[in, out]` when `transposed`) in `fmt` and registers
    the buffers on `owner`, by default the module that holds it (a table tied under two names goes to its
    embedding module)."""
    tensor = tensor_at(gm, weight).detach()
    packed = quantize_as(tensor.T if transposed else tensor, fmt)
    owner = gm.get_submodule(weight.rpartition(".")[0] if owner is None else owner)
    for name, tensor in stored(packed).items():
        owner.register_buffer(name, tensor)
    return packed


def replace(gm: fx.GraphModule, node: fx.Node, x: fx.Node, bias: fx.Node | None, owner: str,
            packed: Packed | nf4.Packed, k: int, n: int, fmt: Format) -> fx.Node:
    """Replaces the projection `node` (input `x` with `k` features, `n` outputs, `bias`) by one quantized matmul
    over `owner`'s buffers."""
    with gm.graph.inserting_before(node):
        reads = _read_buffers(gm, owner, packed, fmt)
        if fmt.dtype == "nf4":
            statistics = nf4.STATISTICS_BLOCK if fmt.double_quant else 0
            new = gm.graph.call_function(nf4.OP, (x, *reads, bias, k, n, fmt.block_size, statistics))
        else:
            new = gm.graph.call_function(OP, (x, *reads, bias, k, n, fmt.bits, fmt.block_size))
    return _substitute(gm, node, new, reads)


def replace_lookup(gm: fx.GraphModule, node: fx.Node, owner: str, packed: Packed, k: int, fmt: Format) -> fx.Node:
    """Replaces the lookup `aten.embedding(table, ids, ...)` of a `k`-wide table by one quantized lookup over
    `owner`'s buffers (the padding index and sparse flag only shape the table's gradient, and the packed table has
    none)."""
    with gm.graph.inserting_before(node):
        qweight, scales, qzeros = _read_buffers(gm, owner, packed, fmt)
        new = gm.graph.call_function(GATHER, (qweight, node.args[1], scales, qzeros, k, fmt.bits, fmt.block_size))
    return _substitute(gm, node, new, [qweight, scales, qzeros])


def _read_buffers(gm: fx.GraphModule, owner: str, packed: Packed | nf4.Packed, fmt: Format) -> list[fx.Node | None]:
    """Reads of `owner`'s packed buffers in the order a quantized node takes them (None for an absent one)."""
    present = stored(packed)
    return [gm.graph.get_attr(f"{owner}.{name}") if name in present else None for name in fmt.tensors]


def _substitute(gm: fx.GraphModule, node: fx.Node, new: fx.Node, reads: list[fx.Node | None]) -> fx.Node:
    """`new` (and the buffer reads it takes) in place of `node`, with its source metadata and value."""
    for made in [*filter(None, reads), new]:
        copy_meta(node, made)
    if "val" in node.meta:
        new.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def fill(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> None:
    """Quantizes a float `[N, K]` weight into the buffers the quantized `node` reads, in the node's format: how a
    graph quantized on the meta device receives its weights one at a time."""
    packed = stored(quantize_as(weight, format_of(node)))
    for name, read in _reads(node).items():
        if read is not None:
            owner, _, attr = read.target.rpartition(".")
            gm.get_submodule(owner).register_buffer(attr, packed[name])


def unpack(gm: fx.GraphModule, node: fx.Node) -> str:
    """The inverse of `pack` and `call` on one node: `linear(x, <owner>.weight, bias)` over the dequantized weight
    (registered once), the buffers removed once no node reads them. Returns the weight's name."""
    x, qweight, bias, fmt = node.args[0], node.args[1], _bias(node), format_of(node)
    owner = qweight.target.rpartition(".")[0]
    weight = f"{owner}.weight"
    module = gm.get_submodule(owner)
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        module.register_parameter("weight", torch.nn.Parameter(dequantized_weight(gm, node), requires_grad=False))
    with gm.graph.inserting_before(node):
        read = gm.graph.get_attr(weight)
        linear = gm.graph.call_function(torch.ops.aten.linear.default, (x, read, bias))
    for made in (read, linear):
        copy_meta(node, made)
    if "val" in node.meta:
        linear.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    if not any(is_quantized(user) or is_quantized_lookup(user)
               for read in gm.graph.find_nodes(op="get_attr") if read.target == qweight.target
               for user in read.users):
        for name in fmt.tensors:
            if isinstance(getattr(module, name, None), torch.Tensor):
                remove_tensor(gm, f"{owner}.{name}")
    return weight


def reads_a_table(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a quantized projection's packed weights are a quantized lookup's table too (a tied LM head)."""
    return any(is_quantized_lookup(user) for read in gm.graph.find_nodes(op="get_attr")
               if read.target == node.args[1].target for user in read.users)


def packed_buffers(module: torch.nn.Module) -> list[str]:
    """The names of the packed weights under `module` (every format's buffers, the scalar ones aside): what a
    sharded model splits across ranks as frozen parameters, since FSDP shards parameters and copies buffers."""
    names = set(TENSORS) | set(nf4.TENSORS)
    return [name for name, tensor in module.named_buffers() if name.rpartition(".")[2] in names and tensor.dim()]


def is_quantized_module(gm: fx.GraphModule, path: str) -> bool:
    """Whether the module at `path` holds packed weights (`pack` registered them)."""
    try:
        return isinstance(getattr(gm.get_submodule(path), TENSORS[0], None), torch.Tensor)
    except AttributeError:
        return False


def dequantized_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The `[N, K]` weight a quantized node multiplies by."""
    fmt, k, n = format_of(node), *features(node)
    tensors = {name: None if read is None else tensor_at(gm, read.target) for name, read in _reads(node).items()}
    packed = (nf4.Packed if fmt.dtype == "nf4" else Packed)(**tensors)
    return restore(packed, fmt, k, n)


def dequantized_table(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The `[vocab, hidden]` table a quantized lookup reads rows of."""
    reads = _reads(node)
    qzeros = reads["qzeros"]
    return dequantize(tensor_at(gm, reads["qweight"].target), tensor_at(gm, reads["scales"].target),
                      None if qzeros is None else tensor_at(gm, qzeros.target), node.args[4], node.args[5])


def features(node: fx.Node) -> tuple[int, int]:
    """A quantized node's input and output features."""
    at = 2 + len(format_of(node).tensors)
    return node.args[at], node.args[at + 1]


class WeightQuantizer(Protocol):
    """A pass that stores projections in these formats; the engine finds it by these options, naming no pass."""

    dtype: str | None
    block_size: int | None
    symmetric: bool
    double_quant: bool
    embeddings: bool


def weight_quantizer(spec: str | dict[str, Any] | Pass) -> Pass:
    """The registered weight-quantizing pass for `spec`: a dtype (`"int4"`, `"int8"`, `"nf4"`) or the pass's options
    (`{"dtype": "nf4", "block_size": 128}`); a pass is used as given."""
    if isinstance(spec, Pass):
        return spec
    found = [cls for cls in registered() if implements(cls, WeightQuantizer)]
    if not found:
        raise RewriteError("no installed pass quantizes weights; install rewrite with its built-in passes")
    return create(found[0].name, **({"dtype": spec} if isinstance(spec, str) else spec))
