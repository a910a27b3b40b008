"""`rewrite`: capture, apply passes, fold, export, inspect and run, from the command line.

Commands are imported when they run, so `rewrite --help` and `--version` start without torch.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Callable, Iterator

import click
from rich.markup import escape

from rewrite.cli.console import configure_logging, console
from rewrite import quiet
from rewrite.errors import RewriteError, causes

# name -> (module, function, one-line help shown by `rewrite --help` without importing the command)
COMMANDS = {
    "capture": ("rewrite.cli.commands", "capture", "Capture a local Hugging Face model directory as a graph archive."),
    "apply": ("rewrite.cli.commands", "apply", "Run passes on a graph archive or a model directory."),
    "fold": ("rewrite.cli.commands", "fold", "Merge LoRA branches and prompt encoders into constants."),
    "export": ("rewrite.cli.commands", "export", "Export a graph archive to ONNX."),
    "inspect": ("rewrite.cli.commands", "inspect", "Show how a graph archive was made and what train would train."),
    "run": ("rewrite.cli.run", "run", "Run an exported model in ONNX Runtime on text."),
    "train": ("rewrite.cli.train", "train", "Train a graph's adapter on a data file."),
    "demo": ("rewrite.cli.train", "demo", "MiniLM + LoRA on shipped SST-2 data, end to end to ONNX."),
    "pet": ("rewrite.cli.pet", "pet_command", "Pattern-Exploiting Training: PVP models, distillation, ONNX."),
    "mlm-head": ("rewrite.cli.mlm_head", "mlm_head_command", "Fit a checkpoint's missing masked-LM head on unlabeled text."),
    "adapter": ("rewrite.cli.adapter", "adapter", "Adapter files: merge LoRA adapters, export one for adapter slots."),
    "serve": ("rewrite.cli.serve", "serve", "Serve an exported model over HTTP (OpenAI-style, adapters batched)."),
}

EXTRAS = {"serve": "serve"}  # the install extra that brings a command's packages (else: compiler)


class LazyGroup(click.Group):
    """Imports a command's module only when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, function, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), function)
        except ModuleNotFoundError as error:  # a serving install has no torch; a compiler one may lack the server
            extra = EXTRAS.get(name, "compiler")
            raise RewriteError(f"rewrite {name} needs {error.name!r}, which this install lacks; install rewrite with "
                               f"it: pip install 'rewrite[{extra}]'") from error

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rewrite", message="rewrite %(version)s")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Compiler-style graph rewriting for parameter-efficient fine-tuning.

    capture -> apply (lora, ...) -> train -> fold -> export -> run
    """
    configure_logging(verbose)


def _fail(message: str, error: BaseException | None = None) -> None:
    """One line on stderr, whatever the message holds; with -v, the third-party text behind it after."""
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    if error is not None and quiet.is_verbose():
        for cause in causes(error):
            console.print(escape(f"  from {type(cause).__name__}: {cause}"), highlight=False, soft_wrap=True)
    sys.exit(2)


def interruption(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C behind `error`: click's Abort, or a library's own error raised while one unwound it."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def on_interrupt(left: Callable[[], str]) -> Iterator[None]:
    """A Ctrl-C in the block ends the command with `left()`, the line saying what it left behind."""
    try:
        yield
    except BaseException as error:
        if interruption(error) is None:
            raise
        raise KeyboardInterrupt(left()) from error


def _invoke() -> None:
    try:
        cli.main(standalone_mode=False)
    except Exception as error:
        interrupt = interruption(error)
        if interrupt is None:
            raise
        raise interrupt from None


def _interrupted(interrupt: KeyboardInterrupt) -> None:
    """Ctrl-C: one line on what was left, exit status 130 as shells give. A command says what it left
    with `on_interrupt` (train: the step `--resume` continues from); the others write their outputs
    whole at the end, so an interrupted one wrote nothing."""
    console.print(escape(str(interrupt) or "interrupted; nothing was written"), highlight=False, soft_wrap=True)
    sys.exit(130)


def main() -> None:
    """Entry point: bad input is one sentence on stderr and exit status 2, never a traceback."""
    try:
        _invoke()
    except RewriteError as error:
        _fail(str(error), error)
    except OSError as error:  # the file system refused: a path the user gave cannot be read or written
        _fail(f"{error.filename or 'a file'!s}: {error.strerror or error}")
    except click.ClickException as error:
        hint = f" (see {error.ctx.command_path} --help)" if getattr(error, "ctx", None) else ""
        _fail(error.format_message() + hint)
    except click.exceptions.Abort:
        sys.exit(1)
    except KeyboardInterrupt as interrupt:
        _interrupted(interrupt)
