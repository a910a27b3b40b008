"""The project's IR: an unlifted `torch.fx.GraphModule` whose `train()`/`eval()` rewrite the graph,
and `GraphInfo`, the typed record of what the graph is and what its passes made of it.

`torch.export`'s unlifted module refuses `train()`; ours accepts it and rewrites the mode flags baked
into the graph (see `rewrite.graph.modes`), so a captured graph trains like any `nn.Module`.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from rewrite.errors import RewriteError


def deep_copy(value):
    """`copy.deepcopy` of a graph or graph module, without pytree's LeafSpec deprecation warning that copying
    an exported graph raises."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return copy.deepcopy(value)

META_KEY = "rewrite"


@dataclass(frozen=True)
class InputTemplate:
    """How text becomes the graph's input ids: a template (`rewrite.text.templates`) and the ids of its prompt slots."""

    source: str
    placeholder_ids: tuple[int, ...]


@dataclass(frozen=True)
class LossHead:
    """The output head `chunked_loss` cut from the logits: the loss applies it (tensor names; `[in, out]` when
    transposed)."""

    weight: str
    bias: str | None
    transposed: bool
    path: str


@dataclass(slots=True)
class GraphInfo:
    """What a graph is and what its passes made of it. Passes write it; training, adapters, export and
    archives read it, so none of them needs to know which pass did what.

    `history` holds one record per pass run: `{"pass": name, "options": {...}, "report": {...}}`.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    source: str | None = None  # the model directory it was captured from
    task: str | None = None  # causal-lm, masked-lm, seq-cls or feature-extraction
    config: Any = None  # the Hugging Face config (label names travel in its id2label)
    model_class: str | None = None  # the captured module's class, named in messages where no config is
    tokenizer: Any = None
    input_names: list[str] | None = None  # the graph's inputs, in order
    meta_device: bool = False  # captured without weights
    trainable: list[str] = field(default_factory=list)  # parameter names the passes made trainable
    modules_to_save: list[str] | None = None  # modules trained and saved in full (PEFT's modules_to_save)
    prepended_positions: int = 0  # positions sequence outputs hold before the input's own
    template: InputTemplate | None = None  # text is encoded through this template
    label_words: dict[str, Any] | None = None  # a verbalizer head's labels, words, token ids and mask id
    untrained: list[str] = field(default_factory=list)  # modules initialized fresh at capture (a new head), until trained
    loss_head: LossHead | None = None  # the head `chunked_loss` cut from the logits
    cache: Any = None  # a graph over a KV cache: its layout (`rewrite.runtime.cache.CacheLayout`)

    OBJECTS = ("config", "tokenizer", "cache")  # not JSON: archives store the first two as Hugging Face directories

    @property
    def position_limit(self) -> int | None:
        """The longest sequence the model's learned or rotary positions allow (`max_position_embeddings`,
        GPT-2's `n_positions`); None when the config sets none (alibi and other unbounded schemes)."""
        for key in ("max_position_embeddings", "n_positions"):
            if getattr(self.config, key, None):
                return int(getattr(self.config, key))
        return None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GraphInfo":
        """From an archive header or a plain dict (other keys are not the graph's info)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {**(values.get("extra") or {}), **values}  # archives from before a field was typed kept it in extra
        known = {k: v for k, v in values.items() if k in names}
        if isinstance(known.get("template"), dict):
            template = known["template"]
            known["template"] = InputTemplate(template["source"], tuple(template["placeholder_ids"]))
        if isinstance(known.get("loss_head"), dict):
            known["loss_head"] = LossHead(**known["loss_head"])
        known["trainable"] = list(known.get("trainable") or [])
        known["untrained"] = list(known.get("untrained") or [])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """Every field but the Hugging Face objects, as JSON-able values (the archive header)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.OBJECTS}
        if self.template is not None:
            values["template"] = {"source": self.template.source, "placeholder_ids": list(self.template.placeholder_ids)}
        if self.loss_head is not None:
            values["loss_head"] = dataclasses.asdict(self.loss_head)
        return values


class RewriteGraph(fx.GraphModule):
    """A captured graph. `gm.info` (`gm.meta["rewrite"]`) is its `GraphInfo`: config, tokenizer, task, pass history."""

    def train(self, mode: bool = True) -> "RewriteGraph":
        from rewrite.graph.modes import set_graph_training

        nn.Module.train(self, mode)
        set_graph_training(self, mode)
        return self

    @property
    def info(self) -> GraphInfo:
        return info(self)


def wrap(root: nn.Module, graph: fx.Graph, graph_info: GraphInfo | dict[str, Any], training: bool) -> RewriteGraph:
    """Builds a RewriteGraph over `graph`, taking the attributes it reads from `root`."""
    gm = RewriteGraph(root, graph)
    gm.meta[META_KEY] = graph_info if isinstance(graph_info, GraphInfo) else GraphInfo.from_dict(graph_info)
    gm.train(training)
    return gm


def info(gm: fx.GraphModule) -> GraphInfo:
    """The `GraphInfo` of any GraphModule (created empty if missing)."""
    current = gm.meta.get(META_KEY)
    if not isinstance(current, GraphInfo):
        current = gm.meta[META_KEY] = GraphInfo.from_dict(current or {})
    return current


def add_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Registers `module` at dotted `path`, creating empty parents (register before the get_attr node)."""
    parent_path, _, name = path.rpartition(".")
    parent = gm
    for part in parent_path.split(".") if parent_path else []:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(name, module)


def owner_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds tensor `name` under `root` (created empty if missing) and the tensor's attribute
    name: where a tree rebuilt from tensors by name registers each."""
    parent_path, _, leaf = name.rpartition(".")
    if parent_path:
        try:
            return root.get_submodule(parent_path), leaf
        except AttributeError:
            add_submodule(root, parent_path, nn.Module())
            return root.get_submodule(parent_path), leaf
    return root, leaf


def remove_submodule(gm: fx.GraphModule, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    delattr(parent, name)


def remove_tensor(gm: fx.GraphModule, name: str) -> None:
    """Removes the parameter or buffer `name`, and the modules left holding no tensor (LoRA's `lora_A` Linear)."""
    path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(path) if path else gm
    delattr(owner, attr)
    while path and next(owner.parameters(), None) is None and next(owner.buffers(), None) is None:
        remove_submodule(gm, path)
        path = path.rpartition(".")[0]
        owner = gm.get_submodule(path) if path else gm


def tensor_at(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a `get_attr` target names."""
    module_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(module_path) if module_path else gm
    return getattr(owner, name)


def copy_meta(src: fx.Node, dst: fx.Node, **extra: Any) -> None:
    """New nodes carry no metadata: give them the module stack of the node they stand beside."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if extra:
        dst.meta.setdefault(META_KEY, {}).update(extra)


def tag(node: fx.Node) -> dict[str, Any]:
    """The rewrite tag a pass put on a node it created (empty for base nodes)."""
    return node.meta.get(META_KEY, {})


def require_tokenizer(gm: fx.GraphModule, needed_for: str):
    """The graph's tokenizer; without one, an error that says what needed it (`needed_for`: "to encode text")."""
    tokenizer = info(gm).tokenizer
    if tokenizer is None:
        raise RewriteError(f"the graph has no tokenizer {needed_for}; capture it from a Hugging Face model "
                           "directory that holds tokenizer files")
    return tokenizer
