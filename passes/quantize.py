"""Weight-only quantization of the frozen base: int4 or int8, block-wise along each projection's input, exactly as
ONNX Runtime's `MatMulNBits` stores and computes it (`rewrite.graph.quantized`), or NF4, QLoRA's format, exactly as
bitsandbytes stores and computes it (`rewrite.graph.nf4`; `dtype="nf4"`, double quantization by default).

Each targeted projection (`nn.Linear`, GPT-2's Conv1D `[in, out]`, quantized as `W.T`) keeps its packed weights,
scales and zero points as frozen buffers, `<module>.qweight` / `.scales` / `.qzeros`, in place of its float weight,
and calls `rewrite::matmul_nbits`: the graph computes with the dequantized weights ONNX Runtime serves, trains
(adapter branches added before or after stay float, on the projection's input), saves as data and exports as
one MatMulNBits per projection. The default targets every projection but the output heads (the LM head, a
classifier). `embeddings` stores the word-embedding table too (int4/int8), looked up by `rewrite::gather_nbits`
and exported as one GatherBlockQuantized, which reads MatMulNBits' packing as is: a LM head tied to the table and
quantized with it multiplies by the same buffers, one packed copy of the matrix. `bits_pattern` and
`block_pattern` override per module, as LoRA's `rank_pattern` does. Folding an adapter into the quantized weights
is lossy, so fold refuses it unless asked to requantize.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapters import branches
from rewrite.adapters.targets import Targeting, check_regex, pattern_value, short_names
from rewrite.errors import RewriteError
from rewrite.graph import nf4, quantized
from rewrite.graph.ir import remove_tensor, tensor_at
from rewrite.graph.params import saved_heads
from rewrite.graph.pipeline import Pass, option, register
from rewrite.graph.query import GraphQuery, Projection, later_first, module_path, word_embedding


def _check_bits(bits, where: str) -> None:
    if bits not in quantized.BITS or isinstance(bits, bool):
        raise RewriteError(f"quantize bits {bits!r}{where} is not supported; use 4 or 8")


def _check(bits, block_size, where: str, dtype: str = "int") -> None:
    if dtype == "nf4":
        if block_size not in nf4.BLOCK_SIZES or isinstance(block_size, bool):
            raise RewriteError(f"quantize block size {block_size!r}{where} is not supported for nf4; use a power of two "
                               f"from 32 to 4096 ({', '.join(map(str, nf4.BLOCK_SIZES))}), what bitsandbytes accepts")
        return
    _check_bits(bits, where)
    if block_size not in quantized.BLOCK_SIZES or isinstance(block_size, bool):
        raise RewriteError(f"quantize block size {block_size!r}{where} is not supported; use a power of two from "
                           f"16 to 256 ({', '.join(map(str, quantized.BLOCK_SIZES))}), what ONNX Runtime runs")


@register
@dataclass
class QuantizePass(Targeting, Pass):
    """Int4/int8 weights as ONNX Runtime's MatMulNBits holds them, or NF4 as bitsandbytes does, on every projection
    but the output heads."""

    name = "quantize"
    title = "Quantize"
    default_roles: ClassVar[tuple[str, ...]] = ()

    dtype: str | None = option(None, "int4, int8 or nf4 (QLoRA's 4-bit NormalFloat, bitsandbytes' layout); default: "
                                     "int<bits>")
    bits: int = option(4, "bits per weight when dtype is left out: 4 or 8")
    block_size: int | None = option(None, "weights per scale: int4/int8 along the input, 16, 32, 64, 128 or 256 "
                                          "(default 32; a shorter last block is zero-padded); nf4 over the flattened "
                                          "weight, 32 to 4096 (default 64)")
    double_quant: bool = option(True, "nf4: quantize the block absmaxes too (8-bit, blocks of 256), as QLoRA does")
    symmetric: bool = option(False, "no zero points (the weight of largest magnitude maps to -2^(bits-1)); default: "
                                    "zero points, ONNX Runtime's quantizer's default and the closer fit")
    embeddings: bool = option(False, "int4/int8: store the word-embedding table too, as ONNX Runtime's "
                                     "GatherBlockQuantized reads it (a LM head tied to it and quantized shares it)")
    bits_pattern: dict[str, int] = option({}, "per-module bits, JSON {name or regex: bits}")
    block_pattern: dict[str, int] = option({}, "per-module block sizes, JSON {name or regex: block size}")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bits_pattern", "block_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise RewriteError(f"quantize {name} {getattr(self, name)!r} is not a mapping; write JSON like "
                                   '{"down_proj": 8}')
            for spec in getattr(self, name):
                check_regex(spec, self.title)
        if self.dtype is None:
            _check_bits(self.bits, "")
            self.dtype = f"int{self.bits}"
        if self.dtype not in quantized.DTYPES:
            raise RewriteError(f"quantize dtype {self.dtype!r} is not supported; use {', '.join(quantized.DTYPES)}")
        if self.dtype != "nf4":
            self.bits = int(self.dtype[3:])
        elif self.bits_pattern:
            raise RewriteError("quantize bits_pattern applies to int4/int8, and dtype is nf4 (4 bits everywhere); "
                               "drop bits_pattern, or quantize as int4/int8")
        if self.block_size is None:
            self.block_size = nf4.DEFAULT_BLOCK_SIZE if self.dtype == "nf4" else quantized.DEFAULT_BLOCK_SIZE
        _check(self.bits, self.block_size, "", self.dtype)
        if self.embeddings and self.dtype == "nf4":
            raise RewriteError("quantized embeddings are int4/int8 (ONNX Runtime's GatherBlockQuantized has no NF4); "
                               "quantize as int4/int8, or leave embeddings out")
        for key, bits in self.bits_pattern.items():
            _check(bits, self.block_size, f" for {key!r}")
        for key, block in self.block_pattern.items():
            _check(self.bits, block, f" for {key!r}", self.dtype)

    def plan(self, path: str) -> quantized.Format:
        """The format of the module at `path`."""
        block = pattern_value(path, self.block_pattern, self.block_size)
        if self.dtype == "nf4":
            return quantized.Format("nf4", block, double_quant=self.double_quant)
        return quantized.Format(f"int{pattern_value(path, self.bits_pattern, self.bits)}", block, self.symmetric)

    def chosen(self, query: GraphQuery) -> list[Projection]:
        """The selection; by default every projection outside the output heads' modules."""
        default = self.targets is None and self.roles is None
        if default:
            self.targets = "all-linear"
        try:
            chosen = self.select(query)
        finally:
            if default:
                self.targets = None
        if default:
            heads = [*query.head_modules, *saved_heads(query.gm)]
            chosen = [p for p in chosen if not any(p.path == h or p.path.startswith(h + ".") for h in heads)]
        done = [p for p in chosen if p.quantized]
        if done:
            raise RewriteError(f"{done[0].path} is already quantized (the graph holds {len(done)} quantized "
                               "projections); quantize the float graph once, or target modules still in float")
        if not chosen:
            raise RewriteError("quantize finds no projection outside the output heads; name modules with targets")
        return chosen

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        lookup = _word_lookup(gm) if self.embeddings else None
        table = lookup.args[0].target if lookup is not None else None
        chosen = self.chosen(GraphQuery(gm))
        shared = self._shared(gm, chosen, lookup)
        weights = {p.weight: p for p in chosen}
        floats = list(dict.fromkeys([*weights, *(_names_of(gm, table) if table else [])]))
        before = sum({id(t): t.nbytes for t in (tensor_at(gm, name) for name in floats)}.values())
        packed = {name: self.pack(gm, proj) for name, proj in weights.items() if name not in shared}
        if lookup is not None:
            hidden = tensor_at(gm, table).shape[1]
            path = _lookup_path(lookup)
            fmt = self.plan(path)
            packed[table] = quantized.store(gm, table, False, fmt, path)
            quantized.replace_lookup(gm, lookup, path, packed[table], hidden, fmt)
        for proj in later_first(gm, chosen):
            source = shared.get(proj.weight, proj.weight)
            owner = _lookup_path(lookup) if proj.weight in shared else proj.weight.rpartition(".")[0]
            self.replace(gm, proj, owner, packed[source])
        gm.graph.eliminate_dead_code()
        read = {node.target for node in gm.graph.find_nodes(op="get_attr")}
        for name in floats:
            if name not in read:
                remove_tensor(gm, name)
        gm.recompile()
        after = sum(t.nbytes for p in packed.values() for t in quantized.stored(p).values())
        paths = list(dict.fromkeys(p.path for p in chosen))
        self.report = {
            "modules": paths, "embeddings": _lookup_path(lookup) if lookup is not None else None, "dtype": self.dtype,
            "bits": {path: self.plan(path).bits for path in paths},
            "block_size": {path: self.plan(path).block_size for path in paths}, "symmetric": self.symmetric,
            "double_quant": self.double_quant if self.dtype == "nf4" else None,
            "summary": f"{self.dtype} weights (block {self.block_size}, {self._layout()}) on {len(paths)} modules "
                       f"({short_names(chosen)}){' and the word embeddings' if lookup is not None else ''}: "
                       f"{before / 2**20:.2f} MiB of weights stored in {after / 2**20:.2f} MiB",
        }
        return PassResult(gm, True)

    def _layout(self) -> str:
        if self.dtype == "nf4":
            return "double quantization" if self.double_quant else "fp32 absmax"
        return "symmetric" if self.symmetric else "zero points"

    def pack(self, gm: fx.GraphModule, proj: Projection) -> quantized.Packed | nf4.Packed:
        return quantized.store(gm, proj.weight, proj.transposed, self.plan(proj.path))

    def replace(self, gm: fx.GraphModule, proj: Projection, owner: str, packed: quantized.Packed | nf4.Packed) -> None:
        """Replaces `proj` by a quantized matmul over the buffers `owner` holds (a tied head's: the embedding's)."""
        quantized.replace(gm, proj.node, proj.input, quantized.projection_bias(proj.node), owner, packed,
                          proj.in_features, proj.out_features, self.plan(proj.path))

    def _shared(self, gm: fx.GraphModule, chosen: list[Projection], lookup: fx.Node | None) -> dict[str, str]:
        """The chosen heads tied to the quantized word embeddings, `{head weight: table}`: they read its packed
        buffers. A projection tied to a table left float (or stored another way) is refused: quantizing it would
        keep a float and a quantized copy of one matrix."""
        tables = {node.args[0].target: (module_path(node) or node.args[0].target, tensor_at(gm, node.args[0].target))
                  for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default)
                  if node.args[0].op == "get_attr"}
        shared = {}
        for proj in chosen:
            weight = tensor_at(gm, proj.weight)
            tied = next((name for name, (_, table) in tables.items() if name == proj.weight or table is weight), None)
            if tied is None:
                continue
            path = tables[tied][0]
            if lookup is None or tied != lookup.args[0].target:
                raise RewriteError(f"{proj.path} shares its weight with the input embeddings {path} (tied), so "
                                   "quantizing it alone would keep a float and a quantized copy of one matrix; "
                                   f"{'' if self.dtype == 'nf4' else 'quantize the embeddings too (embeddings), '}"
                                   "leave it float (the default targets skip the output heads) or untie it first")
            if proj.transposed or self.plan(proj.path) != self.plan(path):
                raise RewriteError(f"{proj.path} is tied to the embeddings {path} but would be stored "
                                   f"{'along the other axis' if proj.transposed else 'in another format'}, so one "
                                   "packed table cannot serve both; give both the same bits and block size, or leave "
                                   "the head float")
            shared[proj.weight] = tied
        return shared


def _word_lookup(gm: fx.GraphModule) -> fx.Node:
    """The word-embedding lookup to quantize, refused where its table is not the base's own or an adapter reads it."""
    lookup = word_embedding(gm, "quantizing the embeddings needs it")
    path = _lookup_path(lookup)
    if lookup.args[0].op != "get_attr":
        raise RewriteError(f"the word embeddings {path} look rows up in a computed table, not a stored one; quantize "
                           "the embeddings before the pass that made it")
    if any(site.path == path for site in branches.sites(gm)):
        raise RewriteError(f"the word embeddings {path} carry an adapter, whose branch reads their float lookup; "
                           "quantize the embeddings before adding the adapter")
    return lookup


def _names_of(gm: fx.GraphModule, table: str) -> list[str]:
    """Every name the table goes by (a tied head's weight, and an alias the capture kept that nothing reads)."""
    tensor = tensor_at(gm, table)
    return [table, *(name for name, t in gm.named_parameters(remove_duplicate=False) if t is tensor)]


def _lookup_path(lookup: fx.Node) -> str:
    """The embedding module a lookup belongs to (its table's owner when the capture recorded none)."""
    return module_path(lookup) or lookup.args[0].target.rpartition(".")[0]
