"""Logits of each row's last real token only, when the caller asks: the head of a 32k vocabulary over a 128-token
prompt is a third of the prefill, and generation reads one position per row.

The rule puts an `If` in front of the LM head's input (the final hidden states): on `LAST_ONLY` (a boolean input
that is an initializer, false unless fed, so ONNX Runtime GenAI, scoring and the export's own verification see
every position as before) it keeps each row's last real position of the step, the last column the mask marks in
the step's own columns (rows padded on either side), and the head runs on `[batch, 1, hidden]`. The head is the
MatMul (or MatMulNBits, Gemm) over constant weights that `logits` comes from through ops of one non-constant input
each (a cast, a soft cap); a head fed from anywhere else (an adapter on it) keeps every position.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewrite.runtime.cache import LAST_ONLY

HEADS = {"MatMul", "MatMulNBits", "Gemm"}


def _varying(graph: ir.Graph) -> set[int]:
    """The values computed from the graph's inputs (an input's default included), by `id`, in one pass."""
    found = {id(v) for v in graph.inputs}
    for node in graph:  # in order, so a node's inputs are settled before it
        if any(x is not None and id(x) in found for x in node.inputs):
            found |= {id(out) for out in node.outputs}
    return found


def head_input(graph: ir.Graph, logits: ir.Value) -> ir.Node | None:
    """The LM head node `logits` is computed from (see the module docstring), or None."""
    varying = _varying(graph)
    node = logits.producer()
    while node is not None:
        inputs = [x for x in node.inputs if x is not None and id(x) in varying]
        if node.op_type in HEADS and len(inputs) == 1 and inputs[0] is node.inputs[0]:
            return node
        node = inputs[0].producer() if len(inputs) == 1 else None
    return None


def _last_rows(tape: ir.tape.Tape, hidden: ir.Value, ids: ir.Value, mask: ir.Value) -> ir.Value:
    """`hidden [batch, tokens, d]` at each row's last real token of the step `[batch, 1, d]`."""
    const = lambda array: tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array))})  # noqa: E731
    tokens = tape.op("Gather", [tape.op("Shape", [ids]), const(1)], attributes={"axis": 0})
    start = tape.op("Unsqueeze", [tape.op("Neg", [tokens]), const([0])])
    step_mask = tape.op("Slice", [mask, start, const([np.iinfo(np.int64).max]), const([1])])
    columns = tape.op("Range", [const(0), tokens, const(1)])
    marked = tape.op("Mul", [tape.op("Cast", [step_mask], attributes={"to": ir.DataType.INT64}), columns])
    last = tape.op("ReduceMax", [marked, const([1])], attributes={"keepdims": 1})
    return tape.op("GatherND", [hidden, tape.op("Unsqueeze", [last, const([-1])])], attributes={"batch_dims": 1})


def _branch(name: str, build) -> ir.Graph:
    """A subgraph of what `build` puts on a tape, its values named apart from the outer graph's."""
    tape = ir.tape.Tape()
    out = build(tape)
    for number, node in enumerate(tape.nodes):
        for value in node.outputs:
            value.name = f"{name}_{number}_{value.index()}"
    return ir.Graph([], [out], nodes=tape.nodes, name=name)


def keep_last_only(model: ir.Model) -> bool:
    """Adds `LAST_ONLY` in front of the head (see the module docstring); False, changing nothing, where the graph
    has no head of that form or no `input_ids` and `attention_mask` inputs."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    head = head_input(graph, logits) if logits is not None else None
    if head is None or "input_ids" not in inputs or "attention_mask" not in inputs:
        return False
    hidden = head.inputs[0]
    flag = ir.Value(name=LAST_ONLY, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]),
                    const_value=ir.tensor(np.array(False), name=LAST_ONLY))
    graph.inputs.append(flag)
    graph.register_initializer(flag)
    last = _branch("last_rows", lambda tape: _last_rows(tape, hidden, inputs["input_ids"], inputs["attention_mask"]))
    every = _branch("every_row", lambda tape: tape.op("Identity", [hidden]))
    choose = ir.Node("", "If", [flag], [ir.AttrGraph("then_branch", last), ir.AttrGraph("else_branch", every)],
                     num_outputs=1)
    choose.outputs[0].name = f"{hidden.name}_rows"
    choose.outputs[0].type = hidden.type
    graph.insert_before(head, choose)
    head.replace_input_with(0, choose.outputs[0])
    return True
