"""LoRA: `y = W0 x + b + scale * B(A(dropout(x)))`, with PEFT's semantics, inserted as graph nodes.

Targets are chosen like PEFT (`targets`: a regex that fullmatches the module path, a list of names
matched exactly or as a `.suffix`, or `"all-linear"`) or structurally (`roles`: q, k, v, o, mlp, read
off the graph by `rewrite.graph`). With neither, the default is roles q and v. The branch's weights
live at `<module path>.lora_A.weight` / `.lora_B.weight`, PEFT's names.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.errors import RewriteError
from rewrite.graph import ROLES, GraphQuery, Projection
from rewrite.ir import add_submodule, copy_meta, info, tensor_at
from rewrite.params import mark_trainable, trainable_heads
from rewrite.pipeline import Pass, option, register

aten = torch.ops.aten
INITS = ("kaiming", "gaussian")
DEFAULT_ROLES = ("q", "v")


def matches(path: str, spec: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex that must fullmatch; a list entry matches exactly or as a `.suffix`."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def _check_regex(spec) -> None:
    """A target given as a string is a regex (PEFT's rule): it must compile."""
    if isinstance(spec, str) and spec != "all-linear":
        try:
            re.compile(spec)
        except re.error as error:
            raise RewriteError(f"LoRA target pattern {spec!r} is not a valid regular expression ({error}); "
                               "write a Python regex, or a comma-separated list of module names") from None


def _pattern_value(path: str, pattern: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _names(projections: list[Projection]) -> str:
    short = sorted({p.path.rpartition(".")[2] for p in projections})
    return ", ".join(short)


@register
@dataclass
class LoraPass(Pass):
    name = "lora"

    targets: str | list[str] | None = option(
        None, "module names (exact or .suffix), a regex (re:...), or all-linear; like PEFT's target_modules")
    roles: list[str] | None = option(None, "structural roles to adapt: q, k, v, o, mlp (default q,v)")
    exclude: str | list[str] | None = option(None, "module names or regex to leave alone")
    layers: list[int] | None = option(None, "only these layer indices (PEFT's layers_to_transform)")
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(8.0, "LoRA alpha; scale = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = option(0.0, "dropout on the branch input, active in train mode only")
    rslora: bool = option(False, "rank-stabilized scaling alpha / sqrt(r)")
    init: str = option("kaiming", "A's init: kaiming (PEFT default, B = 0) or gaussian")
    rank_pattern: dict[str, int] = option({}, "per-target rank overrides, JSON {name or regex: rank}")
    alpha_pattern: dict[str, float] = option({}, "per-target alpha overrides, JSON {name or regex: alpha}")
    modules_to_save: list[str] | None = option(
        None, "modules trained and saved in full (default: the head of a seq-cls graph, like PEFT)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.targets, (list, tuple)) and len(self.targets) == 1 and self.targets[0] == "all-linear":
            self.targets = "all-linear"
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise RewriteError(f"LoRA {name} {getattr(self, name)!r} is not a mapping; write JSON like "
                                   '{"query": 16}')
        for rank in [self.rank, *self.rank_pattern.values()]:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise RewriteError(f"LoRA rank {rank!r} is not allowed; use a whole number of at least 1")
        for alpha in [self.alpha, *self.alpha_pattern.values()]:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
                raise RewriteError(f"LoRA alpha {alpha!r} is not allowed; use a finite number greater than 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise RewriteError(f"LoRA dropout {self.dropout!r} is not allowed; use a probability in [0, 1)")
        if self.init not in INITS:
            raise RewriteError(f"LoRA init {self.init!r} is not known; use one of {', '.join(INITS)}")
        for spec in (self.targets, self.exclude, *self.rank_pattern, *self.alpha_pattern):
            _check_regex(spec)
        unknown = sorted(set(self.roles or []) - set(ROLES))
        if unknown:
            raise RewriteError(f"role {', '.join(unknown)} is not known; roles are {', '.join(ROLES)}")

    def select(self, query: GraphQuery) -> list[Projection]:
        """The projections this pass adapts (every call site of each matched module)."""
        projections = query.projections
        if not projections:
            raise RewriteError("the graph has no linear projections with 2-D parameter weights to put LoRA on")
        chosen = projections
        if self.targets == "all-linear":
            heads = {p.path for p in query.output_heads}
            chosen = [p for p in chosen if p.path not in heads]
        elif self.targets is not None:
            chosen = [p for p in chosen if matches(p.path, self.targets)]
            if not chosen:
                raise RewriteError(
                    f"LoRA targets {self.targets!r} match no module; linear modules in this graph: {_names(projections)}"
                )
        roles = self.roles if self.roles is not None else (DEFAULT_ROLES if self.targets is None else None)
        if roles is not None:
            found = query.roles
            chosen = [p for p in chosen if found.get(p.path, set()) & set(roles)]
            if not chosen:
                present = sorted({r for rs in found.values() for r in rs})
                raise RewriteError(
                    f"LoRA roles {', '.join(roles)} match no module; roles found in this graph: "
                    f"{', '.join(present) or 'none (no attention found)'}"
                )
        if self.exclude is not None:
            chosen = [p for p in chosen if not matches(p.path, self.exclude)]
        if self.layers is not None:
            chosen = [p for p in chosen if p.layer in set(self.layers)]
        if not chosen:
            raise RewriteError("LoRA's exclude/layers filters leave no module to adapt; loosen them")
        return chosen

    def _rank_alpha(self, path: str) -> tuple[int, float]:
        return _pattern_value(path, self.rank_pattern, self.rank), _pattern_value(path, self.alpha_pattern, self.alpha)

    def _scale(self, rank: int, alpha: float) -> float:
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def _make_weights(self, gm: fx.GraphModule, proj: Projection, rank: int) -> None:
        base = tensor_at(gm, proj.weight)
        dtype = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
        lora_a = nn.Linear(proj.in_features, rank, bias=False, device=base.device, dtype=dtype)
        lora_b = nn.Linear(rank, proj.out_features, bias=False, device=base.device, dtype=dtype)
        if self.init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        add_submodule(gm, f"{proj.path}.lora_A", lora_a)
        add_submodule(gm, f"{proj.path}.lora_B", lora_b)

    def _insert_branch(self, gm: fx.GraphModule, proj: Projection, scale: float) -> None:
        graph = gm.graph
        y = proj.node
        lora_dtype = tensor_at(gm, f"{proj.path}.lora_A.weight").dtype
        base_dtype = tensor_at(gm, proj.weight).dtype
        tag = {"pass": "lora", "target": proj.path}
        created: list[fx.Node] = []

        def node(target, *args, **kwargs):
            new = graph.call_function(target, args, kwargs)
            copy_meta(y, new, **tag)
            created.append(new)
            return new

        with graph.inserting_before(y.next):
            x = proj.input
            if self.dropout > 0:
                x = node(aten.dropout.default, x, self.dropout, gm.training)
            if lora_dtype != base_dtype:
                x = node(aten._to_copy.default, x, dtype=lora_dtype)
            a_w = graph.get_attr(f"{proj.path}.lora_A.weight")
            b_w = graph.get_attr(f"{proj.path}.lora_B.weight")
            for attr in (a_w, b_w):
                copy_meta(y, attr, **tag)
            h = node(aten.linear.default, x, a_w)
            h = node(aten.linear.default, h, b_w)
            h = node(aten.mul.Tensor, h, scale)
            if lora_dtype != base_dtype:
                h = node(aten._to_copy.default, h, dtype=base_dtype)
            out = node(aten.add.Tensor, y, h)
        out.meta["rewrite"].update(
            lora_add=True, scale=scale, weight=proj.weight, transposed=proj.transposed
        )
        y.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        chosen = self.select(GraphQuery(gm))
        heads = trainable_heads(gm, self.modules_to_save)
        paths = list(dict.fromkeys(p.path for p in chosen))
        first = {p.path: p for p in reversed(chosen)}
        plan = {path: self._rank_alpha(path) for path in paths}
        _check_fits(gm, [first[path] for path in paths], {path: plan[path][0] for path in paths})
        for path in paths:
            self._make_weights(gm, first[path], plan[path][0])
        for proj in chosen:
            self._insert_branch(gm, proj, self._scale(*plan[proj.path]))
        names = [f"{path}.{ab}.weight" for path in paths for ab in ("lora_A", "lora_B")]
        mark_trainable(gm, names + heads)
        self.report = {
            "targets": paths,
            "ranks": {path: plan[path][0] for path in paths},
            "alphas": {path: plan[path][1] for path in paths},
            "fan_in_fan_out": sorted({first[p].transposed for p in paths}) == [True],
            "modules_to_save": info(gm).get("modules_to_save"),
            "summary": f"LoRA on {len(paths)} modules ({_names(chosen)})",
        }
        return PassResult(gm, True)



def _check_fits(gm: fx.GraphModule, projections: list[Projection], ranks: dict[str, int]) -> None:
    """Every error is raised before the graph changes."""
    for proj in projections:
        limit = min(proj.in_features, proj.out_features)
        if ranks[proj.path] > limit:
            raise RewriteError(
                f"LoRA rank {ranks[proj.path]} is too large for {proj.path} "
                f"({proj.in_features} -> {proj.out_features}); use at most {limit}"
            )
        try:
            gm.get_submodule(f"{proj.path}.lora_A")
        except AttributeError:
            continue
        raise RewriteError(f"{proj.path} already has a LoRA adapter; fold it first or start from the base graph")
