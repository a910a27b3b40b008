"""Option checks every command shares (light: no torch, so the serving commands can use them)."""
from __future__ import annotations

import click
from click.core import ParameterSource

from rewrite.errors import RewriteError


def refuse_idle_options(needs: dict[str, str]) -> None:
    """Options given where they would do nothing are refused, not ignored: `needs` maps each option
    (by parameter name) that is idle in this call to what it needs."""
    ctx = click.get_current_context()
    for name, needed in needs.items():
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT):
            flag = next(p.opts[-1] for p in ctx.command.params if p.name == name)
            raise RewriteError(f"{flag} does nothing without {needed}; add {needed}, or leave {flag} out")
