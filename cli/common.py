"""What every command shares: reading a graph from an archive or model directory, writing it, logging."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.logging import RichHandler

import rewrite
from rewrite.capture import TASKS
from rewrite.errors import RewriteError
from rewrite.files import check_output

console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
out = Console(soft_wrap=not sys.stdout.isatty())  # piped output keeps each result on one line


def _quiet_third_party(verbose: int) -> None:
    """Loading bars, load reports and library warnings show with -v; by default only ours."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def configure_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=console, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # one line per record, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("rewrite").setLevel(min(level, logging.INFO))
    logging.captureWarnings(True)  # library warnings (the exporter's) become log records: shown with -v
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)
    for noisy in ("torch.onnx", "onnxscript", "onnx_ir"):  # exporter chatter; our own log says what matters
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    _quiet_third_party(verbose)


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
    type=click.Choice(TASKS), help="Model head to capture (auto reads config.architectures).",
)


def _columns(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in value.split(",")) if value else None


columns_option = click.option(
    "--columns", default=None, callback=_columns, metavar="NAMES",
    help="A CSV/TSV without a header row: its columns' names in order, e.g. label,text.")
