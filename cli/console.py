"""Where output goes (light: imported before any command, so `rewrite --help` starts fast)."""
from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

from rewrite import quiet

console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
out = Console(soft_wrap=not sys.stdout.isatty())  # piped output keeps each result on one line


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
    quiet.verbose(bool(verbose))  # loading bars, load reports, library warnings and exporter chatter show with -v
    if not verbose:  # by default only ours
        quiet.silence_process()
