"""`rewrite train` and `rewrite demo`: thin wrappers over `rewrite.training.train` and `rewrite.recipes.demo`."""
from __future__ import annotations

import os
from pathlib import Path

import click

import rewrite
from rewrite.training.checkpoint import completed
from rewrite.cli.common import columns_option, console, out, read_graph
from rewrite.cli.main import on_interrupt
from rewrite.training.data import Fields
from rewrite.training.train import SCHEDULES, TRAINING_TASKS, TrainConfig


@click.command()
@click.argument("source", type=click.Path())
@click.option("--data", "train_file", required=True, type=click.Path(dir_okay=False), help="Training rows: .jsonl, .csv or .tsv.")
@click.option("--eval", "eval_file", type=click.Path(dir_okay=False), help="Evaluation rows, same format.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False), help="Checkpoints, metrics.jsonl, model.pt2, adapter/.")
@click.option("--task", type=click.Choice(TRAINING_TASKS), default=None, help="Training task (default: the graph's).")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps; overrides --epochs.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per micro-batch per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per example; longer ones are cut.")
@click.option("--group-by-length", is_flag=True, help="Batch examples of similar length (less padding, faster).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.0, show_default=True, help="Warmup as a share of the steps.")
@click.option("--schedule", type=click.Choice(list(SCHEDULES)), default="linear", show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast (default: on CUDA only).")
@click.option("--compile", "compile_", is_flag=True, help="Run the graph through torch.compile.")
@click.option("--speed-passes", default=None,
              help="Comma-separated training-graph rewrites (default: every exact one, see rewrite.speed; none: off).")
@click.option("--checkpoint", is_flag=True, help="Activation checkpointing per block (less memory, one more forward).")
@click.option("--dropout-parity", is_flag=True,
              help="Keep Hugging Face's dropout masks bit for bit (no rows or fast_dropout pass).")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard the graph with FSDP2 instead of DDP.")
@click.option("--fsdp-offload", is_flag=True, help="With --fsdp on GPUs: keep the shards in CPU memory between uses.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available).")
@click.option("--save-every", type=int, default=100, show_default=True, help="Checkpoint every N steps (and at the end).")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True, help="Newest checkpoints kept.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps (and per epoch and at the end).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--pair-field", default=None, help="Second text of a pair (classification).")
@click.option("--label-field", default="label", show_default=True)
@columns_option
@click.option("--labels", "label_names", default=None, help="Comma-separated label names in class order (default: the model's).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --output-dir.")
def train(source: str, train_file: str, eval_file: str | None, output_dir: str, task: str | None,
          text_field: str, pair_field: str | None, label_field: str, columns: tuple[str, ...] | None,
          label_names: str | None, compile_: bool, max_grad_norm: float, speed_passes: str | None,
          **options) -> None:
    """Train a graph's adapter (.pt2 or model directory) on a data file.

    Under `torchrun --nproc_per_node N --no-python rewrite train ...` each process trains on its share.
    """
    gm = read_graph(source, task or "auto")
    config = TrainConfig(
        output_dir=output_dir, task=task, compile=compile_, max_grad_norm=max_grad_norm or None,
        speed_passes=_names(speed_passes),
        fields=Fields(text=text_field, pair=pair_field, label=label_field, columns=columns),
        label_names=[n.strip() for n in label_names.split(",")] if label_names else None,
        **options,
    )
    with on_interrupt(lambda: _interrupted_run(Path(output_dir))):
        result = rewrite.train(gm, train_file, eval_data=eval_file, config=config)
    if result.resumed_from is not None:
        summary = [f"resumed at step {result.resumed_from}; trained {result.steps - result.resumed_from} steps "
                   f"to step {result.steps}"]
    else:
        summary = [f"trained {result.steps} steps"]
    if result.train_loss is not None:
        summary.append(f"last loss {result.train_loss:.4f}")
    if result.eval:
        summary.append("eval " + ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items()))
    if int(os.environ.get("RANK", "0")) == 0:
        out.print("; ".join(summary))
        console.print(f"wrote {Path(output_dir) / 'model.pt2'}, {Path(output_dir) / 'adapter'}, checkpoints and metrics.jsonl")


def _interrupted_run(output_dir: Path) -> str:
    """What Ctrl-C left: the newest complete checkpoint, which `--resume` continues from."""
    found = completed(output_dir / "checkpoints")
    if not found:
        return "interrupted before the first checkpoint was saved; run the command again to start over"
    return f"interrupted; `--resume` continues from step {found[-1][0]}"


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    return [] if names == ["none"] else names


@click.command()
@click.option("--output-dir", default="rewrite-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the checkpoints, trained graph, adapter and model.onnx go.")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo in --output-dir.")
def demo(output_dir: str, overwrite: bool) -> None:
    """MiniLM + LoRA on shipped SST-2 data: train, fold, export to ONNX, check ONNX Runtime's accuracy."""
    from rewrite.recipes.demo import run_demo

    with on_interrupt(lambda: "interrupted; run the demo again with --overwrite to start over"):
        run_demo(output_dir, console=console, overwrite=overwrite)
