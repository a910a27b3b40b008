"""What every command shares: reading a graph from an archive or model directory, writing it, options."""
from __future__ import annotations

from pathlib import Path

import click
import torch

import rewrite
from rewrite.graph.capture import CAPTURE_TASKS
from rewrite.errors import RewriteError
from rewrite.atomic import check_output
from rewrite.cli.console import console, out  # noqa: F401  (what commands print with)

def read_graph(source: str, task: str = "auto") -> rewrite.RewriteGraph:
    """A `.pt2` archive, or a Hugging Face model directory captured on the fly."""
    path = Path(source)
    if path.is_dir():
        return rewrite.load_pretrained(path, task=task)
    if path.suffix != ".pt2" and not path.exists():
        raise RewriteError(f"{source!r} is neither a .pt2 graph archive nor a model directory")
    return rewrite.load(path)


def write_graph(gm: rewrite.RewriteGraph, output: str) -> None:
    rewrite.save(gm, output)
    console.print(f"wrote {output}")


def seed_all(seed: int | None) -> None:
    """Fresh heads and adapter weights are drawn from torch's RNG: a seed makes them the same every run."""
    if seed is not None:
        torch.manual_seed(seed)


def _check_output(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        check_output(value, overwrite=ctx.params.get("overwrite", False))
    return value


output_option = click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
                             callback=_check_output, help="Output .pt2 archive.")
overwrite_option = click.option("--overwrite", is_flag=True, is_eager=True,
                                help="Replace output files that already exist (refused otherwise).")
seed_option = click.option("--seed", type=int, default=None,
                           help="Seed for the random draws (fresh heads, adapter init): same seed, same weights.")
task_option = click.option(
    "--task", default="auto", show_default=True,
    type=click.Choice(CAPTURE_TASKS), help="Model head to capture (auto reads config.architectures).",
)


def _columns(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in value.split(",")) if value else None


columns_option = click.option(
    "--columns", default=None, callback=_columns, metavar="NAMES",
    help="A CSV/TSV without a header row: its columns' names in order, e.g. label,text.")
