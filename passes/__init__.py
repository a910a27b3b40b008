"""The built-in passes, one per file; importing this package registers them by name."""
from rewrite.pipeline import available, create, option_names

from rewrite.passes import (  # noqa: F401  (registration)
    checkpoint, chunked_loss, dense_attention, fold, fused_lora, lora, prompt, ptuning, rows, verbalizer,
)

__all__ = ["available", "create", "option_names"]
