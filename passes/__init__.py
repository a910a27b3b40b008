"""The built-in passes, one per file; importing this package registers them by name."""
from rewrite.pipeline import available, create, option_names

from rewrite.passes import fold, lora, prompt, ptuning, rows, verbalizer  # noqa: F401  (registration)

__all__ = ["available", "create", "option_names"]
