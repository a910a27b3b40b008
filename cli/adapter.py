"""`rewrite adapter export`: a trained adapter as an ONNX Runtime `.onnx_adapter` file for a slotted model."""
from __future__ import annotations

import click

from rewrite.atomic import check_output
from rewrite.cli.common import console, overwrite_option


@click.group()
def adapter() -> None:
    """Adapter files for models exported with --adapter-slots or --mixed-adapters."""


@adapter.command("export")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx_adapter file.")
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False),
              help="The slotted base model (.onnx) the adapter is checked against.")
@overwrite_option
def export_adapter(source: str, output: str, model: str, overwrite: bool) -> None:
    """Convert an adapter directory (ours or PEFT's) or a trained .pt2 to ONNX Runtime's adapter format."""
    from rewrite.onnx_adapters import export_adapter as convert

    check_output(output, overwrite=overwrite, what="adapter file")
    console.print(f"wrote {convert(source, output, model)}")
