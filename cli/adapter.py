"""`rewrite adapter export`: a trained adapter as an ONNX Runtime `.onnx_adapter` file for a slotted model."""
from __future__ import annotations

import click

from rewrite.cli.common import cli, console


@cli.group()
def adapter() -> None:
    """Adapter files for models exported with --adapter-slots or --mixed-adapters."""


@adapter.command("export")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx_adapter file.")
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False),
              help="The slotted base model (.onnx) the adapter is checked against.")
def export_adapter(source: str, output: str, model: str) -> None:
    """Convert an adapter directory (ours or PEFT's) or a trained .pt2 to ONNX Runtime's adapter format."""
    from rewrite.onnx_adapters import export_adapter as convert

    console.print(f"wrote {convert(source, output, model)}")
