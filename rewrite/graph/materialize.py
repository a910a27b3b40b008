"""Loading a checkpoint into a graph captured on the meta device, one tensor at a time: how a model is quantized
while it loads, never holding its float weights all at once.

The graph was captured from a model whose parameters lived on the meta device and whose buffers were built for
real (`empty_model`), then quantized on the meta device (the packing runs on meta tensors and gives the buffers'
shapes). Each tensor is then read from the safetensors files alone: float parameters and buffers are copied in,
each quantized projection's float weight is read (transposed back to `[out, in]` for GPT-2's Conv1D), quantized
into the buffers its node reads (`quantized.fill`) and dropped, as is a quantized embedding table. Names map to
checkpoint keys as Hugging Face's loader maps them: the name itself or with the base model's prefix added or
removed, any name a tied tensor also goes by, and buffers the file does not hold (rotary `inv_freq`) as the model
built them.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
from pathlib import Path
from typing import Callable, Iterator

import safetensors
import torch
from torch import fx, nn

from rewrite.errors import RewriteError
from rewrite.graph import quantized
from rewrite.graph.archive import SAFETENSORS_DTYPES, safetensors_header, stored_tensor
from rewrite.graph.ir import tensor_at
from rewrite.graph.params import non_finite
from rewrite.graph.query import Projection, module_path

INDEX_FILE = "model.safetensors.index.json"
CHECK_CHUNK = 1 << 22  # elements checked for NaN at a time: the check's temporaries stay small beside the tensor


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside keep their buffers (small, and some, like rotary `inv_freq`, are in no checkpoint) and
    move each parameter to the meta device as it is registered, so no layer's float weights stay allocated."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(auto_class, config) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """`auto_class.from_config(config)` entirely on the meta device (what capture traces), and the buffers it built
    for real, by name."""
    with _parameters_on_meta():
        model = auto_class.from_config(config)
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers(remove_duplicate=False)}
    return model.to("meta"), buffers


def on_cpu(gm: fx.GraphModule) -> None:
    """A graph traced on the meta device names it where it creates tensors (`arange(..., device=meta)`): those
    now create them on the CPU, where the loaded weights are, as a graph captured from loaded weights does."""
    meta = torch.device("meta")
    swap = (lambda value: torch.device("cpu") if value == meta else value)
    for node in gm.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()


class Checkpoint:
    """The tensors of a model directory's safetensors files (sharded through `model.safetensors.index.json` or
    not), read one at a time; a file is open only while one tensor is read, so what was read is not kept mapped."""

    def __init__(self, path: Path):
        self.path = path
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
                self.files = {key: path / file for key, file in weight_map.items()}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise RewriteError(f"{str(index)!r} is not a safetensors index (JSON with a weight_map): {error}; "
                                   "save the model again with save_pretrained") from error
        else:
            self.files = {}
            for file in sorted(path.glob("*.safetensors")):
                with safetensors.safe_open(file, framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
        if not self.files:
            raise RewriteError(f"model directory {str(path)!r} holds no safetensors weights; quantizing while loading "
                               "reads *.safetensors files (save the model with safe_serialization)")

    def key_for(self, names: list[str], prefix: str) -> str | None:
        """The checkpoint's key for a tensor known by `names` (tied tensors have several), Hugging Face's way: as
        named, or with the base model's `prefix` added or removed."""
        keys = [key for name in names for key in ([name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
                                                  if prefix else [name])]
        return next((key for key in keys if key in self.files), None)

    def read(self, key: str) -> torch.Tensor:
        try:
            with safetensors.safe_open(self.files[key], framework="pt") as handle:
                return handle.get_tensor(key)
        except (OSError, safetensors.SafetensorError) as error:
            raise RewriteError(f"tensor {key!r} in {str(self.files[key])!r} could not be read: {error}") from error


def own_mappings(model: nn.Module, path: Path, prefix: str, refuse: Callable[[str], Exception]) -> set[str]:
    """Gives each parameter Hugging Face loaded from `path`'s safetensors files a mapping of the file of its own,
    once its values are checked finite (`refuse(name)` is raised otherwise) through another mapping, dropped at once;
    the names of the parameters it checked. Hugging Face maps every file whole: a check through those tensors would
    keep every page of the model resident, and a rank that keeps only its rows of each weight (FSDP) would hold every
    page it read until the whole file is released. A parameter whose dtype or shape is not the file's (converted
    while loading), or that the files do not hold, stays as loaded and unchecked."""
    if not (path / INDEX_FILE).is_file() and not any(path.glob("*.safetensors")):
        return set()
    checkpoint, headers, checked = Checkpoint(path), {}, set()
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    with contextlib.ExitStack() as files:
        for param, names in groups.values():
            key = checkpoint.key_for(names, prefix)
            if key is None:
                continue
            file = checkpoint.files[key]
            if file not in headers:  # each file opened once; a mapping outlives its handle
                handle = files.enter_context(open(file, "rb"))
                headers[file] = (handle, *safetensors_header(handle, 0, file.stat().st_size))
            handle, data, size, entries = headers[file]
            entry = entries[key]
            if SAFETENSORS_DTYPES.get(entry["dtype"]) != param.dtype or list(entry["shape"]) != list(param.shape):
                continue
            if non_finite([(names[0], stored_tensor(handle, data, size, entry, True))]):
                raise refuse(names[0])
            param.data = stored_tensor(handle, data, size, entry, True)
            checked.update(names)
    return checked


def tied_names(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Every parameter and buffer name -> all the names its tensor goes by (tied weights share one tensor)."""
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: by_tensor[id(tensor)] for name, tensor in named}


def _tables(gm: fx.GraphModule) -> dict[str, str]:
    """The embedding tables by the module a quantized lookup's buffers go to (the lookup's, else the table's)."""
    return {module_path(node) or node.args[0].target.rpartition(".")[0]: node.args[0].target
            for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default)
            if node.args[0].op == "get_attr"}


def release_freed_memory() -> None:
    """Hands free heap pages back to the system (glibc's `malloc_trim`; elsewhere nothing). Each projection's float
    weight and quantizer temporaries are freed between packed buffers that stay, and glibc keeps those holes:
    170 MiB of them after loading the 105M LLaMA shape in NF4, more than its packed projections."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


class Loader:
    """Fills a meta graph from a checkpoint; `aliases` and the projections' weights are read before quantizing."""

    def __init__(self, gm: fx.GraphModule, checkpoint: Checkpoint, prefix: str, built: dict[str, torch.Tensor],
                 projections: list[Projection]):
        self.gm, self.checkpoint, self.prefix, self.built = gm, checkpoint, prefix, built
        self.aliases = tied_names(gm)
        self.weights = {owner: (table, False, tensor_at(gm, table)) for owner, table in _tables(gm).items()}
        self.weights.update({p.weight.rpartition(".")[0]: (p.weight, p.transposed, tensor_at(gm, p.weight))
                             for p in projections})

    def load(self) -> None:
        for node in self.gm.graph.nodes:
            if quantized.is_quantized(node) or quantized.is_quantized_lookup(node):
                self.fill(node)
        done: dict[int, torch.Tensor] = {}
        for name, tensor in [*self.gm.named_parameters(remove_duplicate=False),
                             *self.gm.named_buffers(remove_duplicate=False)]:
            if tensor.device.type == "meta":
                if id(tensor) not in done:
                    done[id(tensor)] = self.tensor(name, tensor)
                self.place(name, done[id(tensor)])
        release_freed_memory()

    def fill(self, node: fx.Node) -> None:
        """Quantizes one projection's (or embedding table's) float weight, read from the checkpoint, into the
        buffers `node` reads: a tied head's are the table's, on the embedding module."""
        packed = next(arg for arg in node.args if isinstance(arg, fx.Node) and arg.op == "get_attr")
        name, transposed, like = self.weights[packed.target.rpartition(".")[0]]
        weight = self.read(name, like)
        quantized.fill(self.gm, node, weight.T if transposed else weight)

    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The value of the meta tensor `name`: the checkpoint's, else (for a buffer the file lacks) the built one."""
        key = self.checkpoint.key_for(self.aliases.get(name, [name]), self.prefix)
        value = self.built[name] if key is None and name in self.built else self.read(name, like)
        return nn.Parameter(value, requires_grad=like.requires_grad) if isinstance(like, nn.Parameter) else value

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The checkpoint's tensor for `name`, in the dtype of the meta tensor `like`, checked against its shape."""
        key = self.checkpoint.key_for(self.aliases.get(name, [name]), self.prefix)
        if key is None:
            raise RewriteError(f"model directory {str(self.checkpoint.path)!r} has no tensor {name!r} in its "
                               "safetensors files; quantizing while loading needs every weight of the model in them")
        value = self.checkpoint.read(key).to(like.dtype)
        if value.shape != like.shape:
            raise RewriteError(f"tensor {key!r} in {str(self.checkpoint.path)!r} has shape {tuple(value.shape)}, but "
                               f"the config gives {tuple(like.shape)}; use the config.json saved with these weights")
        if non_finite((key, chunk) for chunk in value.reshape(-1).split(CHECK_CHUNK)):
            raise RewriteError(f"weight {key!r} in {str(self.checkpoint.path)!r} holds NaN or infinite values; the "
                               "checkpoint is corrupt, and a graph of it would compute NaN")
        return value

    def place(self, name: str, value: torch.Tensor) -> None:
        path, _, attr = name.rpartition(".")
        owner = self.gm.get_submodule(path) if path else self.gm
        if isinstance(value, nn.Parameter):
            owner._parameters[attr] = value
        else:
            owner._buffers[attr] = value
