"""ONNX export with named inputs/outputs, dynamic batch and sequence axes, and ONNX Runtime verification."""
from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import onnx
import torch
from torch import fx
from torch.utils import _pytree as pytree

from rewrite.export import genai, kv_cache
from rewrite.export.lowering import LoweringReport, lower
from rewrite.export.quantized import check_accuracy_level, set_accuracy_level, translations

from rewrite import runtime
from rewrite.errors import RewriteError
from rewrite.atomic import atomic_dir_files
from rewrite.graph.synthetic_inputs import DEFAULT_INPUT_NAMES, example_inputs
from rewrite.graph.ir import copy_meta, info, tensor_at
from rewrite.graph.nodes import drop_dtype_checks
from rewrite.graph import nf4, quantized
from rewrite.graph.quantized import is_quantized
from rewrite.graph.params import non_finite
from rewrite.graph.pipeline import Pass, Pipeline, capable
from rewrite.quiet import quiet
from rewrite.graph.weight_shapes import check_weight_shapes
from rewrite.adapters.slots import DEFAULT_MAX_RANK
from rewrite.export.onnx_adapters import SlotExport
from rewrite.graph.signature import Compare, Signature, vocab_size
from rewrite.runtime.schema import base_metadata

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3
TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2  # fp16 carries 11 bits: torch and ONNX Runtime round its products and sums differently
QUANTIZE = ("int4", "int8")
DTYPES = ("fp32", "fp16")
MIN_OPSET = 18  # the dynamo exporter's lowest


@dataclass
class ExportReport:
    path: Path
    input_names: list[str]
    output_names: list[str]
    max_abs_diff: float | None
    tolerance: float | None
    provider: str | None
    adapter_inputs: list[str] = field(default_factory=list)  # the adapter slots' inputs (and `adapter_index`)
    lowering: LoweringReport | None = None  # what a cached export's fused ops replaced (None: not lowered)
    genai_config: Path | None = None  # ONNX Runtime GenAI's config, written beside a cached export


def _output_names(outputs) -> list[str]:
    """`logits` for model outputs and dicts; `output_0`... for tuples."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names = []
    for index, (path, _) in enumerate(leaves):
        keys = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path if not hasattr(k, "idx")]
        names.append("_".join(keys) if keys else f"output_{index}")
    return names


def _flat(outputs) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def real_positions(reference: torch.Tensor, actual: torch.Tensor, inputs: dict[str, torch.Tensor]):
    """Per-token outputs at padded positions are undefined (fully masked attention rows): compare the rest."""
    mask = inputs.get("attention_mask")
    if mask is not None and reference.dim() >= 2 and tuple(reference.shape[:2]) == tuple(mask.shape):
        keep = mask.bool()
        return reference[keep], actual[keep]
    return reference, actual


def compare(name: str, reference: torch.Tensor, actual: torch.Tensor,
            relative: float | None = None) -> tuple[float, float]:
    """Max abs difference of an output and its tolerance (`relative`, default 1e-4, of its scale); raises beyond it."""
    relative = TOLERANCE if relative is None else relative
    reference, actual = reference.float(), actual.float()
    scale = max(1.0, reference.abs().max().item())
    diff, tolerance = (actual - reference).abs().max().item(), relative * scale
    if not diff <= tolerance:
        raise RewriteError(
            f"ONNX verification failed for output {name!r}: ONNX Runtime differs from torch by {diff:.3g} "
            f"(allowed {tolerance:.3g}, {relative:g} of the output scale); the model was not written"
        )
    return diff, tolerance


def compare_fp16(name: str, reference: torch.Tensor, actual: torch.Tensor) -> tuple[float, float]:
    return compare(name, reference, actual, FP16_TOLERANCE)


def _quantizer(gm: fx.GraphModule, quantize: str | None, block_size: int | None, symmetric: bool,
               embeddings: bool = False) -> Pass | None:
    """The quantize pass post-training quantization runs, created (its options checked) before any work."""
    if quantize is not None and any(map(is_quantized, gm.graph.nodes)):
        raise RewriteError("the graph is already quantized, so export cannot quantize it again; export it without "
                           "quantize, or quantize its float graph once")
    if quantize is None:
        if block_size is not None or symmetric or embeddings:
            raise RewriteError("a block size, symmetric and quantized embeddings apply to post-training "
                               "quantization; add quantize int4 or int8, or leave them out")
        return None
    if quantize not in QUANTIZE:
        raise RewriteError(f"export quantize {quantize!r} is not supported; use {' or '.join(QUANTIZE)} "
                           "(MatMulNBits' weight formats)")
    return quantized.weight_quantizer({"dtype": quantize, "symmetric": symmetric, "embeddings": embeddings,
                                       **({} if block_size is None else {"block_size": block_size})})


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise RewriteError(f"export dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")


_FP16_INPUTS = {torch.ops.aten.linear.default: (0,), torch.ops.aten.addmm.default: (1,), quantized.OP: (0,), nf4.OP: (0,),
                torch.ops.aten.scaled_dot_product_attention.default: (0, 1, 2), torch.ops.aten.layer_norm.default: (0,),
                torch.ops.aten.baddbmm.default: (0, 1, 2), torch.ops.aten.bmm.default: (0, 1)}  # BLOOM's alibi attention


def _to_half(gm: fx.GraphModule) -> None:
    """fp16 for GPU execution providers: the weights (and MatMulNBits' scales, whose type is its input's; NF4's
    absmax stays fp32, as bitsandbytes keeps it, and MatMulBnb4 gets it cast) in fp16
    and the inputs of every projection, attention and layer norm (whose weights are fp16) cast to fp16, so the
    products are fp16; what the capture casts to fp32 itself (RMS norm statistics, rotary angles from fp32 buffers,
    GPT-2's residual stream: the fp32 capture cannot tell an upcast from a cast to the model's dtype) stays fp32
    and is cast back at the next of those."""
    scales = {node.args[2].target for node in gm.graph.find_nodes(op="call_function", target=quantized.OP)}
    with torch.no_grad():
        for _, parameter in gm.named_parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.half()
        for name in scales:
            owner, _, attr = name.rpartition(".")
            gm.get_submodule(owner).register_buffer(attr, tensor_at(gm, name).half())
    drop_dtype_checks(gm.graph, torch.float32)
    for node in list(gm.graph.nodes):
        for index in _FP16_INPUTS.get(node.target, ()):
            with gm.graph.inserting_before(node):
                cast = gm.graph.call_function(torch.ops.aten.to.dtype, (node.args[index], torch.float16))
            copy_meta(node, cast)
            node.update_arg(index, cast)
    gm.graph.lint()
    gm.recompile()


def _converted(gm: fx.GraphModule, dtype: str, quantizer: Pass | None) -> fx.GraphModule:
    """The graph to export: `gm` itself, or a copy in fp16 and/or quantized post-training (the pass recorded in the
    copy's history, which a cache export replays); fp16 first, so the quantizer rounds with fp16 scales, as ONNX
    Runtime's does for an fp16 model."""
    if dtype == "fp32" and quantizer is None:
        return gm
    gm = copy.deepcopy(gm)
    if dtype == "fp16":
        _to_half(gm)
    if quantizer is not None:
        Pipeline([quantizer]).run(gm)
    return gm


def _verify(gm: fx.GraphModule, model_path: Path, input_names: list[str], output_names: list[str],
            slots: SlotExport | None, compare: Compare) -> tuple[float, float, str]:
    """Runs fresh inputs of another shape through ONNX Runtime and torch; raises beyond tolerance.
    A slotted model is fed the graph's own adapter through its slots."""
    inputs = example_inputs(input_names, vocab_size(gm), batch=3, seq=11, seed=1, pad=True)
    with torch.no_grad():
        expected = _flat(gm(**inputs))
    sess = runtime.session(model_path)
    got = runtime.run(sess, inputs | (slots.verify_feeds(batch=3) if slots else {}))
    worst, tolerance = 0.0, 0.0
    for name, reference in zip(output_names, expected):
        diff, tolerance = compare(name, *real_positions(reference, torch.from_numpy(got[name]), inputs))
        worst = max(worst, diff)
    return worst, tolerance, sess.get_providers()[0]


def _plain_signature(gm: fx.GraphModule, slot_options: dict | None) -> Signature:
    """The graph as it is (with its adapter slots as extra inputs when exported with them)."""
    slots = SlotExport(gm, **slot_options) if slot_options is not None else None
    input_names = list(info(gm).input_names or DEFAULT_INPUT_NAMES)
    inputs = example_inputs(input_names, vocab_size(gm), batch=2, seq=8)
    with torch.no_grad():
        output_names = _output_names(gm(**inputs))
    dynamic = {name: {0: "batch", 1: "sequence"} for name in input_names}
    if slots:
        inputs, dynamic = inputs | slots.example_inputs(batch=2), dynamic | slots.dynamic_shapes()
    return Signature(slots.graph if slots else gm, inputs, dynamic, input_names, output_names, {},
                     lambda path, compare: _verify(gm, path, input_names, output_names, slots, compare), slots=slots)


class ServingMetadata(Protocol):
    """A pass that tells serving something about the exported model."""

    @classmethod
    def serving_metadata(cls, gm: fx.GraphModule, runs: Sequence[Any]) -> dict[str, str]:
        """ONNX metadata a caller needs to feed the exported model (keys `rewrite.*`)."""


def serving_metadata(gm: fx.GraphModule) -> dict[str, str]:
    """What a caller needs to feed the model and read its outputs (`rewrite run` uses it): the task, label
    names, how many positions the outputs hold before the input's own, and what each pass adds."""
    graph_info = info(gm)
    labels = getattr(graph_info.config, "id2label", None) or {}
    props = base_metadata(graph_info.task or "", labels, graph_info.prepended_positions, graph_info.position_limit,
                          list(graph_info.untrained))
    for cls, runs in capable(gm, ServingMetadata):
        props.update(cls.serving_metadata(gm, runs))
    return props


def _add_metadata(gm: fx.GraphModule, path: Path, extra: dict[str, str]) -> None:
    """The serving metadata travels inside the model (with what the export's signature adds)."""
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {**serving_metadata(gm), **extra})
    onnx.save(model, str(path))


def _set_level(path: Path, level: int) -> None:
    model = onnx.load(str(path), load_external_data=False)
    if set_accuracy_level(model, level):
        onnx.save(model, str(path))


def _check_opset(opset: int | None) -> None:
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not (isinstance(opset, int) and MIN_OPSET <= opset <= newest):
        raise RewriteError(f"ONNX opset {opset!r} cannot be exported; torch's exporter writes opsets {MIN_OPSET} to {newest}")


def _check_written_opset(path: Path, opset: int | None) -> None:
    """The exporter may silently write another opset than asked for: refuse rather than mislabel."""
    model = onnx.load(str(path), load_external_data=False)
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        raise RewriteError(f"the exporter wrote ONNX opset {written}, not the requested {opset}; "
                           "leave --opset out or choose that one")


def _refuse_clashes(gm: fx.GraphModule, path: Path, cache: bool) -> None:
    """Before any work: the model, tokenizer and GenAI config files this export writes must not replace files
    already there."""
    names = {path.name} | ({genai.CONFIG} if cache else set())
    tokenizer = info(gm).tokenizer
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            names |= {p.name for p in tokenizer.save_pretrained(tmp) and Path(tmp).iterdir()}
    clashes = sorted(name for name in names if (path.parent / name).exists())
    if clashes:
        raise RewriteError(f"{str(path.parent)!r} already holds {', '.join(clashes)}, which this export would replace; "
                           "pass --overwrite to replace them, or export elsewhere")


def _write_genai(gm: fx.GraphModule, path: Path, inputs: list[str]) -> str | None:
    """ONNX Runtime GenAI's config beside a cached export whose inputs are `inputs` (`rewrite.export.genai`); its
    file name, or None (and a warning that says why) where GenAI could not run the model."""
    graph_info = info(gm)
    length = genai.context_length(graph_info.position_limit, graph_info.tokenizer)
    reason = genai.refusal(path, length)
    if reason:
        log.warning("no %s written: %s", genai.CONFIG, reason)
        return None
    return genai.write(path, graph_info.config, length, vocab_size(gm), inputs).name


@quiet
def export_onnx(gm: fx.GraphModule, path: str | Path, *, verify: bool = True, opset: int | None = None,
                adapter_slots: bool = False, mixed_adapters: bool = False, max_rank: int = DEFAULT_MAX_RANK,
                cache: bool = False, overwrite: bool = True, accuracy_level: int = 0, quantize: str | None = None,
                block_size: int | None = None, symmetric: bool = False, quantize_embeddings: bool = False,
                dtype: str = "fp32", fuse: bool = True) -> ExportReport:
    """Exports `gm` (in eval mode) to ONNX, checks it, and verifies it against torch in ONNX Runtime.

    Inputs keep the graph's names (`input_ids`, `attention_mask`, ...), outputs are named from the
    model output (`logits`); batch and sequence axes are dynamic. Models over 2 GB use external data.
    The tokenizer is written beside the model (as Optimum does), the task and labels into its metadata.
    `adapter_slots` keeps the adapter unfolded as named inputs that default to no adapter (see
    `rewrite.export.onnx_adapters`); `mixed_adapters` stacks them and adds a per-row `adapter_index` input.
    With `cache=True` a causal LM is exported for generation: past keys and values in, presents out
    (see `rewrite.export.kv_cache`), with the slots too when asked for. Quantized projections become ONNX
    Runtime's MatMulNBits (`rewrite.export.quantized`), verified at accuracy level 0 and written with
    `accuracy_level`. `quantize` (`int4`, `int8`; `block_size`, `symmetric`, `quantize_embeddings`) quantizes a
    float graph's projections (and its word embeddings) post-training, as the quantize pass would, on a copy: the
    graph passed in is untouched, and the export is verified against the quantized copy. `dtype="fp16"` (for GPU
    execution providers) converts a copy as `_to_half` says, verified within 1e-2 of the output scale; the logits
    stay fp16, as ONNX Runtime GenAI's fp16 models give them. With the cache, the model is recaptured in fp16
    (Hugging Face's own fp16 code decides what stays fp32), so the past and present tensors are fp16 too.
    With the cache and `fuse` (the default), the checked file is lowered onto ONNX Runtime's fused ops
    (`rewrite.export.lowering`) before it is verified; `fuse=False` keeps the exporter's ops, for debugging.
    A cached export also writes ONNX Runtime GenAI's `genai_config.json` beside it (`rewrite.export.genai`).
    """
    path = Path(path)
    _check_opset(opset)
    check_accuracy_level(accuracy_level)
    quantizer = _quantizer(gm, quantize, block_size, symmetric, quantize_embeddings)
    _check_dtype(dtype)
    if not fuse and not cache:
        raise RewriteError("fuse=False (--no-fuse) keeps a KV-cache export's ops unfused and does nothing without "
                           "the cache; export with cache=True (--with-cache), or leave it out")
    if accuracy_level and quantizer is None and not any(map(is_quantized, gm.graph.nodes)):
        raise RewriteError(f"accuracy level {accuracy_level} applies to MatMulNBits, and this graph has no quantized "
                           "projection; apply quantize first, export with quantize int4 or int8, or leave the accuracy level out")
    if any(p.device.type == "meta" for p in gm.parameters()):
        raise RewriteError("the graph was captured on the meta device (no weights); capture it with weights to export")
    bad = non_finite(gm.named_parameters())
    if bad:
        raise RewriteError(f"weight {bad} holds NaN or infinite values, so the exported model would compute NaN; "
                           "export a graph with finite weights")
    if not overwrite:
        _refuse_clashes(gm, path, cache)
    was_training, source = gm.training, gm
    gm.eval()
    try:
        check_weight_shapes(gm)
        slot_options = dict(mixed=mixed_adapters, max_rank=max_rank) if adapter_slots or mixed_adapters else None
        gm = _converted(source, dtype, quantizer)
        if gm is not source and slot_options is not None:
            slot_options["base"] = source
        signature = (kv_cache.signature if cache else _plain_signature)(gm, slot_options)
        program = torch.onnx.export(
            signature.module, (), kwargs=signature.inputs, dynamic_shapes=signature.dynamic,
            input_names=signature.onnx_input_names, output_names=signature.output_names,
            dynamo=True, opset_version=opset, verbose=False, custom_translation_table=translations(),
        )
        large = sum(t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()]) > PROTOBUF_LIMIT
        with atomic_dir_files(path.parent, overwrite=overwrite) as tmp:
            staged = tmp / path.name
            program.save(staged, external_data=large)
            del program
            _check_written_opset(staged, opset)
            _add_metadata(gm, staged, signature.metadata)
            if signature.slots:
                signature.slots.finish(staged)
            onnx.checker.check_model(str(staged))
            lowering = lower(staged, info(gm).config, external=large) if cache and fuse else None
            tokenizer = info(gm).tokenizer
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            inputs = [n for n in signature.input_names if n not in (lowering.removed_inputs if lowering else [])]
            written = _write_genai(gm, staged, inputs) if cache else None
            diff = tolerance = provider = None
            if verify:
                diff, tolerance, provider = signature.verify(staged, compare_fp16 if dtype == "fp16" else compare)
                log.debug("ONNX Runtime (%s) matches torch: max abs diff %.3g", provider, diff)
            if accuracy_level:
                _set_level(staged, accuracy_level)
    finally:
        source.train(was_training)
    return ExportReport(path, inputs, signature.output_names, diff,
                        tolerance, provider, signature.slots.onnx_input_names() if signature.slots else [], lowering,
                        path.parent / written if written else None)
