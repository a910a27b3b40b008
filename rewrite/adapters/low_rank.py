"""Low-rank adapters, PEFT's LORA family: `y = W0 x + b + scale * B(A(dropout(x)))`, the base every variant
builds on (LoRA itself, DoRA, PiSSA/OLoRA initializations).

`LowRank` holds what the variants share: PEFT's options (rank, alpha, rsLoRA, dropout, rank and alpha
patterns, modules to save) on top of the shared target rules, the branch's weights at PEFT's names
`<module path>.lora_A.weight` / `.lora_B.weight`, PEFT's LORA adapter files in both directions, adapter
slots (A `[rank, in]`, B `[out, rank]` carrying the scale) and the fold through branch sites. A variant
overrides only what differs: `initialize` (its A, B and base), `insert` (its branch), `merge` (its fold),
`extra_tensors` and `peft_fields` (what its adapter files add, e.g. DoRA's `use_dora` and magnitudes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapters import branches, embedding
from rewrite.adapters.embedding import Lookup
from rewrite.adapters.peft_files import PREFIX, adapter_base, peft_task_type, saved_modules
from rewrite.adapters.slots import Slot, dtype_name
from rewrite.runtime.slots import RANK
from rewrite.adapters.targets import Targeting, check_regex, pattern_value, short_names
from rewrite.errors import RewriteError
from rewrite.graph.ir import add_submodule, info, tensor_at
from rewrite.graph.params import mark_trainable, trainable_heads
from rewrite.graph.pipeline import AdapterFiles, Folded, Pass, Pipeline, option, pass_class, registered
from rewrite.graph.query import GraphQuery, Projection, weight_dtype

aten = torch.ops.aten


def lora_names(path: str) -> tuple[str, str]:
    """PEFT's names of a branch's A and B weights."""
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


A_SUFFIXES, B_SUFFIXES = zip(lora_names(""), embedding.factor_names(""))  # A's and B's name ends: linear, lookup
BASE_COPY = ".base_layer."  # PEFT saves a targeted embed_tokens/lm_head's base tensors as `<module>.base_layer.<name>`


def factor_names(gm: fx.GraphModule, path: str) -> tuple[str, str]:
    """A branch's A and B: `lora_names`, or on an embedding lookup PEFT's `lora_embedding_A` / `_B`."""
    names = embedding.factor_names(path)
    return names if _holds(gm, names[0]) else lora_names(path)


def _holds(gm: fx.GraphModule, name: str) -> bool:
    try:
        tensor_at(gm, name)
    except AttributeError:
        return False
    return True


def graph_name(key: str) -> str:
    """A PEFT adapter key as the graph's tensor name."""
    return key.removeprefix(PREFIX).replace(".default.", ".")


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass
class LowRank(Targeting, Pass):
    """A PEFT LORA-type method; a subclass registers it under its own name."""

    peft_types = ("LORA",)
    peft_flags: ClassVar[dict[str, Any]] = {"use_dora": False}  # config fields that pick this variant
    adapts_lookups: ClassVar[bool] = False  # a variant whose branch and merge handle embedding `Lookup`s sets it
    peft_inits: ClassVar[tuple[str, ...]] = ()  # `init_lora_weights` strings (prefixes) that only this variant loads

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
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise RewriteError(f"{self.title} {name} {getattr(self, name)!r} is not a mapping; write JSON like "
                                   '{"query": 16}')
        for rank in [self.rank, *self.rank_pattern.values()]:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise RewriteError(f"{self.title} rank {rank!r} is not allowed; use a whole number of at least 1")
        for alpha in [self.alpha, *self.alpha_pattern.values()]:
            if not _positive_number(alpha):
                raise RewriteError(f"{self.title} alpha {alpha!r} is not allowed; use a finite number greater than 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise RewriteError(f"{self.title} dropout {self.dropout!r} is not allowed; use a probability in [0, 1)")
        for spec in (*self.rank_pattern, *self.alpha_pattern):
            check_regex(spec, self.title)

    # ---- what a variant may override

    def initialize(self, gm: fx.GraphModule, proj: Projection, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A `[rank, in]` and B `[out, rank]` (PEFT's init: A kaiming-uniform or gaussian, B zero); float32 on
        a half-precision base. A variant that changes the base (PiSSA) writes it here too."""
        base_dtype, device = weight_dtype(gm, proj)
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        lora_a = nn.Linear(proj.in_features, rank, bias=False, device=device, dtype=dtype)
        lora_b = nn.Linear(rank, proj.out_features, bias=False, device=device, dtype=dtype)
        if self.init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        return lora_a.weight.data, lora_b.weight.data

    def insert(self, gm: fx.GraphModule, proj: Projection, scale: float, record: dict[str, Any]) -> None:
        """LoRA's branch: `y + scale * B(A(dropout(x)))`."""
        y = proj.node
        node = branches.builder(gm, y, self.name, proj.path)
        with gm.graph.inserting_before(y.next):
            out = node(aten.add.Tensor, y, self.low_rank(gm, node, proj, scale))
        self.attach(proj, out, scale, record)

    @classmethod
    def merge(cls, gm: fx.GraphModule, site: branches.BranchSite) -> dict[str, torch.Tensor]:
        """`W0 + scale * B @ A` in fp32 (transposed for `[in, out]` weights)."""
        return {site.weight: tensor_at(gm, site.weight).detach().float() + cls.delta(gm, site)}

    @classmethod
    def extra_tensors(cls, path: str) -> list[str]:
        """A variant's branch tensors beside A and B (trained, saved, slotted and removed with them)."""
        return []

    # ---- shared machinery

    def branch_input(self, gm: fx.GraphModule, node, proj: Projection) -> fx.Node:
        """`dropout(x)` (active in train mode only), or `x` without dropout."""
        if self.dropout > 0:
            return node(aten.dropout.default, proj.input, self.dropout, gm.training)
        return proj.input

    def low_rank(self, gm: fx.GraphModule, node, proj: Projection, scale: float, x: fx.Node | None = None) -> fx.Node:
        """`scale * B(A(x))` in the base's dtype (the branch computes in its own); `x` defaults to the
        `branch_input` (a variant that reads the dropped input twice, DoRA, passes its own)."""
        if isinstance(proj, Lookup):
            return embedding.branch(node, proj, scale, tensor_at(gm, proj.weight).dtype)
        a_name, b_name = lora_names(proj.path)
        lora_dtype, base_dtype = tensor_at(gm, a_name).dtype, weight_dtype(gm, proj)[0]
        x = self.branch_input(gm, node, proj) if x is None else x
        x = node.to_dtype(x, base_dtype, lora_dtype)
        h = node(aten.linear.default, x, node.attr(a_name))
        branches.mark_down(h)
        h = node(aten.linear.default, h, node.attr(b_name))
        h = node(aten.mul.Tensor, h, scale)
        return node.to_dtype(h, lora_dtype, base_dtype)

    def attach(self, proj: Projection, out: fx.Node, scale: float, record: dict[str, Any], keep=()) -> None:
        """`out` (first argument the base output) replaces the projection's output everywhere but in `out` and
        `keep` (the branch's nodes that read the base output themselves, as DoRA's do)."""
        branches.mark_output(out, proj.weight, proj.transposed, scale, **record)
        spared = {out, *keep}
        proj.node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in spared)

    @classmethod
    def delta(cls, gm: fx.GraphModule, site: branches.BranchSite) -> torch.Tensor:
        """`scale * B @ A` in fp32, laid out like the base weight."""
        a_name, b_name = factor_names(gm, site.path)
        delta = site.scale * (tensor_at(gm, b_name).detach().float() @ tensor_at(gm, a_name).detach().float())
        return delta.T if site.transposed else delta

    @classmethod
    def branch_tensors(cls, gm: fx.GraphModule, path: str) -> list[str]:
        return [*factor_names(gm, path), *cls.extra_tensors(path)]

    def rank_alpha(self, path: str) -> tuple[int, float]:
        return pattern_value(path, self.rank_pattern, self.rank), pattern_value(path, self.alpha_pattern, self.alpha)

    def scale_of(self, rank: int, alpha: float) -> float:
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def scale_for(self, path: str) -> float:
        """The branch multiplier this pass gives the module at `path` (adapter files fold it into B)."""
        return self.scale_of(*self.rank_alpha(path))

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        chosen = self.select(GraphQuery(gm))
        heads = trainable_heads(gm, self.modules_to_save)
        first = {p.path: p for p in reversed(chosen)}
        paths = list(dict.fromkeys(p.path for p in chosen))
        plan = {path: self.rank_alpha(path) for path in paths}
        self._check_fits(gm, [first[path] for path in paths], plan)
        for path in paths:
            self._add_factors(gm, first[path], *plan[path])
        for proj in chosen:
            rank, alpha = plan[proj.path]
            self.insert(gm, proj, self.scale_of(rank, alpha), {"rank": rank, "alpha": alpha})
        mark_trainable(gm, [name for path in paths for name in self.branch_tensors(gm, path)] + heads)
        self.report = {"targets": paths, "summary": f"{self.title} on {len(paths)} modules ({short_names(chosen)})"}
        return PassResult(gm, True)

    def candidates(self, query: GraphQuery) -> list[Projection]:
        """Targets may name embedding lookups too (PEFT's `lora.Embedding`)."""
        return query.projections + embedding.lookups(query.gm)

    def _add_factors(self, gm: fx.GraphModule, proj: Projection, rank: int, alpha: float) -> None:
        """A and B where PEFT keeps them: `lora_A`/`lora_B` Linears, or an embedding's own parameters."""
        if isinstance(proj, Lookup):
            embedding.register(gm, proj.path, *embedding.initialize(tensor_at(gm, proj.weight), proj, rank))
            return
        a, b = self.initialize(gm, proj, rank, self.scale_of(rank, alpha))
        for name, weight in zip(lora_names(proj.path), (a, b)):
            add_submodule(gm, name.removesuffix(".weight"), _weight_holder(weight))

    def _check_fits(self, gm: fx.GraphModule, projections: list[Projection], plan: dict[str, tuple[int, float]]) -> None:
        """Every error is raised before the graph changes."""
        for proj in projections:
            if isinstance(proj, Lookup) and not self.adapts_lookups:
                raise RewriteError(f"{self.title} on the embedding {proj.path} is not supported; put LoRA on it, or "
                                   f"target linear modules with {self.title}")
            if isinstance(proj, Lookup):
                embedding.check(proj)
            limit = min(proj.in_features, proj.out_features)
            if plan[proj.path][0] > limit:
                raise RewriteError(f"{self.title} rank {plan[proj.path][0]} is too large for {proj.path} "
                                   f"({proj.in_features} -> {proj.out_features}); use at most {limit}")
            existing = next((s for s in branches.sites(gm) if s.path == proj.path), None)
            if existing is not None:
                raise RewriteError(f"{proj.path} already has a {pass_class(existing.method).title} adapter; fold it "
                                   "first or start from the base graph")

    # ---- PEFT adapter files

    @classmethod
    def _present(cls, gm: fx.GraphModule) -> dict[str, branches.BranchSite]:
        return branches.by_path(branches.sites(gm, cls.name))

    @classmethod
    def peft_fields(cls, gm: fx.GraphModule, runs: Sequence["LowRank"]) -> dict[str, Any]:
        """Config fields beside LoRA's (DoRA's `use_dora`)."""
        return dict(cls.peft_flags)

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence["LowRank"]) -> AdapterFiles:
        """One PEFT LoraConfig that reproduces every run, exactly per target, and the trainable tensors."""
        if len({r.rslora for r in runs}) > 1 or len({r.dropout for r in runs}) > 1:
            raise RewriteError(f"{cls.title} passes with different rslora or dropout settings cannot share one PEFT "
                               "adapter file")
        present = cls._present(gm)  # a folded branch is gone: its target is no longer in the adapter
        if not present:
            raise RewriteError(f"the graph's {cls.title} branches were folded into its weights, so it has no adapter "
                               "to save; save the graph with rewrite.save instead")
        ranks = {path: site.record.get("rank") or tensor_at(gm, factor_names(gm, path)[0]).shape[0]
                 for path, site in present.items()}
        alphas = {path: site.record.get("alpha") or site.scale * (math.sqrt(ranks[path]) if runs[0].rslora else ranks[path])
                  for path, site in present.items()}
        rank, alpha, first = next(iter(ranks.values())), next(iter(alphas.values())), runs[0]
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
            "fan_in_fan_out": any(site.transposed and not _looks_up(site) for site in present.values()),
            "bias": "none",
            "modules_to_save": info(gm).modules_to_save,
            "inference_mode": True,
            **cls.peft_fields(gm, runs),
        }
        return AdapterFiles(config, adapter_base(gm))

    @classmethod
    def accepts(cls, config: dict[str, Any]) -> bool:
        """Whether this variant applies the PEFT adapter `config`: its `peft_flags` match, and its `init_lora_weights`
        is one of the variant's `peft_inits` (a variant without any: one no variant claims, so an adapter trained on
        a base PiSSA changed is never read as plain LoRA)."""
        init = config.get("init_lora_weights", True)
        flags = all(bool(config.get(key, False)) == bool(value) for key, value in cls.peft_flags.items())
        if cls.peft_inits:
            return flags and _claims(cls.peft_inits, init)
        return flags and not any(_claims(c.peft_inits, init) for c in registered() if issubclass(c, LowRank))

    @classmethod
    def from_adapter(cls, gm: fx.GraphModule, config: dict[str, Any], weights: dict[str, torch.Tensor],
                     origin: str) -> dict[str, str]:
        """The pass with the adapter's targets, ranks and alphas; every tensor by its PEFT key."""
        names = {graph_name(key): key for key in weights}
        run = cls.from_config(config)
        branch = {name for path in run_paths(names)
                  for name in (*lora_names(path), *embedding.factor_names(path), *cls.extra_tensors(path))}
        bases = {name for name in names if BASE_COPY in name}
        run.modules_to_save = saved_modules(config, [name for name in names if name not in branch | bases])
        Pipeline([run]).run(gm)
        present = cls._present(gm)
        return {_base_tensor(present, name): key for name, key in names.items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LowRank":
        return cls(
            targets=config["target_modules"],
            exclude=config.get("exclude_modules"),
            layers=config.get("layers_to_transform"),
            rank=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            rslora=config.get("use_rslora", False),
            init=cls.peft_init(config.get("init_lora_weights", True)),
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
        )

    @classmethod
    def peft_init(cls, value: Any) -> str:
        """The `init` option for PEFT's `init_lora_weights` value."""
        return "gaussian" if value == "gaussian" else "kaiming"

    # ---- adapter slots and fold

    @classmethod
    def adapter_slots(cls, gm: fx.GraphModule, runs: Sequence["LowRank"]) -> list[Slot]:
        """Each branch's A `[rank, in]` (no adapter: rank 0) and B `[out, rank]` carrying the branch's scale."""
        present = cls._present(gm)
        if not present:  # fold merges every branch of a method at once
            folded = runs[0].report["targets"][0]
            raise RewriteError(f"the graph's {cls.title} branches ({folded}, ...) were folded into its weights, so it has "
                               "no adapter parameters to expose as slots; adapter slots need the unfolded graph (export "
                               "it before rewrite fold)")
        slots = []
        for path, site in present.items():
            a_name, b_name = factor_names(gm, path)
            a, b = tensor_at(gm, a_name), tensor_at(gm, b_name)
            slots.append(Slot(a_name, (RANK, a.shape[1]), dtype_name(a), "zeros", group=path))
            slots.append(Slot(b_name, (b.shape[0], RANK), dtype_name(b), "zeros", site.scale, group=path))
        return slots

    @classmethod
    def prepare_slots(cls, gm: fx.GraphModule, runs: Sequence["LowRank"]) -> None:
        """Every branch's `* scale` node goes: B's slot carries the scale."""
        for site in branches.sites(gm, cls.name):
            b_name = factor_names(gm, site.path)[1]
            node = next(n for n in site.output.graph.nodes if n.op == "get_attr" and n.target == b_name
                        and site.output in _downstream(n))
            scale = next(n for n in _downstream(node) if n.target is aten.mul.Tensor and n.args[1] == site.scale)
            scale.replace_all_uses_with(scale.args[0])
            gm.graph.erase_node(scale)

    @classmethod
    def slot_values(cls, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors under the graph's names, B scaled as its slot carries it (the copy of a base embedding
        PEFT saves beside an embedding branch is no slot: the model's own base serves)."""
        run = cls.from_config(config)
        values = {}
        for key, value in weights.items():
            name = graph_name(key).replace(".modules_to_save.", ".")
            if BASE_COPY in name:
                continue
            for b_suffix in B_SUFFIXES:
                if name.endswith(b_suffix):
                    value = value.float() * run.scale_for(name.removesuffix(b_suffix))
            values[name] = value
        return values

    @classmethod
    def fold(cls, gm: fx.GraphModule, runs: Sequence["LowRank"]) -> Folded | None:
        """Merges and erases every branch; the fold report lists their module paths under `folded`."""
        folded = branches.fold(gm, cls.name, cls.merge, lambda path: cls.branch_tensors(gm, path))
        return Folded("folded", folded, f"{len(folded)} {cls.title} branches") if folded else None


def _claims(prefixes: tuple[str, ...], init: Any) -> bool:
    return isinstance(init, str) and init.lower().startswith(prefixes)


def run_paths(names) -> list[str]:
    """The module paths an adapter's tensor names hold branches for."""
    return list(dict.fromkeys(name.removesuffix(suffix) for name in names
                              for suffix in A_SUFFIXES if name.endswith(suffix)))


def _looks_up(site: branches.BranchSite) -> bool:
    """Whether the branch adapts an embedding lookup (its `[vocab, dim]` weight is no fan-in-fan-out layer)."""
    return site.base.target is aten.embedding.default


def _base_tensor(present: dict[str, branches.BranchSite], name: str) -> str:
    """The graph tensor an adapter's `<module>.base_layer.<weight or bias>` (PEFT's copy of a targeted embedding or
    LM head, which loading writes into the base as PEFT does) stands for: the adapted module's own."""
    path, _, leaf = name.rpartition(BASE_COPY)
    return f"{path}.{leaf}" if path in present else name


def _downstream(node: fx.Node) -> list[fx.Node]:
    """The nodes reached from `node` through single-use chains (a branch's own nodes)."""
    found, current = [], node
    while len(current.users) == 1:
        current = next(iter(current.users))
        found.append(current)
    return found


def _weight_holder(weight: torch.Tensor) -> nn.Module:
    """A bias-free Linear holding `weight`, as PEFT's `lora_A`/`lora_B` modules do."""
    out_features, in_features = weight.shape
    module = nn.Linear(in_features, out_features, bias=False, device="meta")
    module.weight = nn.Parameter(weight)
    return module
