"""LoRA: `y = W0 x + b + scale * B(A(dropout(x)))`, with PEFT's semantics, inserted as graph nodes.

Targets are chosen like PEFT (`targets`: a regex that fullmatches the module path, a list of names
matched exactly or as a `.suffix`, or `"all-linear"`) or structurally (`roles`: q, k, v, o, mlp, read
off the graph by `rewrite.graph`). With neither, the default is roles q and v. The branch's weights
live at `<module path>.lora_A.weight` / `.lora_B.weight`, PEFT's names, and adapter files are PEFT's
LORA (`adapter_config.json` + `base_model.model.<path>.lora_A.weight` ...), in both directions.

Fold merges each branch into its base weight, `W0 += scale * B @ A`, and erases the branch
(`rewrite.low_rank`): a folded graph is node for node the base capture, so deployment pays nothing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapter import PREFIX, adapter_base, peft_task_type, saved_modules
from rewrite.adapter_slots import RANK, Slot, dtype_name
from rewrite.errors import RewriteError
from rewrite.graph import GraphQuery, Projection, matches_module
from rewrite.ir import add_submodule, info, tag, tensor_at
from rewrite.low_rank import merge_branches
from rewrite.nodes import NodeBuilder
from rewrite.params import mark_trainable, trainable_heads
from rewrite.pipeline import AdapterFiles, Folded, Pass, Pipeline, option, register

aten = torch.ops.aten
DEFAULT_ROLES = ("q", "v")
Role = Literal["q", "k", "v", "o", "mlp"]  # rewrite.graph.ROLES


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
    title = "LoRA"
    peft_types = ("LORA",)

    targets: str | list[str] | None = option(
        None, "module names (exact or .suffix), a regex (re:...), or all-linear; like PEFT's target_modules")
    roles: list[Role] | None = option(None, "structural roles to adapt: q, k, v, o, mlp (default q,v)", label="role")
    exclude: str | list[str] | None = option(None, "module names or regex to leave alone")
    layers: list[int] | None = option(None, "only these layer indices (PEFT's layers_to_transform)")
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(8.0, "LoRA alpha; scale = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = option(0.0, "dropout on the branch input, active in train mode only")
    rslora: bool = option(False, "rank-stabilized scaling alpha / sqrt(r)")
    init: Literal["kaiming", "gaussian"] = option("kaiming", "A's init: kaiming (PEFT default, B = 0) or gaussian",
                                                 label="LoRA init")
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
        for spec in (self.targets, self.exclude, *self.rank_pattern, *self.alpha_pattern):
            _check_regex(spec)

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
            chosen = [p for p in chosen if matches_module(p.path, self.targets)]
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
            chosen = [p for p in chosen if not matches_module(p.path, self.exclude)]
        if self.layers is not None:
            chosen = [p for p in chosen if p.layer in set(self.layers)]
        if not chosen:
            raise RewriteError("LoRA's exclude/layers filters leave no module to adapt; loosen them")
        return chosen

    def _rank_alpha(self, path: str) -> tuple[int, float]:
        return _pattern_value(path, self.rank_pattern, self.rank), _pattern_value(path, self.alpha_pattern, self.alpha)

    def _scale(self, rank: int, alpha: float) -> float:
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def scale_for(self, path: str) -> float:
        """The branch multiplier this pass gives the module at `path` (adapter files fold it into B)."""
        return self._scale(*self._rank_alpha(path))

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
        y = proj.node
        lora_dtype = tensor_at(gm, f"{proj.path}.lora_A.weight").dtype
        base_dtype = tensor_at(gm, proj.weight).dtype
        node = NodeBuilder(gm.graph, y, **{"pass": self.name, "target": proj.path})
        with gm.graph.inserting_before(y.next):
            x = proj.input
            if self.dropout > 0:
                x = node(aten.dropout.default, x, self.dropout, gm.training)
            x = node.to_dtype(x, base_dtype, lora_dtype)
            a_w = node.attr(f"{proj.path}.lora_A.weight")
            b_w = node.attr(f"{proj.path}.lora_B.weight")
            h = node(aten.linear.default, x, a_w)
            h = node(aten.linear.default, h, b_w)
            h = node(aten.mul.Tensor, h, scale)
            h = node.to_dtype(h, lora_dtype, base_dtype)
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
            "modules_to_save": info(gm).modules_to_save,
            "summary": f"LoRA on {len(paths)} modules ({_names(chosen)})",
        }
        return PassResult(gm, True)

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence["LoraPass"]) -> AdapterFiles:
        """One PEFT LoraConfig that reproduces every LoRA run, exactly per target, and the trainable tensors."""
        if len({r.rslora for r in runs}) > 1 or len({r.dropout for r in runs}) > 1:
            raise RewriteError("LoRA passes with different rslora or dropout settings cannot share one PEFT adapter file")
        present = set(info(gm).trainable)  # a folded branch is gone: its target is no longer in the adapter
        ranks = {path: rank for r in runs for path, rank in r.report["ranks"].items()
                 if f"{path}.lora_A.weight" in present}
        alphas = {path: alpha for r in runs for path, alpha in r.report["alphas"].items() if path in ranks}
        if not ranks:
            raise RewriteError("the graph's LoRA branches were folded into its weights, so it has no LoRA adapter "
                               "to save; save the graph with rewrite.save instead")
        rank, alpha = next(iter(ranks.values())), next(iter(alphas.values()))
        first = runs[0]
        config = {
            "peft_type": "LORA",
            "task_type": peft_task_type(gm),
            "base_model_name_or_path": info(gm).source,
            "r": rank,
            "lora_alpha": alpha,
            "lora_dropout": first.dropout,
            "use_rslora": first.rslora,
            "init_lora_weights": True if first.init == "kaiming" else first.init,
            "target_modules": sorted(ranks),
            "rank_pattern": {p: r for p, r in ranks.items() if r != rank},
            "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
            "fan_in_fan_out": any(r.report["fan_in_fan_out"] for r in runs),
            "bias": "none",
            "modules_to_save": info(gm).modules_to_save,
            "inference_mode": True,
        }
        return AdapterFiles(config, adapter_base(gm))

    @classmethod
    def from_adapter(cls, gm: fx.GraphModule, config: dict[str, Any], weights: dict[str, torch.Tensor],
                     origin: str) -> dict[str, str]:
        """The LoRA pass with the adapter's targets, ranks and alphas; every tensor by its PEFT key."""
        names = {_graph_name(key): key for key in weights}
        run = cls._from_config(config)
        run.modules_to_save = saved_modules(config, [name for name in names if ".lora_" not in name])
        Pipeline([run]).run(gm)
        return names

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> "LoraPass":
        init = config.get("init_lora_weights", True)
        return cls(
            targets=config["target_modules"],
            exclude=config.get("exclude_modules"),
            layers=config.get("layers_to_transform"),
            rank=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            rslora=config.get("use_rslora", False),
            init=init if isinstance(init, str) and init == "gaussian" else "kaiming",
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
        )

    @classmethod
    def adapter_slots(cls, gm: fx.GraphModule, runs: Sequence["LoraPass"]) -> list[Slot]:
        """Each branch's A `[rank, in]` and B `[out, rank]`; B's slot carries the branch's scale."""
        present = set(info(gm).trainable)  # a folded branch is gone: nothing of it is left to fill
        folded = [path for run in runs for path in run.report["targets"] if f"{path}.lora_A.weight" not in present]
        if folded:
            raise RewriteError(f"the graph's LoRA branches ({folded[0]}, ...) were folded into its weights, so it has "
                               "no adapter parameters to expose as slots; adapter slots need the unfolded graph "
                               "(export it before rewrite fold)")
        slots = []
        for run in runs:
            for path in run.report["targets"]:
                a, b = tensor_at(gm, f"{path}.lora_A.weight"), tensor_at(gm, f"{path}.lora_B.weight")
                slots.append(Slot(f"{path}.lora_A.weight", (RANK, a.shape[1]), dtype_name(a), "lora_A"))
                slots.append(Slot(f"{path}.lora_B.weight", (b.shape[0], RANK), dtype_name(b), "lora_B",
                                  run.scale_for(path)))
        return slots

    @classmethod
    def prepare_slots(cls, gm: fx.GraphModule, runs: Sequence["LoraPass"]) -> None:
        """Every branch's `* scale` node goes: B's slot carries the scale."""
        for add in [n for n in gm.graph.nodes if tag(n).get("lora_add")]:
            node = add.args[1]
            while node.target is not aten.mul.Tensor:
                node = node.args[0]
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)

    @classmethod
    def slot_values(cls, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's A and B (scaled as the branch scales it) and trained head under the graph's names."""
        lora = cls._from_config(config)
        values = {}
        for key, value in weights.items():
            name = _graph_name(key).replace(".modules_to_save.", ".")
            if name.endswith(".lora_B.weight"):
                value = value.float() * lora.scale_for(name.removesuffix(".lora_B.weight"))
            values[name] = value
        return values

    @classmethod
    def fold(cls, gm: fx.GraphModule, runs: Sequence["LoraPass"]) -> Folded | None:
        """Merges and erases every LoRA branch; the fold report lists their module paths under `folded`."""
        folded = merge_branches(gm, cls.name)
        return Folded("folded", folded, f"{len(folded)} LoRA branches") if folded else None


def _graph_name(key: str) -> str:
    """A PEFT adapter key as the graph's tensor name."""
    return key.removeprefix(PREFIX).replace(".default.", ".")


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
