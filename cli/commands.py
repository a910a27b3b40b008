"""The graph commands: capture, apply, fold, export and inspect."""
from __future__ import annotations

import click

import rewrite
from rewrite.adapters.slots import DEFAULT_MAX_RANK
from rewrite.errors import RewriteError
from rewrite.atomic import check_output
from rewrite.graph.params import trainable_parameters_line
from rewrite.graph.pipeline import Pipeline, available, create, pass_class

from rewrite.cli.common import (console, out, output_option, overwrite_option, read_graph, seed_all, seed_option,
                                task_option, write_graph)
from rewrite.cli.options import refuse_idle_options
from rewrite.cli.pass_options import add_pass_options, options_for, unused_options


QUANTIZED_LOADS = ("int4", "int8", "nf4")  # the quantize pass's dtypes (named here: the CLI does not import torch)


def _quantized_load(kind: str | None, block_size: int | None, embeddings: bool, meta: bool):
    """`capture --quantize` as the quantize pass to load with (None: a float capture)."""
    if kind is None:
        if block_size is not None:
            raise RewriteError("--block-size sets the quantization block; give it with --quantize int4, int8 or nf4")
        refuse_idle_options({"quantize_embeddings": "--quantize"})
        return None
    if meta:
        raise RewriteError("--quantize reads the weights, which --meta never does; capture with one of them")
    return {"dtype": kind, "embeddings": embeddings, **({} if block_size is None else {"block_size": block_size})}


@click.command()
@click.argument("model_dir", type=click.Path())
@output_option
@task_option
@click.option("--meta", is_flag=True, help="Capture from the config alone on the meta device (no weights read).")
@click.option("--num-labels", type=int, default=None, help="Classes for --task seq-cls (at least 2).")
@click.option("--quantize", type=click.Choice(QUANTIZED_LOADS), default=None,
              help="Quantize while loading, one weight at a time from the safetensors files (the quantize pass).")
@click.option("--block-size", type=int, default=None, help="With --quantize: weights per scale (the pass's default).")
@click.option("--quantize-embeddings", is_flag=True, help="With --quantize int4|int8: the word embeddings too.")
@seed_option
@overwrite_option
def capture(model_dir: str, output: str, task: str, meta: bool, num_labels: int | None, quantize: str | None,
            block_size: int | None, quantize_embeddings: bool, seed: int | None, overwrite: bool) -> None:
    """Capture a local Hugging Face model directory as a graph archive (.pt2)."""
    seed_all(seed)
    gm = rewrite.load_pretrained(model_dir, task=task, meta=meta, num_labels=num_labels,
                                 quantize=_quantized_load(quantize, block_size, quantize_embeddings, meta))
    console.print(f"captured {len(gm.graph.nodes)} nodes ({gm.info.task})")
    write_graph(gm, output)


@click.command()
@click.argument("source", type=click.Path())
@output_option
@task_option
@click.option("--pass", "pass_names", multiple=True, metavar="NAME", help=f"Pass to run, repeatable: {', '.join(available())}.")
@click.option("--pipeline", "pipeline_file", type=click.Path(dir_okay=False), help="YAML or JSON pipeline file.")
@seed_option
@overwrite_option
@add_pass_options
def apply(source: str, output: str, task: str, pass_names: tuple[str, ...], pipeline_file: str | None,
          seed: int | None, overwrite: bool, **given) -> None:
    """Run passes on a graph archive or a model directory.

    Pass options are flags (`--rank 8 --alpha 16 --roles q,v`); each goes to every selected pass
    that has it. Lists are comma-separated, dicts JSON; `--targets re:PATTERN` gives a regex.
    """
    if bool(pass_names) == bool(pipeline_file):
        raise RewriteError("give either --pass NAME (repeatable) or --pipeline FILE, not both and not neither")
    if pipeline_file:
        extra = unused_options([], given)
        if extra:
            raise RewriteError(f"options {', '.join(extra)} cannot be combined with --pipeline; put them in the file")
        pipeline = Pipeline.from_file(pipeline_file)
    else:
        for name in pass_names:
            pass_class(name)
        extra = unused_options(list(pass_names), given)
        if extra:
            raise RewriteError(
                f"option {', '.join('--' + e.replace('_', '-') for e in extra)} is not accepted by pass "
                f"{', '.join(pass_names)}"
            )
        pipeline = Pipeline([create(name, **options_for(name, given)) for name in pass_names])
    gm = read_graph(source, task)
    seed_all(seed)
    pipeline.run(gm)
    console.print(trainable_parameters_line(gm))
    write_graph(gm, output)


@click.command()
@click.argument("source", type=click.Path())
@output_option
@click.option("--requantize", is_flag=True, help="Quantized bases: merge into the dequantized weights and quantize "
                                                 "again (lossy; prints the weight error and output difference).")
@overwrite_option
def fold(source: str, output: str, requantize: bool, overwrite: bool) -> None:
    """Merge LoRA branches into their base weights and prompt encoders into constant tables."""
    gm = read_graph(source)
    rewrite.apply(gm, "fold", requantize=requantize)
    if "requantized" in gm.info.history[-1]["report"]:
        console.print(gm.info.history[-1]["report"]["summary"])
    write_graph(gm, output)


@click.command()
@click.argument("source", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="Output .onnx file.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check ONNX Runtime against torch.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--adapter-slots", is_flag=True, help="Keep the adapter as named inputs that adapter files fill (default: none).")
@click.option("--mixed-adapters", is_flag=True, help="Slots stacked per row: an adapter_index input picks each row's adapter.")
@click.option("--max-rank", type=int, default=DEFAULT_MAX_RANK, show_default=True,
              help="With --adapter-slots or --mixed-adapters: the largest LoRA rank the slots accept.")
@click.option("--with-cache", is_flag=True, help="Causal LMs: past keys/values in, presents out, for `run --generate`.")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="With --with-cache: lower norms and attention onto ONNX Runtime's fused ops (--no-fuse: as exported).")
@click.option("--accuracy-level", type=int, default=0, show_default=True,
              help="Quantized graphs: MatMulNBits' accuracy_level written into the model (0: fp32, as verified; "
                   "4: int8 activations, fastest on CPU).")
@click.option("--quantize", default=None, metavar="int4|int8",
              help="Post-training quantization of a float graph's projections (the quantize pass, in memory).")
@click.option("--block-size", type=int, default=None, help="With --quantize: weights per scale, 16 to 256 (default 32).")
@click.option("--symmetric", is_flag=True, help="With --quantize: no zero points.")
@click.option("--quantize-embeddings", is_flag=True,
              help="With --quantize: the word embeddings too (GatherBlockQuantized; a tied LM head quantized with "
                   "them shares the table).")
@click.option("--dtype", default="fp32", show_default=True, metavar="fp32|fp16",
              help="fp16: weights and products in float16, for GPU execution providers (logits and cache fp16).")
@overwrite_option
def export(source: str, onnx_path: str, verify: bool, opset: int | None, adapter_slots: bool, mixed_adapters: bool,
           max_rank: int, with_cache: bool, accuracy_level: int, quantize: str | None, block_size: int | None,
           symmetric: bool, quantize_embeddings: bool, dtype: str, fuse: bool, overwrite: bool) -> None:
    """Export a graph archive (fold it first for zero-overhead deployment) to ONNX.

    The tokenizer's files are written beside the model; files already there are not replaced
    unless --overwrite is given."""
    if adapter_slots and mixed_adapters:
        raise RewriteError("--adapter-slots adds nothing to --mixed-adapters, which exports the adapter slots already "
                           "(stacked per row); give one of them")
    if not (adapter_slots or mixed_adapters):
        refuse_idle_options({"max_rank": "--adapter-slots or --mixed-adapters"})
    if not with_cache:
        refuse_idle_options({"fuse": "--with-cache"})
    if quantize is None:
        refuse_idle_options({"block_size": "--quantize", "symmetric": "--quantize",
                             "quantize_embeddings": "--quantize"})
    check_output(onnx_path, what="ONNX file")
    gm = read_graph(source)
    report = rewrite.export_onnx(gm, onnx_path, verify=verify, opset=opset, adapter_slots=adapter_slots,
                                 mixed_adapters=mixed_adapters, max_rank=max_rank, cache=with_cache,
                                 overwrite=overwrite, accuracy_level=accuracy_level, quantize=quantize,
                                 block_size=block_size, symmetric=symmetric,
                                 quantize_embeddings=quantize_embeddings, dtype=dtype, fuse=fuse)
    inputs = [*report.input_names, *report.adapter_inputs]
    console.print(f"wrote {report.path}: inputs {', '.join(inputs)} -> {', '.join(report.output_names)}")
    for line in report.lowering.summary() if report.lowering else []:
        console.print(line)
    if report.genai_config:
        console.print(f"wrote {report.genai_config} (ONNX Runtime GenAI reads the directory)")
    if report.max_abs_diff is not None:
        console.print(f"ONNX Runtime ({report.provider}) vs torch: max abs diff {report.max_abs_diff:.3g}")


@click.command()
@click.argument("source", type=click.Path())
def inspect(source: str) -> None:
    """Show how a graph archive was made: passes, matched targets, trainable parameters."""
    gm = read_graph(source)
    meta = gm.info
    out.print(f"source: {meta.source or '-'}  task: {meta.task or '-'}  nodes: {len(gm.graph.nodes)}")
    if not meta.history:
        out.print("passes: none (base capture)")
    for index, entry in enumerate(meta.history, 1):
        options = ", ".join(f"{k}={v}" for k, v in entry["options"].items() if v not in (None, {}, []))
        out.print(f"{index}. {entry['pass']}({options}): {entry['report'].get('summary', '')}", markup=False)
        for target in entry["report"].get("targets", []):
            out.print(f"     {target}", markup=False)
    out.print(trainable_parameters_line(gm))
    trainable = meta.trainable
    if not trainable:
        out.print("rewrite train would train nothing: no pass made parameters trainable (apply lora, prompt or ptuning)")
    else:
        modules = sorted({name.rpartition(".")[0] for name in trainable})
        out.print(f"rewrite train would train {len(trainable)} tensors in {len(modules)} modules", markup=False)
    if meta.untrained:
        out.print(f"never trained (fresh random weights): {', '.join(meta.untrained)}", markup=False)
