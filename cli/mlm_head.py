"""`rewrite mlm-head`: fit a checkpoint's missing masked-LM head on unlabeled text (a thin wrapper over `rewrite.recipes.mlm_head`)."""
from __future__ import annotations

import dataclasses

import click

from rewrite.atomic import check_output_dir
from rewrite.cli.common import columns_option, console, out
from rewrite.training.data import Fields, read_examples
from rewrite.recipes import mlm_head
from rewrite.training.train import check_config


@click.command(name="mlm-head")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help="Unlabeled text (.tsv, .csv, .jsonl); other columns, labels too, are ignored.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="New Hugging Face directory: the checkpoint plus the fitted head.")
@click.option("--text-field", default="text", show_default=True, help="Column of the text.")
@columns_option
@click.option("--eval", "eval_file", type=click.Path(dir_okay=False),
              help="Held-out text to score the head on (default: --held-out rows of --data, not trained on).")
@click.option("--held-out", type=int, default=None,
              help=f"Rows of --data kept out of training [default: {mlm_head.HELD_OUT}, at most a tenth of --data].")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace files already in --output.")
def mlm_head_command(model_dir: str, data_file: str, output: str, text_field: str, columns: tuple[str, ...] | None,
                     eval_file: str | None, held_out: int | None, overwrite: bool, **options) -> None:
    """Fit the masked-LM head a checkpoint lacks (transform + output bias; encoder frozen, decoder tied)
    on unlabeled text, report masked-token accuracy on held-out text before and after, and write
    the checkpoint with its head as a new directory `AutoModelForMaskedLM` loads."""
    config = dataclasses.replace(mlm_head.default_training(), **options)
    check_config(config, mlm_head.TASK)
    target = check_output_dir(output, overwrite=overwrite)
    fields = Fields(text=text_field, columns=columns)
    texts = read_examples(data_file, task=mlm_head.TASK, fields=fields)
    if eval_file:
        held = read_examples(eval_file, task=mlm_head.TASK, fields=fields)
    else:
        texts, held = mlm_head.split_held_out(texts, held_out, config.seed)
    fit = mlm_head.fit_head(model_dir, texts, held, config)
    for name, value in (("before", fit.before), ("after", fit.after)):
        out.print(f"masked-token accuracy on {len(held)} held-out texts {name}: {value.accuracy:.4f} "
                  f"(loss {value.loss:.4f})")
    mlm_head.write_model_dir(fit, model_dir, target, overwrite=overwrite, provenance={
        "data": data_file, "texts": len(texts), "held_out": eval_file or f"{len(held)} rows of the data"})
    console.print(f"wrote {target} (head: {', '.join(fit.parameters)})")
