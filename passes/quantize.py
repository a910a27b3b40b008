"""Weight-only quantization of the frozen base: int4 or int8, block-wise along each projection's input, exactly as
ONNX Runtime's `MatMulNBits` stores and computes it (`rewrite.graph.quantized`).

Each targeted projection (`nn.Linear`, GPT-2's Conv1D `[in, out]`, quantized as `W.T`) keeps its packed weights,
scales and zero points as frozen buffers, `<module>.qweight` / `.scales` / `.qzeros`, in place of its float weight,
and calls `rewrite::matmul_nbits`: the graph computes with the dequantized weights ONNX Runtime serves, trains
(adapter branches added before or after stay float, on the projection's input), saves as data and exports as
one MatMulNBits per projection. The default targets every projection but the output heads (the LM head, a
classifier); embeddings are lookups, never quantized. `bits_pattern` and `block_pattern` override per module,
as LoRA's `rank_pattern` does. Folding an adapter into the quantized weights is lossy, so fold refuses it
unless asked to requantize.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapters.targets import Targeting, check_regex, pattern_value, short_names
from rewrite.errors import RewriteError
from rewrite.graph import quantized
from rewrite.graph.ir import remove_tensor, tensor_at
from rewrite.graph.pipeline import Pass, option, register
from rewrite.graph.query import GraphQuery, Projection


def _check(bits, block_size, where: str) -> None:
    if bits not in quantized.BITS or isinstance(bits, bool):
        raise RewriteError(f"quantize bits {bits!r}{where} is not supported; use 4 or 8")
    if block_size not in quantized.BLOCK_SIZES or isinstance(block_size, bool):
        raise RewriteError(f"quantize block size {block_size!r}{where} is not supported; use a power of two from "
                           f"16 to 256 ({', '.join(map(str, quantized.BLOCK_SIZES))}), what ONNX Runtime runs")


@register
@dataclass
class QuantizePass(Targeting, Pass):
    """Int4/int8 weights as ONNX Runtime's MatMulNBits holds them, on every projection but the output heads."""

    name = "quantize"
    title = "Quantize"
    default_roles: ClassVar[tuple[str, ...]] = ()

    bits: int = option(4, "bits per weight: 4 or 8")
    block_size: int = option(quantized.DEFAULT_BLOCK_SIZE, "weights per scale along the input: 16, 32, 64, 128 "
                                                           "or 256 (a shorter last block is zero-padded)")
    symmetric: bool = option(False, "no zero points (the weight of largest magnitude maps to -2^(bits-1)); default: "
                                    "zero points, ONNX Runtime's quantizer's default and the closer fit")
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
        _check(self.bits, self.block_size, "")
        for key, bits in self.bits_pattern.items():
            _check(bits, self.block_size, f" for {key!r}")
        for key, block in self.block_pattern.items():
            _check(self.bits, block, f" for {key!r}")

    def plan(self, path: str) -> tuple[int, int]:
        return pattern_value(path, self.bits_pattern, self.bits), pattern_value(path, self.block_pattern, self.block_size)

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
            heads = query.head_modules
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
        chosen = self.chosen(GraphQuery(gm))
        weights = {p.weight: p for p in chosen}
        before = sum(tensor_at(gm, name).nbytes for name in weights)
        packed = {name: self.pack(gm, proj) for name, proj in weights.items()}
        for proj in chosen:
            self.replace(gm, proj, packed[proj.weight])
        gm.graph.eliminate_dead_code()
        read = {node.target for node in gm.graph.find_nodes(op="get_attr")}
        for name in weights:
            if name not in read:
                remove_tensor(gm, name)
        gm.recompile()
        after = sum(t.nbytes for p in packed.values() for t in (p.qweight, p.scales, p.qzeros) if t is not None)
        paths = list(dict.fromkeys(p.path for p in chosen))
        self.report = {
            "modules": paths, "bits": {path: self.plan(path)[0] for path in paths},
            "block_size": {path: self.plan(path)[1] for path in paths}, "symmetric": self.symmetric,
            "summary": f"int{self.bits} weights (block {self.block_size}, "
                       f"{'symmetric' if self.symmetric else 'zero points'}) on {len(paths)} modules "
                       f"({short_names(chosen)}): {before / 2**20:.2f} MiB of weights stored in {after / 2**20:.2f} MiB",
        }
        return PassResult(gm, True)

    def pack(self, gm: fx.GraphModule, proj: Projection) -> quantized.Packed:
        return quantized.pack(gm, proj.weight, proj.transposed, *self.plan(proj.path), self.symmetric)

    def replace(self, gm: fx.GraphModule, proj: Projection, packed: quantized.Packed) -> None:
        quantized.call(gm, proj.node, proj.input, quantized.projection_bias(proj.node), proj.weight.rpartition(".")[0], packed,
                       proj.in_features, *self.plan(proj.path))
