"""An fx graph as plain data: JSON node records whose operators resolve against an allow-list.

Loading runs no code from the file. Operators are admitted by value: a registered `aten`/`prims`
overload (but none that reaches the file system or rebinds storage), or one of the few exact Python
callables fx emits for symbolic sizes (`operator.getitem`, arithmetic and comparison operators,
`torch.sym_*`); never a module's whole namespace, since `operator.attrgetter`, `methodcaller` and
`call` walk from any tensor to `__globals__` and `eval`. Values are JSON with tagged dtypes, devices,
slices and node references; `get_attr` names only the archive's own tensors; names are identifiers;
output structures are builtin containers or Hugging Face `ModelOutput` classes of the installed
library. Anything else is refused, on save as on load.
"""
from __future__ import annotations

import importlib
import keyword
import operator
import re
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from rewrite.graph import quantized

OP_NAMESPACES = ("aten", "prims")
# Registered operators that a captured model never holds and that act outside their tensor arguments:
# `from_file` maps a named file (writable when shared), `set_`/`set` rebind a tensor to other storage.
_REFUSED_OPS = frozenset({"from_file", "set_", "set", "set_data"})
# The project's own operators, by qualified name, registered by importing their module here (never looked up
# from a file's namespace): the quantized matmuls of `rewrite.graph.quantized`, `rewrite::matmul_nbits` and
# `rewrite::matmul_nf4`, and its quantized lookup `rewrite::gather_nbits`.
CUSTOM_OPS = {f"{op._schema.name}.{op._overloadname}": op for op in quantized.CUSTOM_OPS}
PYTHON_FUNCTIONS = {
    f"{prefix}.{name}": function for prefix, name, function in [
        *(("operator", f.__name__, f) for f in (
            operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
            operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.eq, operator.ne,
            operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.xor,
            operator.not_)),
        *(("torch", name, getattr(torch, name)) for name in (
            "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum")),
    ]
}
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)
_CONTAINERS = {"tuple": tuple, "list": list, "dict": dict}
_OUTPUT_MODULE = re.compile(r"transformers\.modeling_outputs|transformers\.models\.([a-z0-9_]+)\.modeling_\1"
                            r"|rewrite\.passes\.[a-z0-9_]+")
_OP_NAME = re.compile(r"(aten|prims)::[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
ATTRIBUTE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


class UnsafeGraphError(ValueError):
    """A graph record names something outside the allow-list (or cannot be stored as data)."""


def encode_target(target: Any) -> Any:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload) and _admitted_op(target):
        return {"$op": f"{target._schema.name}.{target._overloadname}"}
    for name, function in PYTHON_FUNCTIONS.items():
        if function is target:
            return {"$fn": name}
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)!s}".lstrip(".")
    raise UnsafeGraphError(f"operator {name} cannot be stored as data (only ATen operators and the Python "
                           "operators fx emits for sizes can)")


def _admitted_op(op: torch._ops.OpOverload) -> bool:
    if op in CUSTOM_OPS.values():
        return True
    namespace, _, name = op._schema.name.partition("::")
    return namespace in OP_NAMESPACES and name not in _REFUSED_OPS


def _tagged(data: Any, refusal: str) -> tuple[str, Any]:
    """The one `{tag: body}` pair of a tagged record; anything else is refused with `refusal`."""
    if not isinstance(data, dict) or len(data) != 1:
        raise UnsafeGraphError(refusal)
    return next(iter(data.items()))


def decode_target(data: Any) -> Any:
    if isinstance(data, str):
        return data
    tag, name = _tagged(data, f"operator record {data!r} is neither a name, an $op nor an $fn")
    if tag == "$fn":
        if not isinstance(name, str) or name not in PYTHON_FUNCTIONS:
            raise UnsafeGraphError(f"function {name!r} is not on the allow-list ({', '.join(PYTHON_FUNCTIONS)})")
        return PYTHON_FUNCTIONS[name]
    if tag != "$op" or not isinstance(name, str):
        raise UnsafeGraphError(f"operator record {data!r} is neither a name, an $op nor an $fn")
    if name in CUSTOM_OPS:
        return CUSTOM_OPS[name]
    namespace = name.partition("::")[0]
    if namespace not in OP_NAMESPACES:
        raise UnsafeGraphError(f"operator namespace {namespace!r} is not one of {', '.join(OP_NAMESPACES)} "
                               f"(nor is {name!r} one of {', '.join(CUSTOM_OPS)})")
    if not _OP_NAME.fullmatch(name):
        raise UnsafeGraphError(f"{name!r} is not an operator name of the form namespace::name.overload")
    qualified, _, overload = name.rpartition(".")
    packet = getattr(getattr(torch.ops, namespace), qualified.partition("::")[2], None)
    op = getattr(packet, overload, None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    if not isinstance(op, torch._ops.OpOverload):
        raise UnsafeGraphError(f"{name!r} is not a registered PyTorch operator")
    if not _admitted_op(op):
        raise UnsafeGraphError(f"operator {name!r} acts outside its tensor arguments and is never in a captured graph")
    return op


def encode_value(value: Any) -> Any:
    """JSON for node arguments and metadata; anything that is not plain data is tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, fx.Node):
        return {"$node": value.name}
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v) for v in value]}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, _TORCH_ENUMS):
        return {"$torch": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"$slice": [encode_value(value.start), encode_value(value.stop), encode_value(value.step)]}
    raise UnsafeGraphError(f"value {value!r} of type {type(value).__name__} cannot be stored as data")


def decode_value(data: Any, nodes: dict[str, fx.Node]) -> Any:
    """Constants come back only as data: JSON scalars, containers, devices, enums, slices, earlier nodes."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_value(v, nodes) for v in data]
    tag, body = _tagged(data, f"value {data!r} is not a tagged value")
    if tag == "$node":
        if not isinstance(body, str) or body not in nodes:
            raise UnsafeGraphError(f"node reference {body!r} names no earlier node")
        return nodes[body]
    if tag == "$tuple" and isinstance(body, list):
        return tuple(decode_value(v, nodes) for v in body)
    if tag == "$dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        return {_key(decode_value(k, nodes)): decode_value(v, nodes) for k, v in body}
    if tag == "$device" and isinstance(body, str):
        return torch.device(body)
    if tag == "$torch" and isinstance(body, str):
        value = getattr(torch, body, None) if body.isidentifier() else None
        if isinstance(value, _TORCH_ENUMS):
            return value
        raise UnsafeGraphError(f"torch.{body} is not a dtype, layout or memory format")
    if tag == "$slice" and isinstance(body, list) and len(body) == 3:
        return slice(*(decode_value(v, nodes) for v in body))
    raise UnsafeGraphError(f"value tag {tag!r} with {type(body).__name__} body is not known")


def _key(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, fx.Node)):
        return value
    raise UnsafeGraphError(f"dictionary key {value!r} is not a scalar")


def _spec_type_name(kind: type) -> str:
    for name, container in _CONTAINERS.items():
        if kind is container:
            return name
    from transformers.utils import ModelOutput

    if isinstance(kind, type) and issubclass(kind, ModelOutput):
        return f"{kind.__module__}.{kind.__name__}"
    raise UnsafeGraphError(f"graph input/output structure {kind!r} cannot be stored as data")


def encode_spec(spec: pytree.TreeSpec) -> Any:
    if spec.is_leaf():
        return None
    return {"type": _spec_type_name(spec.type), "context": encode_value(spec.context),
            "children": [encode_spec(child) for child in spec.children()]}


def _spec_type(name: Any) -> type:
    """Builtin containers, or a `ModelOutput` class of a library module named by a fixed pattern (checked before
    the module is imported: the file can only pick among the installed library's output classes)."""
    if name in _CONTAINERS:
        return _CONTAINERS[name]
    module, _, class_name = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    if not (_OUTPUT_MODULE.fullmatch(module) and class_name.isidentifier()):
        raise UnsafeGraphError(f"output structure {name!r} is not a builtin container or a ModelOutput of "
                               "transformers or rewrite")
    from transformers.utils import ModelOutput

    try:
        kind = getattr(importlib.import_module(module), class_name, None)
    except ImportError:
        kind = None
    if isinstance(kind, type) and issubclass(kind, ModelOutput):
        return kind
    raise UnsafeGraphError(f"output structure {name!r} is not a ModelOutput of the installed transformers or rewrite")


def decode_spec(data: Any) -> pytree.TreeSpec:
    if data is None:
        return pytree.treespec_leaf()
    if not (isinstance(data, dict) and set(data) == {"type", "context", "children"}
            and isinstance(data["children"], list)):
        raise UnsafeGraphError(f"input/output structure {data!r} is not a type, context and children")
    return pytree.TreeSpec(_spec_type(data["type"]), decode_value(data["context"], {}),
                           [decode_spec(child) for child in data["children"]])


def encode_graph(graph: fx.Graph, kept_meta: tuple[str, ...]) -> dict[str, Any]:
    codegen = None
    if isinstance(graph._codegen, fx.graph._PyTreeCodeGen):
        tree = graph._codegen.pytree_info
        codegen = {"orig_args": list(tree.orig_args), "in_spec": encode_spec(tree.in_spec),
                   "out_spec": encode_spec(tree.out_spec) if tree.out_spec is not None else None}
    nodes = [
        {"op": n.op, "name": n.name, "target": encode_target(n.target), "args": encode_value(n.args),
         "kwargs": encode_value(n.kwargs), "meta": encode_value({k: n.meta[k] for k in kept_meta if k in n.meta})}
        for n in graph.nodes
    ]
    return {"codegen": codegen, "nodes": nodes}


def _is_identifier(name: Any) -> bool:
    """Names become Python source when fx generates the forward: only identifiers that are not keywords."""
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def _identifier(name: Any) -> str:
    if not _is_identifier(name):
        raise UnsafeGraphError(f"{name!r} is not a Python identifier")
    return name


def _checked_node(op: Any, target: Any, args: tuple, attributes: set[str]) -> None:
    """Only the node kinds and targets a captured graph holds: inputs without defaults, the archive's own
    tensors, admitted operators, one output."""
    if op == "call_function" and not isinstance(target, str):
        return
    if op == "placeholder" and _is_identifier(target) and not args:
        return
    if op == "get_attr" and target in attributes and not args:
        return
    if op == "output" and target == "output":
        return
    raise UnsafeGraphError(f"node kind {op!r} with target {target!r} and arguments {args!r} is not one a captured "
                           "graph holds")


def _plain_meta(value: Any) -> Any:
    """Metadata strings may reach generated source as comments: no line breaks."""
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        raise UnsafeGraphError("node metadata holds a line break")
    for item in value.items() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ():
        _plain_meta(item)
    return value


def _records(data: Any) -> list[dict[str, Any]]:
    fields = {"op", "name", "target", "args", "kwargs", "meta"}
    if not (isinstance(data, dict) and isinstance(data.get("nodes"), list)
            and all(isinstance(r, dict) and set(r) == fields for r in data["nodes"])):
        raise UnsafeGraphError("the graph is not a list of node records with op, name, target, args, kwargs and meta")
    return data["nodes"]


def _codegen(data: Any, placeholders: list[str]) -> fx.graph._PyTreeCodeGen:
    """The forward's signature: its argument names must be the graph's inputs, in order."""
    if not (isinstance(data, dict) and set(data) == {"orig_args", "in_spec", "out_spec"}):
        raise UnsafeGraphError("the graph's signature is not orig_args, in_spec and out_spec")
    if not isinstance(data["orig_args"], list) or [_identifier(a) for a in data["orig_args"]] != placeholders:
        raise UnsafeGraphError(f"the signature's arguments {data['orig_args']!r} are not the graph's inputs "
                               f"{placeholders!r}")
    out_spec = decode_spec(data["out_spec"]) if data["out_spec"] is not None else None
    return fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(list(placeholders), decode_spec(data["in_spec"]), out_spec))


def decode_graph(data: dict[str, Any], attributes: set[str]) -> fx.Graph:
    """The graph of `data`; `attributes` are the tensor names its `get_attr` nodes may read."""
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for record in _records(data):
        target = decode_target(record["target"])
        args, kwargs = decode_value(record["args"], nodes), decode_value(record["kwargs"], nodes)
        meta = decode_value(record["meta"], nodes)
        if not (isinstance(args, tuple) and isinstance(kwargs, dict) and isinstance(meta, dict)):
            raise UnsafeGraphError(f"node {record['name']!r} has arguments, keywords or metadata of the wrong type")
        _checked_node(record["op"], target, args, attributes)
        for key in kwargs:
            _identifier(key)
        name = _identifier(record["name"])
        if name in nodes:
            raise UnsafeGraphError(f"two nodes are named {name!r}")
        node = graph.create_node(record["op"], target, args, kwargs, name=name)
        node.meta.update(_plain_meta(meta))
        nodes[name] = node
    if data.get("codegen") is not None:
        graph._codegen = _codegen(data["codegen"], [n.target for n in graph.nodes if n.op == "placeholder"])
    graph.lint()
    return graph
