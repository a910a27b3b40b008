"""What every command shares: the command group, reading a graph from an archive or model directory,
writing it, logging."""
from __future__ import annotations

import logging
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler

import rewrite
from rewrite.capture import CAPTURE_TASKS
from rewrite.errors import RewriteError

console = Console(stderr=True)
out = Console()


def configure_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    handler = RichHandler(console=console, show_time=False, show_path=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("rewrite").setLevel(min(level, logging.INFO))
    for noisy in ("torch.onnx", "onnxscript", "onnx_ir"):  # exporter chatter; our own log says what matters
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))


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


output_option = click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .pt2 archive.")
task_option = click.option(
    "--task", default="auto", show_default=True,
    type=click.Choice(CAPTURE_TASKS), help="Model head to capture (auto reads config.architectures).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Compiler-style graph rewriting for parameter-efficient fine-tuning.

    capture -> apply (lora, ...) -> train -> fold -> export -> run
    """
    configure_logging(verbose)
