"""`fast_dropout`: masks from 16-bit random lanes with dropout's distribution and scaling, and with the
mask source swapped for torch's own Bernoulli draw, the plain graph's masks bit for bit and its
train-mode loss and gradients (1e-5) on LLaMA, GPT-2, BERT, OPT, GPT-NeoX, Qwen2, BLOOM and MiniLM."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rewrite
from rewrite.graph import dropout
from rewrite.training import speed
from rewrite.training.head_loss import head_of
from rewrite.training.losses import loss_sum
from rewrite.graph.synthetic_inputs import example_inputs

from helpers import fresh_inputs, randomize_lora
from test_speed import MODELS, ROLES, _adapted, _labels


def _torch_keep(shape, p, dtype=torch.float32, device="cpu"):
    """What torch's CPU dropout draws: `bernoulli_(1 - p)` over a tensor of the input's shape."""
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p)


def _loss_and_grads(graph, params, inputs, labels, task):
    torch.manual_seed(3)
    loss = loss_sum(graph(**inputs), labels, task, head=head_of(graph))
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("arch,task,attention", [
    *((arch, task, 2) for arch, task in MODELS), ("opt", "causal-lm", 2), ("gpt_neox", "causal-lm", 2),
    ("qwen2", "causal-lm", 2),
    ("bloom", "causal-lm", 0)])  # BLOOM's eager attention drops its probabilities with a plain dropout node
def test_with_torch_masks_it_is_the_plain_train_graph(arch, task, attention, monkeypatch):
    """Every dropout on (hidden, attention, LoRA input): only the mask source differs from the plain graph."""
    gm = _adapted(arch, task, dropout=0.1, lora_dropout=0.1)
    _compare_with_torch_masks(gm, task, fresh_inputs(), monkeypatch, attention)


@pytest.mark.slow
def test_with_torch_masks_it_is_the_plain_minilm_train_graph(minilm_dir, monkeypatch):
    """MiniLM as shipped: dropout 0.1 on hidden states and attention probabilities, and on the LoRA inputs."""
    gm = rewrite.load_pretrained(minilm_dir, task="seq-cls", num_labels=2)
    rewrite.apply(gm, "lora", rank=8, alpha=16, roles=ROLES, dropout=0.1)
    randomize_lora(gm)
    inputs = example_inputs(["input_ids", "attention_mask"], 30522, batch=4, seq=32, pad=True)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    _compare_with_torch_masks(gm, "seq-cls", inputs, monkeypatch, attention=6)


def _compare_with_torch_masks(gm, task, inputs, monkeypatch, attention=2):
    fast = speed.twin(gm, ["fast_dropout"])
    assert fast.info.history[-1]["report"]["attention"] == attention
    gm.train()
    labels = _labels(inputs, task)
    lora = [p for n, p in gm.named_parameters() if ".lora_" in n]
    loss, grads = _loss_and_grads(gm, lora, inputs, labels, task)
    monkeypatch.setattr(dropout, "keep_mask", _torch_keep)
    fast_loss, fast_grads = _loss_and_grads(fast, lora, inputs, labels, task)
    torch.testing.assert_close(fast_loss, loss, atol=1e-5, rtol=1e-6)
    for ours, theirs in zip(fast_grads, grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    monkeypatch.undo()
    assert not torch.equal(_loss_and_grads(fast, lora, inputs, labels, task)[0], loss)  # its own masks otherwise


@pytest.mark.parametrize("causal,gqa,masked,bf16", [(True, True, False, False), (False, False, True, False),
                                                    (False, False, True, True)])
def test_attention_is_sdpa_with_the_same_mask(causal, gqa, masked, bf16, monkeypatch):
    """Causal, grouped heads, a boolean mask with a fully masked row (which attends to nothing, as in
    SDPA), bf16 autocast (SDPA's math path computes in fp32 between bf16 inputs and output)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 6, 8, generator=generator, requires_grad=True)
    key, value = (torch.randn(2, 2 if gqa else 4, 6, 8, generator=generator, requires_grad=True) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(2, 1, 6, 6, generator=generator) > 0.3
        mask[1, 0, 2] = False
    grad = torch.randn(2, 4, 6, 8, generator=generator)
    monkeypatch.setattr(dropout, "keep_mask", _torch_keep)
    results = []
    for attend in (dropout.attention, F.scaled_dot_product_attention):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = attend(query, key, value, mask, 0.25, causal, scale=0.3, enable_gqa=gqa)
        results.append((out, *torch.autograd.grad(out, [query, key, value], grad.to(out.dtype))))
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    if masked:
        assert torch.equal(results[0][0][1, :, 2], torch.zeros(4, 8))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.02])
def test_masks_drop_at_the_rate_and_scale_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(1 << 20) + 1.0
    out = dropout.dropout(x, p, True)
    dropped = (out == 0).double().mean().item()
    rate = round(p * 65536) / 65536
    assert abs(rate - p) <= 2 ** -17
    assert abs(dropped - rate) < 5 * math.sqrt(rate * (1 - rate) / x.numel())  # five binomial sigmas
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), atol=0, rtol=1e-6)
    lanes = dropout.keep_mask((4, 1 << 18), p)  # every 16-bit lane of a word drops at the rate
    for lane in lanes.view(-1, 4).unbind(1):
        assert abs(1 - lane.double().mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / lane.numel())


def test_masks_follow_the_seed_and_eval_mode_is_the_identity():
    x = torch.randn(64, 32)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(dropout.dropout(x, 0.3, True))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert dropout.dropout(x, 0.3, False) is x
    q = torch.randn(1, 2, 5, 4)
    torch.testing.assert_close(dropout.attention(q, q, q, None, 0.0), F.scaled_dot_product_attention(q, q, q),
                               atol=0, rtol=0)


def test_activation_checkpointing_replays_its_masks():
    """The checkpoint pass recomputes each block in the backward with the generator state restored:
    the recomputation draws the masks the forward drew."""
    gm = _adapted("bert", "seq-cls", dropout=0.1, lora_dropout=0.1)
    plain, checkpointed = (speed.twin(gm, names) for names in (["fast_dropout"], ["fast_dropout", "checkpoint"]))
    inputs = fresh_inputs()
    labels = _labels(inputs, "seq-cls")
    lora = [p for n, p in gm.named_parameters() if ".lora_" in n]
    loss, grads = _loss_and_grads(plain, lora, inputs, labels, "seq-cls")
    again, again_grads = _loss_and_grads(checkpointed, lora, inputs, labels, "seq-cls")
    torch.testing.assert_close(again, loss, atol=1e-6, rtol=0)
    for ours, theirs in zip(again_grads, grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
