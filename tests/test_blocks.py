"""Outlining a captured graph per transformer block (`rewrite.graph.blocks`): the same parameters under the same
names, each tensor owned once, LoRA inside its block, bit-equal outputs and gradients, a flat twin over the same
tensors, and refusals that leave the graph as it was."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import fx

import rewrite
from rewrite.graph.blocks import outline_blocks
from rewrite.graph.params import apply_trainable
from rewrite.graph.query import module_path

from conftest import tiny_model
from helpers import capture_tiny, fresh_inputs, randomize_lora

CASES = {  # (architecture, task): the block paths
    ("llama", "causal-lm"): ["model.layers.0", "model.layers.1"],
    ("gpt2", "causal-lm"): ["transformer.h.0", "transformer.h.1"],
    ("bert", "masked-lm"): ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    ("bert", "seq-cls"): ["bert.encoder.layer.0", "bert.encoder.layer.1"],
}
EDGES = {  # the modules outside the blocks that become units of their own; tied tensors stay at the root
    ("llama", "causal-lm"): ["model.embed_tokens", "model.norm", "lm_head"],
    ("gpt2", "causal-lm"): ["transformer.wpe", "transformer.ln_f"],  # lm_head tied to wte, both at the root
    ("bert", "masked-lm"): ["bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings",
                            "bert.embeddings.LayerNorm", "cls.predictions.transform.dense",
                            "cls.predictions.transform.LayerNorm"],  # the decoder tied to the word embeddings
    ("bert", "seq-cls"): ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
                          "bert.embeddings.token_type_embeddings", "bert.embeddings.LayerNorm", "bert.pooler.dense",
                          "classifier"],
}
LORA_ON = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value")}
PARTS = {  # the projections outlined inside each block, by architecture
    "llama": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
              "self_attn.q_proj", "self_attn.v_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "bert": ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
             "intermediate.dense", "output.dense"],
}


def lora_gm(arch: str, task: str):
    """A tiny captured graph with LoRA (random A and B) on q and v, in train mode (the tiny GPT-2 and BERT
    configs have dropout)."""
    gm = capture_tiny(tiny_model(arch, task))
    rewrite.apply(gm, "lora", rank=4, alpha=8, roles=["q", "v"])
    randomize_lora(gm)
    apply_trainable(gm)
    return gm.train()


def outputs(module, inputs, seed=7):
    torch.manual_seed(seed)  # the same dropout masks when both graphs draw in the same order
    return module(**inputs)


def trainable_grads(module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in module.named_parameters() if p.requires_grad}


def tensors(module) -> list[tuple[str, int]]:
    """Every parameter and buffer name (tied ones under each name) and the tensor object it is."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [(name, id(tensor)) for name, tensor in named]


@pytest.mark.parametrize("arch, task", list(CASES))
def test_blocks_are_modules_at_their_own_paths_holding_the_same_tensors(arch, task):
    gm = lora_gm(arch, task)
    before = tensors(gm)
    layout = outline_blocks(gm)

    assert layout.refused is None and layout.paths == CASES[arch, task] and layout.edges == EDGES[arch, task]
    assert layout.parts == [f"{path}.{part}" for path in layout.paths for part in PARTS[arch]]
    assert tensors(gm) == before  # names, order and objects: one owner per tensor
    graphs = [name for name, m in gm.named_modules() if isinstance(m, fx.GraphModule) and m is not gm]
    assert sorted(graphs) == sorted(layout.units)
    calls = [n.target for n in gm.graph.find_nodes(op="call_module")]
    assert sorted(calls) == sorted(layout.paths + layout.edges)
    for path in layout.paths:
        block = gm.get_submodule(path)
        inside = {f"{path}.{name}" for name, p in block.named_parameters() if p.requires_grad}
        assert inside == {name for name in gm.info.trainable if name.startswith(path + ".")}
        assert any(".lora_A." in name for name in inside) and any(".lora_B." in name for name in inside)
        assert sorted(n.target for n in block.graph.find_nodes(op="call_module")) == PARTS[arch]
        assert not any(n.target.startswith(tuple(p + "." for p in PARTS[arch]))
                       for n in block.graph.find_nodes(op="get_attr"))  # each part reads its tensors itself
    for part in layout.parts:  # LoRA's tensors inside the projection they adapt
        names = {name for name, _ in gm.get_submodule(part).named_parameters()}
        adapted = part.endswith(LORA_ON[arch])
        assert {"lora_A.weight", "lora_B.weight"} <= names if adapted else names <= {"weight", "bias"}
    assert not any(n.op == "get_attr" and n.target.startswith(tuple(p + "." for p in layout.units))
                   for n in gm.graph.nodes)  # the units read their tensors themselves


@pytest.mark.parametrize("arch, task", list(CASES))
def test_outlined_graph_gives_the_flat_graphs_outputs_and_lora_grads_bit_for_bit(arch, task):
    flat = lora_gm(arch, task)
    gm = copy.deepcopy(flat)
    outline_blocks(gm)
    inputs = fresh_inputs()
    expected, got = outputs(flat, inputs), outputs(gm, inputs)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)
    for result in (expected, got):
        next(iter(result.values())).float().pow(2).mean().backward()
    reference, grads = trainable_grads(flat), trainable_grads(gm)
    assert grads.keys() == reference.keys() and len(grads) == len(gm.info.trainable)
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], atol=0, rtol=0)


@pytest.mark.parametrize("arch, task", list(CASES))
def test_the_gathered_twin_shares_the_tensors_and_eval_mode_reaches_the_blocks(arch, task):
    flat = lora_gm(arch, task)
    gm = copy.deepcopy(flat)
    layout = outline_blocks(gm)
    twin = layout.gathered_twin(gm, dict(gm.named_parameters(remove_duplicate=False)))
    assert not any(n.op == "call_module" for n in twin.graph.nodes) and not twin.training
    assert ([(n, t.untyped_storage().data_ptr(), t.requires_grad) for n, t in twin.named_parameters()]
            == [(n, t.untyped_storage().data_ptr(), t.requires_grad) for n, t in gm.named_parameters()])
    gm.eval()
    flat.eval()
    inputs = fresh_inputs()
    expected = flat(**inputs)
    for module in (gm, twin):  # no dropout left: equal under any seed
        got = outputs(module, inputs, seed=123)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


def _get_attr(gm, target: str) -> fx.Node:
    return next(n for n in gm.graph.find_nodes(op="get_attr") if n.target == target)


def _read_instead(gm, old: str, new: str) -> None:
    """The graph reads tensor `new` where it read `old` (the same shape)."""
    _get_attr(gm, old).replace_all_uses_with(_get_attr(gm, new))


def _interleave(gm) -> None:
    """A call in the middle of block 0 claims to be block 1's."""
    node = next(n for n in gm.graph.nodes if module_path(n) == "model.layers.0.mlp")
    node.meta["nn_module_stack"] = {**node.meta["nn_module_stack"], "moved": ("model.layers.1.mlp", torch.nn.Module)}


def _tie_across_blocks(gm) -> None:
    up = gm.get_submodule("model.layers.1.mlp.up_proj")
    up.weight = gm.get_parameter("model.layers.0.mlp.up_proj.weight")


REFUSALS = {
    "interleaved": (_interleave, "block model.layers.0 is interleaved with model.layers.1"),
    "read by two blocks": (
        lambda gm: _read_instead(gm, "model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        "tensor model.layers.0.mlp.up_proj.weight is read outside its block model.layers.0 (by model.layers.1)"),
    "read by the root and a block": (
        lambda gm: _read_instead(gm, "model.norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        "tensor model.layers.1.post_attention_layernorm.weight is read outside its block model.layers.1 "
        "(by the root)"),
    "tied across blocks": (_tie_across_blocks, "tensors model.layers.0.mlp.up_proj.weight, "
                                               "model.layers.1.mlp.up_proj.weight are one tensor tied across"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_graph_that_cannot_be_split_is_refused_with_the_reason_and_left_as_it_was(case):
    gm = lora_gm("llama", "causal-lm")
    change, reason = REFUSALS[case]
    change(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    code, before = gm.code, tensors(gm)
    layout = outline_blocks(gm)
    assert layout.paths == [] and reason in layout.refused
    assert gm.code == code and tensors(gm) == before
    assert not any(isinstance(m, fx.GraphModule) for m in gm.modules() if m is not gm)


def test_a_projection_interleaved_with_another_stays_in_its_block():
    """A call inside q_proj's LoRA branch claiming to be k_proj's: neither is a part of block 0, which runs them
    itself; block 1 keeps all its parts, and the outputs are the flat graph's."""
    flat = lora_gm("llama", "causal-lm")
    gm = copy.deepcopy(flat)
    lora_call = next(n for n in gm.graph.nodes if module_path(n) == "model.layers.0.self_attn.q_proj"
                     and any(a.op == "get_attr" and ".lora_A." in a.target for a in n.all_input_nodes))
    lora_call.meta["nn_module_stack"] = {**lora_call.meta["nn_module_stack"],
                                         "moved": ("model.layers.0.self_attn.k_proj", torch.nn.Module)}
    layout = outline_blocks(gm)
    kept = [p for p in PARTS["llama"] if not p.endswith(("q_proj", "k_proj"))]
    assert layout.parts == [f"model.layers.0.{p}" for p in kept] + [f"model.layers.1.{p}" for p in PARTS["llama"]]
    inputs = fresh_inputs()
    expected, got = outputs(flat, inputs), outputs(gm, inputs)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)
