"""LoRA pass: PEFT parity on five architecture families, structural roles, targeting rules, errors."""
from __future__ import annotations

import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from torch.fx.passes.infra.pass_manager import PassManager

import rewrite
from rewrite.graph.query import GraphQuery
from rewrite.graph.params import count_parameters
from rewrite.passes import lora

from helpers import assert_folds_to, capture_tiny, fresh_inputs, logits, peft_twin, randomize_lora

ARCHS = [("llama", "causal-lm"), ("bert", "seq-cls"), ("gpt2", "causal-lm"), ("bloom", "causal-lm"),
         ("gpt_neox", "causal-lm")]


def adapted_paths(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.").removesuffix(".lora_A")
            for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}


@pytest.mark.parametrize("arch,task", ARCHS)
def test_default_roles_match_peft_defaults_and_outputs(make_tiny, arch, task):
    model = make_tiny(arch, task)
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", rank=4, alpha=8)
    randomize_lora(gm)
    reference = peft_twin(model, gm, task, r=4, lora_alpha=8, target_modules=PEFT_DEFAULTS[model.config.model_type])

    assert set(gm.info.history[-1]["report"]["targets"]) == adapted_paths(reference)
    assert count_parameters(gm)[0] == sum(p.numel() for p in reference.parameters() if p.requires_grad)
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(reference, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,task", ARCHS)
def test_fold_equals_merge_and_unload_and_restores_the_base_graph(make_tiny, arch, task):
    model = make_tiny(arch, task)
    base = capture_tiny(model)
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", rank=4, alpha=8, roles=["q", "k", "v", "o", "mlp"])
    randomize_lora(gm)
    targets = gm.info.history[-1]["report"]["targets"]
    merged = peft_twin(model, gm, task, r=4, lora_alpha=8, target_modules=targets).merge_and_unload()
    assert_folds_to(gm, merged, base)
    assert len(gm.graph.nodes) == len(base.graph.nodes)


def test_fold_without_lora_is_a_noop_that_says_so(make_tiny, caplog):
    gm = capture_tiny(make_tiny("llama"))
    before = gm.code
    rewrite.apply(gm, "fold")
    assert gm.code == before
    assert gm.info.history[-1]["report"]["summary"] == "nothing to fold"
    assert "nothing to fold" in caplog.text


def test_roles_are_read_from_the_graph_not_names():
    """An attention block with meaningless names and eager matmul-softmax-matmul is still understood."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (torch.nn.Linear(16, 16) for _ in range(4))
            self.e = torch.nn.Linear(16, 32)
            self.f = torch.nn.Linear(32, 16)

        def forward(self, x):
            scores = self.a(x) @ self.b(x).transpose(-1, -2) / 4.0
            mixed = torch.softmax(scores, dim=-1) @ self.c(x)
            h = x + self.d(mixed)
            return h + self.f(torch.relu(self.e(h)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    gm = rewrite.capture(Net().eval(), {"x": torch.randn(2, 5, 16)})
    roles = GraphQuery(gm).roles
    for i in range(2):
        assert roles[f"blocks.{i}.a"] == {"q"} and roles[f"blocks.{i}.b"] == {"k"}
        assert roles[f"blocks.{i}.c"] == {"v"} and roles[f"blocks.{i}.d"] == {"o"}
        assert roles[f"blocks.{i}.e"] == {"mlp"} and roles[f"blocks.{i}.f"] == {"mlp", "down"}  # f reads e
    assert "head" not in roles
    rewrite.apply(gm, "lora", rank=2, alpha=4)
    assert gm.info.history[-1]["report"]["targets"] == ["blocks.0.a", "blocks.0.c", "blocks.1.a", "blocks.1.c"]


@pytest.mark.parametrize("targets,expected", [
    (["query"], {f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)}),
    ("bert\\.encoder\\.layer\\.1\\.attention\\.self\\.(key|value)",
     {"bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.value"}),
    (["dense"], {f"bert.encoder.layer.{i}.{m}.dense" for i in range(2) for m in ("attention.output", "intermediate", "output")}
     | {"bert.pooler.dense"}),
])
def test_targets_follow_peft_matching(make_tiny, targets, expected):
    model = make_tiny("bert", "seq-cls")
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", targets=targets, rank=2)
    assert set(gm.info.history[-1]["report"]["targets"]) == expected
    assert adapted_paths(peft_twin(model, gm, "seq-cls", r=2, target_modules=targets)) == expected


@pytest.mark.parametrize("arch,task", [("llama", "causal-lm"), ("bert", "seq-cls"), ("gpt2", "causal-lm")])
def test_all_linear_matches_peft(make_tiny, arch, task):
    model = make_tiny(arch, task)
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", targets="all-linear", rank=2)
    reference = peft_twin(model, gm, task, r=2, target_modules="all-linear")
    assert set(gm.info.history[-1]["report"]["targets"]) == adapted_paths(reference)


def test_exclude_layers_and_patterns_match_peft(make_tiny):
    model = make_tiny("llama")
    gm = capture_tiny(model)
    options = dict(targets=["q_proj", "v_proj", "o_proj"], exclude=["o_proj"], layers=[1], rank=4, alpha=8,
                   rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}, rslora=True)
    rewrite.apply(gm, "lora", **options)
    randomize_lora(gm)
    reference = peft_twin(model, gm, "causal-lm", target_modules=["q_proj", "v_proj", "o_proj"],
                          exclude_modules=["o_proj"], layers_to_transform=[1], r=4, lora_alpha=8,
                          rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}, use_rslora=True)
    assert set(gm.info.history[-1]["report"]["targets"]) == adapted_paths(reference) == {
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert gm.get_parameter("model.layers.1.self_attn.v_proj.lora_A.weight").shape[0] == 2
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(reference, inputs), atol=1e-5, rtol=0)


def test_init_follows_peft(make_tiny):
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", targets=["q_proj"], rank=4, init="gaussian")
    a = gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")
    b = gm.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight")
    assert torch.count_nonzero(b) == 0
    assert abs(a.std().item() - 1 / 4) < 0.05
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", targets=["q_proj"], rank=4)
    a = gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound


def test_branch_dropout_is_active_in_train_mode_only(make_tiny):
    model = make_tiny("llama")
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", rank=4, dropout=0.5)
    randomize_lora(gm)
    reference = peft_twin(model, gm, "causal-lm", r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(reference, inputs), atol=1e-5, rtol=0)
    gm.train()
    torch.manual_seed(0)
    first = logits(gm, inputs)
    torch.manual_seed(1)
    assert not torch.allclose(first, logits(gm, inputs))
    reference.train()
    torch.manual_seed(0)
    torch.testing.assert_close(first, logits(reference, inputs), atol=1e-5, rtol=0)


def test_only_lora_parameters_train(make_tiny):
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", rank=4)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_seq_cls_head_trains_like_peft_modules_to_save(make_tiny):
    model = make_tiny("bert", "seq-cls")
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", rank=4)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    reference = peft_twin(model, gm, "seq-cls", r=4, target_modules=["query", "value"])
    assert count_parameters(gm)[0] == sum(p.numel() for p in reference.parameters() if p.requires_grad)


def test_print_trainable_parameters_uses_peft_format(make_tiny, capsys):
    model = make_tiny("llama")
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", rank=4, alpha=8)
    rewrite.print_trainable_parameters(gm)
    ours = capsys.readouterr().out
    peft_twin(model, gm, "causal-lm", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).print_trainable_parameters()
    assert ours == capsys.readouterr().out


def test_runs_under_torch_pass_manager(make_tiny):
    gm = capture_tiny(make_tiny("llama"))
    PassManager([lora.LoraPass(rank=2)])(gm)
    assert any(".lora_A." in n for n, _ in gm.named_parameters())


@pytest.mark.parametrize("options,message", [
    ({"targets": ["nope"]}, "match no module; linear modules in this graph: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ({"rank": 0}, "LoRA rank 0 is not allowed"),
    ({"rank": 65}, "LoRA rank 65 is too large for model.layers.0.self_attn.q_proj (64 -> 64); use at most 64"),
    ({"alpha": 0}, "LoRA alpha 0 is not allowed"),
    ({"dropout": 1.0}, "LoRA dropout 1.0 is not allowed"),
    ({"roles": ["x"]}, "role x is not known"),
    ({"init": "zeros"}, "LoRA init 'zeros' is not known"),
    ({"ranks": 3}, "pass 'lora' has no option 'ranks'; its options are: targets, roles"),
])
def test_bad_options_are_one_clear_error_and_leave_the_graph_alone(make_tiny, options, message):
    gm = capture_tiny(make_tiny("llama"))
    before = gm.code
    with pytest.raises(rewrite.RewriteError, match=None) as error:
        rewrite.apply(gm, "lora", **options)
    assert message in str(error.value)
    assert gm.code == before and not gm.info.history


def test_adapting_twice_is_refused(make_tiny):
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", rank=2)
    with pytest.raises(rewrite.RewriteError, match="already has a LoRA adapter"):
        rewrite.apply(gm, "lora", rank=2)


def test_unknown_pass_lists_the_available_ones(make_tiny):
    with pytest.raises(rewrite.RewriteError, match="unknown pass 'lorra'; available passes: .*lora"):
        rewrite.apply(capture_tiny(make_tiny("llama")), "lorra")


def test_fold_refuses_non_finite_weights(make_tiny):
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", rank=2)
    with torch.no_grad():
        gm.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight").fill_(float("inf"))
    with pytest.raises(rewrite.RewriteError, match="non-finite weights"):
        rewrite.apply(gm, "fold")
    assert torch.isfinite(gm.get_parameter("model.layers.0.self_attn.q_proj.weight")).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_pipeline_failing_after_fold_leaves_the_weights_as_they_were(make_tiny, arch):
    """Fold writes into `W0`; when a later pass fails, the restored branch must sit on the unmerged `W0`."""
    gm = capture_tiny(make_tiny(arch))
    rewrite.apply(gm, "lora", rank=4, alpha=8)
    randomize_lora(gm)
    inputs = fresh_inputs()
    before = logits(gm, inputs)
    with pytest.raises(rewrite.RewriteError, match="match no module"):
        rewrite.Pipeline(["fold", ("lora", {"targets": ["nothing"]})]).run(gm)
    assert [n for n, _ in gm.named_parameters() if "lora_" in n]
    torch.testing.assert_close(logits(gm, inputs), before, atol=0, rtol=0)
    rewrite.apply(gm, "fold")
    torch.testing.assert_close(logits(gm, inputs), before, atol=1e-5, rtol=0)
