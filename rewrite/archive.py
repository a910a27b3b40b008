"""`.pt2` archives of captured graphs: graph, weights, config, tokenizer and pass history in one zip.

The graph part is a pickle (operators and fx nodes are written by reference), so an archive is
trusted input only: load archives you made or got from someone you trust, as with `torch.load`.
Adapters travel as safetensors (`rewrite.save_adapter`), which are safe to load from anywhere.
"""
from __future__ import annotations

import io
import json
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import fx, nn

from rewrite.errors import RewriteError
from rewrite.atomic import atomic_path
from rewrite.ir import GraphInfo, RewriteGraph, add_submodule, info, wrap

FORMAT = 1
_KEPT_META = ("nn_module_stack", "stack_trace", "rewrite", "rewrite_train_dropout_p")
_INFO_OBJECTS = GraphInfo.OBJECTS


class _NodeRef:
    def __init__(self, name: str):
        self.name = name


def _resolve_op(namespace: str, name: str, overload: str):
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


class _GraphPickler(pickle.Pickler):
    """Writes operator overloads by name and fx nodes as references to their names."""

    def reducer_override(self, obj):
        if isinstance(obj, torch._ops.OpOverload):
            namespace, name = obj._schema.name.split("::")
            return _resolve_op, (namespace, name, obj._overloadname)
        if isinstance(obj, fx.Node):
            return _NodeRef, (obj.name,)
        return NotImplemented


def _graph_records(graph: fx.Graph) -> bytes:
    records = [
        (n.op, n.name, n.target, n.args, n.kwargs, {k: n.meta[k] for k in _KEPT_META if k in n.meta})
        for n in graph.nodes
    ]
    buffer = io.BytesIO()
    _GraphPickler(buffer).dump({"codegen": graph._codegen, "nodes": records})
    return buffer.getvalue()


def _rebuild_graph(data: bytes) -> fx.Graph:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # pytree's LeafSpec deprecation on unpickle
        payload = pickle.loads(data)
    graph = fx.Graph()
    graph._codegen = payload["codegen"]
    by_name: dict[str, fx.Node] = {}

    def resolve(value):
        return fx.node.map_aggregate(value, lambda v: by_name[v.name] if isinstance(v, _NodeRef) else v)

    for op, name, target, args, kwargs, meta in payload["nodes"]:
        node = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name)
        node.meta.update(meta)
        by_name[name] = node
    return graph


def _tensors(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unique tensors by name, and the manifest: parameters, buffers, aliases, trainable flags."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {"parameters": {}, "buffers": [], "aliases": {}}
    seen: dict[int, str] = {}
    named = [(n, t, True) for n, t in gm.named_parameters(remove_duplicate=False)]
    named += [(n, t, False) for n, t in gm.named_buffers(remove_duplicate=False)]
    for name, tensor, is_param in named:
        if id(tensor) in seen:
            manifest["aliases"][name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        tensors[name] = tensor.detach()
        if is_param:
            manifest["parameters"][name] = tensor.requires_grad
        else:
            manifest["buffers"].append(name)
    return tensors, manifest


def save(gm: fx.GraphModule, path: str | Path) -> Path:
    """Writes `gm` with its weights, config, tokenizer and pass history to a `.pt2` archive (atomically)."""
    path = Path(path)
    meta = info(gm)
    tensors, manifest = _tensors(gm)
    on_meta = any(t.device.type == "meta" for t in tensors.values())
    header = meta.to_dict()
    header.update(format=FORMAT, training=gm.training, tensors=manifest, meta_device=on_meta)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        archive.writestr("rewrite.json", json.dumps(header, indent=2, default=str))
        archive.writestr("graph.pkl", _graph_records(gm.graph))
        if on_meta:
            shapes = {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in tensors.items()}
            archive.writestr("shapes.json", json.dumps(shapes))
        else:
            contiguous = {n: t.contiguous().cpu() for n, t in tensors.items()}
            archive.writestr("weights.safetensors", safetensors.torch.save(contiguous))
        for key in _INFO_OBJECTS:
            if getattr(meta, key) is not None:
                with tempfile.TemporaryDirectory() as tmpdir:
                    getattr(meta, key).save_pretrained(tmpdir)
                    for file in sorted(Path(tmpdir).iterdir()):
                        archive.write(file, f"{key}/{file.name}")
    return path


def _read_tensors(archive: zipfile.ZipFile, header: dict) -> dict[str, torch.Tensor]:
    if header.get("meta_device"):
        shapes = json.loads(archive.read("shapes.json"))
        return {n: torch.empty(s, dtype=getattr(torch, d), device="meta") for n, (s, d) in shapes.items()}
    return safetensors.torch.load(archive.read("weights.safetensors"))


def _build_root(tensors: dict[str, torch.Tensor], manifest: dict) -> nn.Module:
    root = nn.Module()

    def owner(name: str) -> tuple[nn.Module, str]:
        parent_path, _, leaf = name.rpartition(".")
        if parent_path:
            try:
                return root.get_submodule(parent_path), leaf
            except AttributeError:
                add_submodule(root, parent_path, nn.Module())
                return root.get_submodule(parent_path), leaf
        return root, leaf

    for name, requires_grad in manifest["parameters"].items():
        module, leaf = owner(name)
        module.register_parameter(leaf, nn.Parameter(tensors[name], requires_grad=requires_grad))
    for name in manifest["buffers"]:
        module, leaf = owner(name)
        module.register_buffer(leaf, tensors[name])
    for alias, name in manifest["aliases"].items():
        module, leaf = owner(alias)
        source_module, source_leaf = owner(name)
        setattr(module, leaf, getattr(source_module, source_leaf))
    return root


def _read_pretrained(archive: zipfile.ZipFile, key: str):
    names = [n for n in archive.namelist() if n.startswith(f"{key}/")]
    if not names:
        return None
    import transformers

    with tempfile.TemporaryDirectory() as tmpdir:
        for name in names:
            target = Path(tmpdir) / Path(name).name
            target.write_bytes(archive.read(name))
        if key == "config":
            return transformers.AutoConfig.from_pretrained(tmpdir, local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(tmpdir, local_files_only=True)


def load(path: str | Path) -> RewriteGraph:
    """Reads a `.pt2` archive written by `save`. Trusted input only (the graph part is a pickle)."""
    path = Path(path)
    if not path.is_file():
        raise RewriteError(f"graph archive {str(path)!r} does not exist; create one with `rewrite capture`")
    try:
        with zipfile.ZipFile(path) as archive:
            header = json.loads(archive.read("rewrite.json"))
            graph = _rebuild_graph(archive.read("graph.pkl"))
            tensors = _read_tensors(archive, header)
            objects = {key: _read_pretrained(archive, key) for key in _INFO_OBJECTS}
    except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, json.JSONDecodeError,
            safetensors.SafetensorError, OSError, AttributeError, ValueError) as error:
        raise RewriteError(
            f"{str(path)!r} is not a readable rewrite graph archive ({type(error).__name__}: {error}); "
            "it may be truncated or corrupt: re-create it with `rewrite capture`"
        ) from error
    root = _build_root(tensors, header.pop("tensors"))
    training = header.pop("training")
    header.pop("format")
    for obj in objects.values():
        if obj is not None and header.get("source"):
            obj.name_or_path = header["source"]  # not the temporary directory it was read from
    header.update(objects)
    return wrap(root, graph, header, training)
