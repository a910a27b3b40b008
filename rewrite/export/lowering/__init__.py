"""Export-time lowering of a model exported with a KV cache onto ONNX Runtime's fused operators.

`torch.onnx.export` writes a decoder layer as some 80 small ops (the norms' arithmetic, rotary, the cache
Concats, repeated KV heads, a NaN guard); ONNX Runtime pays a kernel launch for each on every decoding step.
`lower` rewrites the written file with ONNX rewrite rules, each a pattern, a check and a replacement: the norms
(`norms`), GELU (`activations`), the attention (`attention`) and the projections that read one input (`packing`);
then the LM head learns to run on each row's last token only when asked (`logits`). Attention is lowered in every
layer or in none (onnxscript's intermediate attention op, which the rule consumes, cannot be turned back into ONNX
ops): where the rule cannot lower a layer, the attention stays as exported, the norms are still fused, and the
report says why. The file is checked (`onnx.checker`) before, since it does not know ONNX Runtime's ops, and the
export verifies it against torch after, as it verifies any export.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize
from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

from rewrite.export.lowering.activations import fuse_activations
from rewrite.export.lowering.attention import ATTENTION, MASK, PAST, Attention, attention_rules, sort_sum_dims
from rewrite.export.lowering.logits import keep_last_only
from rewrite.export.lowering.norms import fuse_norms
from rewrite.export.lowering.packing import pack_qkv, pack_siblings
from rewrite.runtime.cache import CacheLayout
from rewrite.runtime.schema import CACHE_KEY, POSITIONS_KEY

UNMATCHED = ("its attention does not have the form the rule lowers (a decoder attention over the cache input with one "
             "mask for every head: a per-head position bias such as ALiBi is not)")
PREFIXED = "its cache holds a constant prefix (virtual tokens), which GroupQueryAttention cannot hold at batch > 1"
WITH_OTHERS = "attention is lowered in every layer or in none, and another layer's could not be"


@dataclass
class LoweringReport:
    """Op counts before and after, what each rule made, and each layer's attention: None when lowered, else why not."""

    ops_before: dict[str, int]
    ops_after: dict[str, int]
    fused: dict[str, int]
    layers: dict[int, str | None]
    removed_inputs: list[str] = field(default_factory=list)
    last_only: bool = False  # the head can run on each row's last token only (`LAST_ONLY`)

    def summary(self) -> list[str]:
        """Lines for the export summary."""
        lowered = sum(reason is None for reason in self.layers.values())
        made = ", ".join(f"{count} {name}" for name, count in self.fused.items() if count)
        lines = [f"fused ops: {sum(self.ops_before.values())} nodes -> {sum(self.ops_after.values())} "
                 f"({made or 'no fusion'}); attention lowered in {lowered} of {len(self.layers)} layers"]
        lines += [f"layer {layer} attention not lowered: {reason}" for layer, reason in self.layers.items() if reason]
        if not self.last_only:
            lines.append("the LM head computes every position in a prefill: no head of the form the rule knows")
        return lines


def _ops(graph: ir.Graph) -> dict[str, int]:
    """Node count per op (`domain:` in front of a custom domain's ops)."""
    return dict(collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in graph))


def _layers(graph: ir.Graph) -> list[int]:
    return sorted({int(m.group(1)) for m in (PAST.fullmatch(v.name or "") for v in graph.inputs) if m})


def _lowered(graph: ir.Graph) -> set[int]:
    """Layers whose present key is a GroupQueryAttention output."""
    found = set()
    for node in graph:
        if node.op_type == ATTENTION and node.domain == "com.microsoft":
            match = PAST.fullmatch(node.inputs[3].name or "")
            found |= {int(match.group(1))} if match else set()
    return found


def _lower_attention(model: ir.Model, config, layout: CacheLayout, positions: int | None) -> dict[int, str | None]:
    """Every layer's attention the rule can lower; each layer's outcome (the model is left with intermediate ops
    unless every layer was lowered)."""
    graph = model.graph
    layers = _layers(graph)
    mask = next((v for v in graph.inputs if v.name == MASK), None)
    if layout.prefix or mask is None:
        reason = PREFIXED if layout.prefix else "the model has no attention_mask input"
        return dict.fromkeys(layers, reason)
    sort_sum_dims(graph)
    fuse_rotary_embedding(model)
    fuse_sdpa(model, apply_shape_inference=True)
    context = Attention(config, positions, mask, graph)
    attention_rules(context).apply_to_model(model)
    lowered = _lowered(graph)
    return {layer: None if layer in lowered else context.refused.get(layer, UNMATCHED) for layer in layers}


def _drop_unused_inputs(graph: ir.Graph, names: tuple[str, ...]) -> list[str]:
    """Inputs among `names` that nothing reads any more (ONNX Runtime requires every input to be fed)."""
    unused = [v for v in graph.inputs if v.name in names and not v.uses()]
    for value in unused:
        graph.inputs.remove(value)
    return [v.name for v in unused]


def _save(model: ir.Model, path: Path, external: bool) -> None:
    """Replaces `path` (and its external data): written beside it first, since the weights are read from the old
    file while the new one is written."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        ir.save(model, staged, external_data=f"{path.name}.data" if external else None)
        for written in Path(tmp).iterdir():
            os.replace(written, path.parent / written.name)


def _with_norms(model: ir.Model) -> dict[str, int]:
    """Optimizes `model` and fuses its norms and activations; what was fused."""
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    return fuse_norms(model) | fuse_activations(model)


def lower(path: str | Path, config, *, external: bool = False) -> LoweringReport:
    """Rewrites the cached export at `path` onto ONNX Runtime's fused ops (weights as external data when
    `external`), its cache layout's metadata updated; the report of what was lowered."""
    path = Path(path)
    model = ir.load(path)
    props = dict(model.metadata_props)
    layout = CacheLayout(**json.loads(props[CACHE_KEY]))
    positions = int(props[POSITIONS_KEY]) if props.get(POSITIONS_KEY) else getattr(config, "max_position_embeddings", None)
    before = _ops(model.graph)
    fused = _with_norms(model)
    layers = _lower_attention(model, config, layout, positions)
    if any(layers.values()):
        model = ir.load(path)
        fused = _with_norms(model)
        layers = {layer: reason or WITH_OTHERS for layer, reason in layers.items()}
    fused[ATTENTION] = sum(reason is None for reason in layers.values())
    fused["packed QKV"] = pack_qkv(model)
    common_passes.RemoveUnusedNodesPass()(model)  # the projections packed QKV replaced, which are no siblings
    fused["packed projections"] = pack_siblings(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    optimize(model)  # inlines the intermediate fusions no rule consumed and removes the dead mask and rotary builders
    common_passes.RemoveUnusedFunctionsPass()(model)
    removed = _drop_unused_inputs(model.graph, ("position_ids",))
    last_only = keep_last_only(model)  # after the optimizer, which would take its default for a constant
    if fused[ATTENTION]:  # GroupQueryAttention reads each row's length from the mask (rows padded on the right)
        # and appends to a past that is its present in place
        layout = dataclasses.replace(layout, position_ids=layout.position_ids and not removed, padding="right",
                                     in_place=True)
        model.metadata_props[CACHE_KEY] = json.dumps(dataclasses.asdict(layout))
    _save(model, path, external)
    return LoweringReport(before, _ops(model.graph), fused, layers, removed, last_only)
