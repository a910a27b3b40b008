"""The library is as quiet as the command: third-party output (transformers' loading bars and load
reports, the ONNX exporter's log, library warnings) is silenced inside the library's own calls, and our
own messages go to the `rewrite` logger. `rewrite.verbose()` (or `REWRITE_VERBOSE=1`; the CLI's `-v`)
shows the third-party output again.

Light on purpose (the standard library only): the CLI silences the whole command with it before torch
or transformers load.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from typing import Any, Callable, Iterator, TypeVar

ENV = "REWRITE_VERBOSE"
# the exporter's chatter, and bitsandbytes' CPU backend, which warns at import (wherever transformers or peft load
# it) that a hub kernel it tries is unavailable; our own log says what matters
NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir", "bitsandbytes")

_switch: bool | None = None  # set by verbose(); None: the environment decides
F = TypeVar("F", bound=Callable[..., Any])


def verbose(on: bool = True) -> None:
    """Shows (`on`) or hides third-party output from the library's calls; hidden by default."""
    global _switch
    _switch = on


def is_verbose() -> bool:
    return _switch if _switch is not None else os.environ.get(ENV, "") not in ("", "0")


def _silence(load_transformers: bool) -> dict[str, Any]:
    """Turns the noisy loggers and transformers' verbosity and progress bars down; returns what they were.
    Transformers is only touched once loaded unless `load_transformers` (it resets its loggers as it loads)."""
    saved: dict[str, Any] = {"loggers": {name: logging.getLogger(name).level for name in NOISY_LOGGERS}}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if load_transformers or "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        saved["transformers"] = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    return saved


def _restore(saved: dict[str, Any]) -> None:
    for name, level in saved["loggers"].items():
        logging.getLogger(name).setLevel(level)
    if "transformers" in saved:
        from transformers.utils import logging as hf_logging

        verbosity, bars = saved["transformers"]
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def silence_process() -> None:
    """The command's default for its whole run, set before transformers loads (it reads the environment)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _silence(load_transformers=False)


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Third-party loggers, progress bars and warnings silenced for the block (unless verbose), then restored."""
    if is_verbose():
        yield
        return
    saved = _silence(load_transformers=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _restore(saved)


def quiet(function: F) -> F:
    """A library entry point that runs `quietly`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with quietly():
            return function(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
