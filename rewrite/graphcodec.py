"""An fx graph as plain data: JSON node records whose operators resolve against an allow-list.

Loading runs no code from the file: an operator is looked up by name among PyTorch's registered
`aten`/`prims` ops, Python's `operator` functions and `torch.sym_*`; values are JSON with tagged
dtypes, devices and node references; output structures are builtin containers or Hugging Face
`ModelOutput` classes. Anything else is refused, on save as on load.
"""
from __future__ import annotations

import importlib
import operator
import re
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

OP_NAMESPACES = ("aten", "prims")
_OPERATOR_FUNCTIONS = {name: getattr(operator, name) for name in dir(operator) if not name.startswith("_")}
_SYM_FUNCTIONS = {name: getattr(torch, name) for name in dir(torch) if name.startswith("sym_")}
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)
_CONTAINERS = {"tuple": tuple, "list": list, "dict": dict}
_OUTPUT_MODULE = re.compile(r"(transformers|rewrite)(\.[a-z0-9_]+)+")
ATTRIBUTE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_TARGET_RULES = {"placeholder": str.isidentifier, "get_attr": ATTRIBUTE_PATH.fullmatch, "output": "output".__eq__,
                 "call_function": lambda target: not isinstance(target, str)}


class UnsafeGraphError(ValueError):
    """A graph record names something outside the allow-list (or cannot be stored as data)."""


def encode_target(target: Any) -> Any:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return {"$op": f"{target._schema.name}.{target._overloadname}"}
    for table, prefix in ((_OPERATOR_FUNCTIONS, "operator"), (_SYM_FUNCTIONS, "torch")):
        name = getattr(target, "__name__", None)
        if table.get(name) is target:
            return {"$fn": f"{prefix}.{name}"}
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)!s}".lstrip(".")
    raise UnsafeGraphError(f"operator {name} cannot be stored as data (only ATen operators and Python's "
                           "operator and sym_* functions can)")


def decode_target(data: Any) -> Any:
    if isinstance(data, str):
        return data
    if "$op" in data:
        qualified, _, overload = data["$op"].rpartition(".")
        namespace, _, name = qualified.partition("::")
        if namespace not in OP_NAMESPACES:
            raise UnsafeGraphError(f"operator namespace {namespace!r} is not one of {', '.join(OP_NAMESPACES)}")
        op = getattr(getattr(getattr(torch.ops, namespace), name, None), overload, None)
        if isinstance(op, torch._ops.OpOverload):
            return op
        raise UnsafeGraphError(f"{data['$op']!r} is not a registered PyTorch operator")
    prefix, _, name = data["$fn"].partition(".")
    table = {"operator": _OPERATOR_FUNCTIONS, "torch": _SYM_FUNCTIONS}.get(prefix, {})
    if name not in table:
        raise UnsafeGraphError(f"function {data['$fn']!r} is not on the allow-list")
    return table[name]


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
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_value(v, nodes) for v in data]
    (tag, body), = data.items()
    if tag == "$node":
        return nodes[body]
    if tag == "$tuple":
        return tuple(decode_value(v, nodes) for v in body)
    if tag == "$dict":
        return {decode_value(k, nodes): decode_value(v, nodes) for k, v in body}
    if tag == "$device":
        return torch.device(body)
    if tag == "$torch":
        value = getattr(torch, body, None)
        if isinstance(value, _TORCH_ENUMS):
            return value
        raise UnsafeGraphError(f"torch.{body} is not a dtype, layout or memory format")
    if tag == "$slice":
        return slice(*(decode_value(v, nodes) for v in body))
    raise UnsafeGraphError(f"value tag {tag!r} is not known")


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


def _spec_type(name: str) -> type:
    if name in _CONTAINERS:
        return _CONTAINERS[name]
    module, _, class_name = name.rpartition(".")
    if not _OUTPUT_MODULE.fullmatch(module):
        raise UnsafeGraphError(f"output structure {name!r} is not a builtin container or a ModelOutput of transformers or rewrite")
    from transformers.utils import ModelOutput

    kind = getattr(importlib.import_module(module), class_name, None)  # a library module, not the file's
    if isinstance(kind, type) and issubclass(kind, ModelOutput):
        return kind
    raise UnsafeGraphError(f"output structure {name!r} is not a transformers ModelOutput")


def decode_spec(data: Any) -> pytree.TreeSpec:
    if data is None:
        return pytree.treespec_leaf()
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


def _identifier(name: Any) -> str:
    """Names become Python source when fx generates the forward: only identifiers are accepted."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise UnsafeGraphError(f"{name!r} is not a Python identifier")
    return name


def _checked_target(op: Any, target: Any) -> Any:
    rule = _TARGET_RULES.get(op)
    if rule is None or not (isinstance(target, str) or op == "call_function") or not rule(target):
        raise UnsafeGraphError(f"node kind {op!r} with target {target!r} is not one a captured graph holds")
    return target


def _plain_meta(value: Any) -> Any:
    """Metadata strings may reach generated source as comments: no line breaks."""
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        raise UnsafeGraphError("node metadata holds a line break")
    for item in value.items() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ():
        _plain_meta(item)
    return value


def decode_graph(data: dict[str, Any]) -> fx.Graph:
    graph = fx.Graph()
    if data["codegen"] is not None:
        codegen = data["codegen"]
        out_spec = decode_spec(codegen["out_spec"]) if codegen["out_spec"] is not None else None
        graph._codegen = fx.graph._PyTreeCodeGen(
            fx.graph._PyTreeInfo([_identifier(a) for a in codegen["orig_args"]], decode_spec(codegen["in_spec"]),
                                 out_spec))
    nodes: dict[str, fx.Node] = {}
    for record in data["nodes"]:
        target = _checked_target(record["op"], decode_target(record["target"]))
        kwargs = decode_value(record["kwargs"], nodes)
        for key in kwargs:
            _identifier(key)
        node = graph.create_node(record["op"], target, decode_value(record["args"], nodes), kwargs,
                                 name=_identifier(record["name"]))
        node.meta.update(_plain_meta(decode_value(record["meta"], nodes)))
        nodes[record["name"]] = node
    graph.lint()
    return graph
