"""Where output goes (light: imported before any command, so `rewrite --help` starts fast)."""
from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.logging import RichHandler

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
