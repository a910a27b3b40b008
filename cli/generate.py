"""`rewrite run model.onnx --generate`: text from a model exported with a KV cache, streamed as it comes."""
from __future__ import annotations

import numpy as np

from rewrite.cli.console import out
from rewrite.runtime.generate import CachedModel, Sampling, stream
from rewrite.runtime.adapters import Adapters


def print_generation(model_path: str, texts: list[str], tokenizer_dir: str | None, max_new_tokens: int,
                     sampling: Sampling, adapters: Adapters) -> None:
    """Each text's continuation (as `rewrite.runtime.generate` returns it: without the prompt), one line per text
    in the order given; a single text's is streamed token by token as it comes."""
    model = CachedModel(model_path, tokenizer_dir, adapters=adapters, huge_pages=False)  # one run: a cheaper load
    steps = []
    shown = ""
    for tokens, _ in stream(model, texts, max_new_tokens=max_new_tokens, sampling=sampling):
        steps.append(tokens)
        if len(texts) == 1:
            text = model.tokenizer.decode(np.stack(steps, 1)[0], skip_special_tokens=True)
            out.file.write(text[len(shown):])
            out.file.flush()
            shown = text
    if len(texts) == 1:
        out.file.write("\n")
        return
    for completion in model.tokenizer.batch_decode(np.stack(steps, 1), skip_special_tokens=True):
        out.file.write(completion + "\n")
