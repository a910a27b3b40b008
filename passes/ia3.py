"""IA³ (Liu et al., 2022), PEFT's IA3: learned vectors `<module>.ia3_l`, ones at init, that rescale activations:
`y = (W x + b) * l` (`[out, 1]`) on keys and values, `y = W (x * l) + b` (`[1, in]`) on feed-forward modules.

Targets follow the shared rules; the default is structural, the k, v and down roles (PEFT's own default on
LLaMA, Mistral, GPT-2, BLOOM, GPT-NeoX, Falcon, T5; PEFT's table picks other modules on Qwen2, Gemma, OPT and
BERT, which `targets` and `feedforward` reproduce). Feed-forward modules are the targets with the down role,
or `feedforward`, matched as PEFT matches `feedforward_modules`. Adapter files are PEFT's IA3 both ways; fold
scales the weight's rows and bias, or its columns; slots default to ones, and mixed batches scale per row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapters import branches
from rewrite.adapters.low_rank import graph_name
from rewrite.adapters.peft_files import adapter_base, peft_task_type, saved_modules
from rewrite.adapters.slots import Slot, dtype_name
from rewrite.adapters.targets import Targeting, check_regex, short_names
from rewrite.errors import RewriteError
from rewrite.graph.ir import add_submodule, info, tensor_at
from rewrite.graph.params import mark_trainable, trainable_heads
from rewrite.graph.pipeline import AdapterFiles, Folded, Pass, Pipeline, option, pass_class, register
from rewrite.graph.query import GraphQuery, Projection, weight_dtype

aten = torch.ops.aten


def vector_name(path: str) -> str:
    """PEFT's name of a module's scaling vector."""
    return f"{path}.ia3_l"


def _bias(proj: Projection) -> str | None:
    """The bias the projection adds itself (`linear(x, W, b)`, Conv1D's `addmm(b, x, W)`): IA3 scales it too."""
    args = proj.node.args
    bias = args[2] if proj.node.target is aten.linear.default and len(args) > 2 else \
        args[0] if proj.node.target is aten.addmm.default else None
    return bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None


def _register(gm: fx.GraphModule, path: str, vector: torch.Tensor) -> None:
    try:
        owner = gm.get_submodule(path)
    except AttributeError:
        add_submodule(gm, path, nn.Module())
        owner = gm.get_submodule(path)
    owner.register_parameter("ia3_l", nn.Parameter(vector))


@register
@dataclass
class IA3Pass(Targeting, Pass):
    """Scaling vectors on keys, values and feed-forward modules."""

    name = "ia3"
    title = "IA³"
    peft_types = ("IA3",)
    default_roles: ClassVar[tuple[str, ...]] = ("k", "v", "down")

    feedforward: str | list[str] | None = option(
        None, "modules scaled at their input, like PEFT's feedforward_modules (a regex, or names a module path ends "
              "with); default: the targets with the down role")
    modules_to_save: list[str] | None = option(
        None, "modules trained and saved in full (default: the head of a seq-cls graph, like PEFT)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_regex(self.feedforward, self.title)

    def is_feedforward(self, path: str, roles: dict[str, set[str]]) -> bool:
        if self.feedforward is None:
            return "down" in roles.get(path, ())
        if isinstance(self.feedforward, str):
            return re.fullmatch(self.feedforward, path) is not None
        return any(path.endswith(name) for name in self.feedforward)  # PEFT's rule: no dot boundary

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm, query = graph_module, GraphQuery(graph_module)
        chosen = self.select(query)
        paths = list(dict.fromkeys(p.path for p in chosen))
        feedforward = {path for path in paths if self.is_feedforward(path, query.roles)}
        if self.feedforward and not feedforward:
            raise RewriteError(f"{self.title} feedforward {self.feedforward!r} matches none of its targets "
                               f"({short_names(chosen)}); name modules among the targets")
        existing = branches.by_path(branches.sites(gm))
        taken = next((path for path in paths if path in existing), None)
        if taken is not None:
            raise RewriteError(f"{taken} is already adapted by {pass_class(existing[taken].method).title}; fold it "
                               "first or start from the base graph")
        heads = trainable_heads(gm, self.modules_to_save)
        first = {p.path: p for p in reversed(chosen)}
        for path in paths:
            proj = first[path]
            dtype, device = weight_dtype(gm, proj)
            shape = (1, proj.in_features) if path in feedforward else (proj.out_features, 1)
            _register(gm, path, torch.ones(shape, dtype=dtype, device=device))
        for proj in chosen:
            self.insert(gm, proj, proj.path in feedforward)
        mark_trainable(gm, [vector_name(path) for path in paths] + heads)
        self.report = {"targets": paths, "feedforward": sorted(feedforward),
                       "summary": f"{self.title} on {len(paths)} modules ({short_names(chosen)}), "
                                  f"{len(feedforward)} scaled at their input"}
        return PassResult(gm, True)

    def insert(self, gm: fx.GraphModule, proj: Projection, feedforward: bool) -> None:
        """`x * l` into the projection (feed-forward), or `y * l` for its output; `l` is read flat."""
        y = proj.node
        node = branches.builder(gm, y, self.name, proj.path)
        with gm.graph.inserting_before(y if feedforward else y.next):
            vector = node(aten.view.default, node.attr(vector_name(proj.path)), [-1])
            out = node(aten.mul.Tensor, proj.input if feedforward else y, vector)
        branches.mark_output(out, proj.weight, proj.transposed, 1.0, feedforward=feedforward,
                             bias=None if feedforward else _bias(proj))
        if feedforward:
            y.replace_input_with(proj.input, out)
        else:
            y.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)

    @classmethod
    def merge(cls, gm: fx.GraphModule, site: branches.BranchSite) -> dict[str, torch.Tensor]:
        """The weight's input columns (feed-forward) or output rows and bias, times `l`, in fp32."""
        vector = tensor_at(gm, vector_name(site.path)).detach().float().flatten()
        rows = site.record["feedforward"] == site.transposed  # rows are outputs of `[out, in]`, inputs of `[in, out]`
        merged = {site.weight: tensor_at(gm, site.weight).detach().float() * (vector[:, None] if rows else vector)}
        if site.record["bias"] is not None:
            merged[site.record["bias"]] = tensor_at(gm, site.record["bias"]).detach().float() * vector
        return merged

    # ---- PEFT adapter files, slots and fold

    @classmethod
    def _present(cls, gm: fx.GraphModule) -> dict[str, branches.BranchSite]:
        return branches.by_path(branches.sites(gm, cls.name))

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence["IA3Pass"]) -> AdapterFiles:
        """PEFT's IA3Config naming every adapted module by its path, so PEFT adapts exactly these."""
        present = cls._present(gm)
        if not present:
            raise RewriteError(f"the graph's {cls.title} vectors were folded into its weights, so it has no adapter "
                               "to save; save the graph with rewrite.save instead")
        config = {
            "peft_type": "IA3",
            "task_type": peft_task_type(gm),
            "base_model_name_or_path": info(gm).source,
            "target_modules": sorted(present),
            "feedforward_modules": sorted(path for path, site in present.items() if site.record["feedforward"]),
            "exclude_modules": None,
            "fan_in_fan_out": any(site.transposed for site in present.values()),
            "init_ia3_weights": True,
            "modules_to_save": info(gm).modules_to_save,
            "inference_mode": True,
        }
        return AdapterFiles(config, adapter_base(gm))

    @classmethod
    def from_adapter(cls, gm: fx.GraphModule, config: dict[str, Any], weights: dict[str, torch.Tensor],
                     origin: str) -> dict[str, str]:
        names = {graph_name(key): key for key in weights}
        run = cls(targets=config["target_modules"], exclude=config.get("exclude_modules"),
                  feedforward=config.get("feedforward_modules"))
        run.modules_to_save = saved_modules(config, [name for name in names if not name.endswith(".ia3_l")])
        Pipeline([run]).run(gm)
        return names

    @classmethod
    def adapter_slots(cls, gm: fx.GraphModule, runs: Sequence["IA3Pass"]) -> list[Slot]:
        """Each vector, `ones` when no adapter fills it."""
        vectors = {name: tensor_at(gm, name) for name in map(vector_name, cls._present(gm))}
        return [Slot(name, tuple(v.shape), dtype_name(v), "ones") for name, v in vectors.items()]

    @classmethod
    def slot_values(cls, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {graph_name(key).replace(".modules_to_save.", "."): value for key, value in weights.items()}

    @classmethod
    def fold(cls, gm: fx.GraphModule, runs: Sequence["IA3Pass"]) -> Folded | None:
        folded = branches.fold(gm, cls.name, cls.merge, lambda path: [vector_name(path)])
        return Folded("scaled", folded, f"{len(folded)} {cls.title} vectors") if folded else None
