"""Which modules an adapter method adapts, one rule set for every method: PEFT's target rules (a regex that
fullmatches the module path, a list of names matched exactly or as a `.suffix`, `all-linear`), `exclude`,
`layers` (PEFT's `layers_to_transform`), and structural roles read off the graph (`rewrite.graph.query`).

A method mixes `Targeting` into its pass and states its default roles (`default_roles`); its messages name
it by the pass's `title`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from rewrite.errors import RewriteError
from rewrite.graph.options import option
from rewrite.graph.query import GraphQuery, Projection, matches_module

Role = Literal["q", "k", "v", "o", "mlp", "down"]  # rewrite.graph.query.ROLES


def check_regex(spec, title: str) -> None:
    """A target given as a string is a regex (PEFT's rule): it must compile."""
    if isinstance(spec, str) and spec != "all-linear":
        try:
            re.compile(spec)
        except re.error as error:
            raise RewriteError(f"{title} target pattern {spec!r} is not a valid regular expression ({error}); "
                               "write a Python regex, or a comma-separated list of module names") from None


def pattern_value(path: str, pattern: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def short_names(projections: list[Projection]) -> str:
    """The modules' last path components, once each: how messages and summaries name a selection."""
    return ", ".join(sorted({p.path.rpartition(".")[2] for p in projections}))


@dataclass
class Targeting:
    """The target options of an adapter method (mixed into its pass before `Pass`)."""

    default_roles: ClassVar[tuple[str, ...]] = ("q", "v")
    reads_base_weight: ClassVar[bool] = False  # the method computes from the float weight (a norm, an SVD)

    targets: str | list[str] | None = option(
        None, "module names (exact or .suffix), a regex (re:...), or all-linear; like PEFT's target_modules")
    roles: list[Role] | None = option(
        None, "structural roles to adapt: q, k, v, o, mlp, down (default q,v; IA³: k,v,down)", label="role")
    exclude: str | list[str] | None = option(None, "module names or regex to leave alone")
    layers: list[int] | None = option(None, "only these layer indices (PEFT's layers_to_transform)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.targets, (list, tuple)) and len(self.targets) == 1 and self.targets[0] == "all-linear":
            self.targets = "all-linear"
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        for spec in (self.targets, self.exclude):
            check_regex(spec, self.title)

    def candidates(self, query: GraphQuery) -> list[Projection]:
        """What `targets` may name: the projections (LoRA adds embedding lookups)."""
        return query.projections

    def select(self, query: GraphQuery) -> list[Projection]:
        """The projections this method adapts (every call site of each matched module)."""
        projections = query.projections
        if not projections:
            raise RewriteError(f"the graph has no linear projections with 2-D parameter weights to put "
                               f"{self.title} on")
        chosen = projections
        if self.targets == "all-linear":
            heads = {p.path for p in query.output_heads}
            chosen = [p for p in chosen if p.path not in heads]
        elif self.targets is not None:
            candidates = self.candidates(query)
            chosen = [p for p in candidates if matches_module(p.path, self.targets)]
            if not chosen:
                others = [p for p in candidates if p not in projections]
                raise RewriteError(f"{self.title} targets {self.targets!r} match no module; linear modules in this "
                                   f"graph: {short_names(projections)}"
                                   + (f"; embeddings: {short_names(others)}" if others else ""))
        roles = self.roles if self.roles is not None else (self.default_roles if self.targets is None else None)
        if roles is not None:
            found = query.roles
            chosen = [p for p in chosen if found.get(p.path, set()) & set(roles)]
            if not chosen:
                present = sorted({r for rs in found.values() for r in rs})
                raise RewriteError(f"{self.title} roles {', '.join(roles)} match no module; roles found in this "
                                   f"graph: {', '.join(present) or 'none (no attention found)'}")
        if self.exclude is not None:
            chosen = [p for p in chosen if not matches_module(p.path, self.exclude)]
        if self.layers is not None:
            chosen = [p for p in chosen if p.layer in set(self.layers)]
        if not chosen:
            raise RewriteError(f"{self.title}'s exclude/layers filters leave no module to adapt; loosen them")
        packed = next((p.path for p in chosen if p.quantized), None)
        if self.reads_base_weight and packed is not None:
            raise RewriteError(f"{self.title} computes from the float weight of {packed}, which is quantized; put "
                               "LoRA or IA³ on a quantized base, or leave that module out of quantize")
        return chosen
