"""`rewrite run`: an exported model in ONNX Runtime on text, predictions or generated text. It imports only the
serving runtime, so it runs in a serving install without torch."""
from __future__ import annotations

import click
from rich.markup import escape

from rewrite.cli.console import out
from rewrite.cli.options import refuse_idle_options


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--text", "texts", multiple=True, required=True, help="Input text, repeatable.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(file_okay=False), help="Tokenizer directory (default: the model's).")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Predictions to print (default 5); with --generate --sample: sample from the k likeliest tokens.")
@click.option("--truncate/--no-truncate", default=True, show_default=True,
              help="Cut texts longer than the model's positions (with a warning), or refuse them.")
@click.option("--adapter", "adapter_file", type=click.Path(dir_okay=False), help="An .onnx_adapter file to activate.")
@click.option("--adapters", "adapter_files", default=None, help="Comma-separated .onnx_adapter files, one per index (mixed model).")
@click.option("--adapter-index", default=None, help="Comma-separated adapter index per --text (default 0, 1, ... cycling).")
@click.option("--generate", "generating", is_flag=True, help="Continue the text (a model exported --with-cache).")
@click.option("--max-new-tokens", default=20, show_default=True, help="With --generate: tokens to add.")
@click.option("--sample", is_flag=True, help="With --generate: sample instead of taking the likeliest token.")
@click.option("--temperature", default=1.0, show_default=True, help="With --sample: divides the logits.")
@click.option("--top-p", default=1.0, show_default=True, help="With --sample: nucleus probability mass.")
@click.option("--seed", type=int, default=None, help="With --sample: makes the draws reproducible.")
def run(model: str, texts: tuple[str, ...], tokenizer_dir: str | None, top_k: int | None, truncate: bool,
        adapter_file: str | None, adapter_files: str | None, adapter_index: str | None, generating: bool,
        max_new_tokens: int, sample: bool, temperature: float, top_p: float, seed: int | None) -> None:
    """Tokenize text, run an exported model in ONNX Runtime and print the top predictions (or, with
    --generate, the generated text, streamed)."""
    from rewrite.runtime.adapters import Adapters
    from rewrite.runtime.predict import predict

    if not generating:
        refuse_idle_options({"sample": "--generate", "max_new_tokens": "--generate"})
    if not sample:
        refuse_idle_options({"temperature": "--sample", "top_p": "--sample", "seed": "--sample",
                             **({"top_k": "--sample"} if generating else {})})
    adapters = Adapters.parse(adapter_file, adapter_files, adapter_index, len(texts))
    if generating:
        from rewrite.cli.generate import print_generation
        from rewrite.runtime.generate import Sampling

        print_generation(model, list(texts), tokenizer_dir, max_new_tokens,
                         Sampling(sample, temperature, top_k or 0, top_p, seed), adapters)
        return
    results = predict(model, list(texts), tokenizer_dir=tokenizer_dir, top_k=5 if top_k is None else top_k,
                      truncate=truncate, adapters=adapters)
    for text, predictions in zip(texts, results):
        out.print(f"[bold]{escape(text)}[/bold]")
        for label, score in predictions:
            out.print(f"  {score:9.4f}  {escape(str(label))}")
