"""`rewrite adapter export`: a trained adapter as an ONNX Runtime `.onnx_adapter` file for a slotted model;
`rewrite adapter merge`: PEFT LoRA adapters combined into one, as PEFT's `add_weighted_adapter` does."""
from __future__ import annotations

import click

from rewrite.atomic import check_output
from rewrite.cli.common import console, overwrite_option
from rewrite.cli.options import refuse_idle_options
from rewrite.errors import RewriteError


@click.group()
def adapter() -> None:
    """Adapter files: merge PEFT LoRA adapters, or export one for models with --adapter-slots or --mixed-adapters."""


@adapter.command("export")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx_adapter file.")
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False),
              help="The slotted base model (.onnx) the adapter is checked against.")
@overwrite_option
def export_adapter(source: str, output: str, model: str, overwrite: bool) -> None:
    """Convert an adapter directory (ours or PEFT's) or a trained .pt2 to ONNX Runtime's adapter format."""
    from rewrite.export.onnx_adapters import export_adapter as convert

    check_output(output, overwrite=overwrite, what="adapter file")
    console.print(f"wrote {convert(source, output, model)}")


def _weights(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise RewriteError(f"--weights {value!r} is not a comma-separated list of numbers, one per adapter "
                           "(e.g. 0.7,0.3)") from None


def _idle_merge_options(method: str) -> dict[str, str]:
    """The merge options that do nothing with `method`, each with the methods it needs."""
    base = method.removesuffix("_svd")
    needs = {
        "density": ("ties", "dare_linear", "dare_ties", "magnitude_prune"),
        "majority_sign": ("ties", "dare_ties"),
        "seed": ("dare_linear", "dare_ties"),
    }
    idle = {name: f"--method {' or '.join(uses)} (or an _svd form)" for name, uses in needs.items() if base not in uses}
    if not method.endswith("svd"):
        idle.update(svd_rank="an svd method", svd_clamp="an svd method")
    return idle


@adapter.command("merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output adapter directory.")
@click.option("--weights", required=True, callback=_weights, metavar="W1,W2,...",
              help="One weight per adapter, e.g. 0.7,0.3 (a negative weight subtracts).")
@click.option("--method", default="svd", show_default=True,
              help="PEFT's combination_type: linear, svd, cat, ties, dare_linear, dare_ties, magnitude_prune, or the "
                   "_svd form of the last four (their merge on each module's delta, then an SVD).")
@click.option("--density", type=float, default=None, help="ties, dare_*, magnitude_prune: share of values kept, in (0, 1].")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="ties, dare_ties: how the sign of each value is elected.")
@click.option("--svd-rank", type=int, default=None, help="svd methods: rank of the merged adapter (default: the largest).")
@click.option("--svd-clamp", type=float, default=None, help="svd methods: clamp A and B at this quantile.")
@click.option("--seed", type=int, default=None,
              help="dare methods: seeds the random masks; PEFT's masks after torch.manual_seed(SEED).")
@overwrite_option
def merge(sources: tuple[str, ...], output: str, weights: list[float], method: str, density: float | None,
          majority_sign: str, svd_rank: int | None, svd_clamp: float | None, seed: int | None, overwrite: bool) -> None:
    """Merge LoRA adapter directories (ours or PEFT's) into one, as PEFT's add_weighted_adapter does."""
    from rewrite.adapters.merge import merge_adapters

    refuse_idle_options(_idle_merge_options(method))
    merge_adapters(sources, weights, output, method=method, density=density, majority_sign=majority_sign,
                   svd_rank=svd_rank, svd_clamp=svd_clamp, seed=seed, overwrite=overwrite)
    console.print(f"wrote {output} ({method} merge of {len(sources)} adapters)")
