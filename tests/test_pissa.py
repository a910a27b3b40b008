"""PiSSA and OLoRA (`passes/pissa.py`) against PEFT 0.21: the same factors and residual bit for bit (with the same
seed for pissa_niter), the adapter file PEFT's `path_initial_model_for_weight_conversion` writes, which loads on
the original base, PEFT's adapters in both forms, the fold against `merge_and_unload`, slots on the original base."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import rewrite
from rewrite.adapters import slots as adapter_slots
from rewrite.export.onnx_adapters import _peft_values
from rewrite.graph.archive import load, save
from rewrite.graph.params import count_parameters

from helpers import TASK_TYPES, capture_tiny, fresh_inputs, logits

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def ours(model, init="pissa", niter=None, seed=7, **options):
    """The pass on `model`'s capture (or on a captured graph), `seed` set right before it as for PEFT."""
    gm = model if isinstance(model, rewrite.RewriteGraph) else capture_tiny(model)
    torch.manual_seed(seed)
    rewrite.apply(gm, "pissa", init=init, niter=niter, **{"rank": 4, "alpha": 8, **options})
    return gm


def theirs(model, task, arch, init="pissa", niter=None, seed=7, **options):
    torch.manual_seed(seed)
    config = LoraConfig(task_type=TASK_TYPES.get(task),
                        init_lora_weights=init if niter is None else f"pissa_niter_{niter}",
                        target_modules=TARGETS[arch], **{"r": 4, "lora_alpha": 8, **options})
    return get_peft_model(copy.deepcopy(model), config).eval()


def train(gm, seed: int = 1) -> None:
    """Trained-looking values for every trainable tensor (the branch and a seq-cls head)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in gm.info.trainable:
            gm.get_parameter(name).add_(torch.randn(gm.get_parameter(name).shape, generator=generator) * 0.1)


def lora_key(name: str) -> str:
    path, kind, leaf = name.rsplit(".", 2)
    return f"base_model.model.{path}.{kind}.default.{leaf}"


def branches_into(gm, peft_model) -> None:
    """`gm`'s trained A and B into the PEFT twin."""
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                params[lora_key(name)].copy_(param)


CASES = [("llama", "causal-lm", "pissa", None), ("llama", "causal-lm", "olora", None),
         ("llama", "causal-lm", "pissa", 2), ("gpt2", "causal-lm", "pissa", None), ("gpt2", "causal-lm", "pissa", 1),
         pytest.param("bert", "seq-cls", "pissa", None, marks=pytest.mark.slow), ("bert", "seq-cls", "olora", None)]


@pytest.mark.parametrize("arch,task,init,niter", CASES)
def test_factors_and_residual_equal_peft_bit_for_bit(make_tiny, arch, task, init, niter):
    model = make_tiny(arch, task)
    gm, reference = ours(model, init, niter), theirs(model, task, arch, init, niter)
    params = dict(reference.named_parameters())
    adapted = gm.info.history[-1]["report"]["targets"]
    assert adapted and len(adapted) == len([n for n in params if n.endswith("lora_A.default.weight")])
    for path in adapted:
        for kind in ("lora_A", "lora_B"):
            assert torch.equal(gm.get_parameter(f"{path}.{kind}.weight"),
                               params[f"base_model.model.{path}.{kind}.default.weight"])
        assert torch.equal(gm.get_parameter(f"{path}.weight"), params[f"base_model.model.{path}.base_layer.weight"])
    assert count_parameters(gm)[0] == reference.get_nb_trainable_parameters()[0]
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm, inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_niter_follows_the_global_seed(make_tiny):
    base = capture_tiny(make_tiny("llama"))
    a = [ours(copy.deepcopy(base), niter=2, seed=seed).get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")
         for seed in (1, 1, 2)]
    assert torch.equal(a[0], a[1]) and not torch.allclose(a[0], a[2], atol=1e-3)


@pytest.mark.parametrize("arch,task,init", [("llama", "causal-lm", "pissa"),
                                            pytest.param("gpt2", "causal-lm", "pissa", marks=pytest.mark.slow),
                                            pytest.param("bert", "masked-lm", "olora", marks=pytest.mark.slow)])
def test_adapter_file_is_peft_conversion_and_loads_on_the_original_base(make_tiny, tmp_path, arch, task, init):
    model = make_tiny(arch, task)
    gm, reference = ours(model, init), theirs(model, task, arch, init)
    reference.save_pretrained(tmp_path / "init")
    train(gm)
    branches_into(gm, reference)
    reference.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    rewrite.save_adapter(gm, tmp_path / "ours")

    mine, peft = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "converted"))
    assert sorted(mine) == sorted(peft) and all(torch.equal(mine[k], peft[k]) for k in peft)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    expected = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert config[key] == expected[key], key
    inputs = fresh_inputs()
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(gm, inputs), atol=1e-5, rtol=0)
    # PEFT's converted file is a plain LoRA: the LoRA pass applies it to the original base
    back = rewrite.load_adapter(capture_tiny(model), tmp_path / "converted")
    assert back.info.history[-1]["pass"] == "lora"
    torch.testing.assert_close(logits(back, inputs), logits(reference, inputs), atol=1e-5, rtol=0)


def test_conversion_is_exact_where_peft_refuses_or_drops_the_head(make_tiny, tmp_path):
    """rsLoRA with rank and alpha patterns (PEFT refuses to convert) and a seq-cls head (PEFT's conversion drops
    it): each module's alpha times sqrt 2, the head kept, and PEFT loads the file with the trained outputs."""
    model = make_tiny("bert", "seq-cls")
    gm = ours(model, rslora=True, rank_pattern={"query": 2}, alpha_pattern={"value": 3.0},
              targets=["query", "value"])
    train(gm)
    rewrite.save_adapter(gm, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ranks = {k.split(".")[-3]: v.shape[0] for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()
             if k.endswith("lora_A.weight")}
    assert ranks == {"query": 4, "value": 8} and config["use_rslora"]
    alphas = sorted({config["lora_alpha"], *config["alpha_pattern"].values()})
    assert alphas == pytest.approx([3 * 2 ** 0.5, 8 * 2 ** 0.5])
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(gm, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,task,init", [("llama", "causal-lm", "pissa"), ("gpt2", "causal-lm", "pissa"),
                                            ("bert", "seq-cls", "olora")])
def test_fold_equals_peft_merge_and_unload(make_tiny, arch, task, init):
    model = make_tiny(arch, task)
    gm, reference = ours(model, init), theirs(model, task, arch, init)
    train(gm)
    branches_into(gm, reference)
    for name in gm.info.trainable:
        if ".lora_" not in name:  # the seq-cls head
            dict(reference.named_parameters())[f"base_model.model.{name.replace('.', '.modules_to_save.default.', 1)}"
                                               ].data.copy_(gm.get_parameter(name))
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm, inputs), logits(reference, inputs), atol=1e-5, rtol=0)
    merged = reference.merge_and_unload()
    rewrite.apply(gm, "fold")
    torch.testing.assert_close(logits(gm, inputs), logits(merged, inputs), atol=1e-5, rtol=0)
    assert not [n for n, _ in [*gm.named_parameters(), *gm.named_buffers()] if "lora_" in n]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_peft_adapter_is_applied_as_peft_applies_it(make_tiny, tmp_path, init):
    """PEFT runs the init again on the base it loads onto, then reads the trained A, B: so do we."""
    model = make_tiny("llama")
    reference = theirs(model, "causal-lm", "llama", init)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    reference.save_pretrained(tmp_path / "peft")
    gm = rewrite.load_adapter(capture_tiny(model), tmp_path / "peft")
    assert gm.info.history[-1]["pass"] == "pissa"
    inputs = fresh_inputs()
    expected = logits(PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval(), inputs)
    torch.testing.assert_close(logits(gm, inputs), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(gm, inputs), logits(reference, inputs), atol=1e-5, rtol=0)


def test_unconverted_niter_adapter_is_refused_and_never_read_as_plain_lora(make_tiny, tmp_path):
    model = make_tiny("llama")
    theirs(model, "causal-lm", "llama", niter=2).save_pretrained(tmp_path / "peft")
    gm = capture_tiny(model)
    before = gm.code
    with pytest.raises(rewrite.RewriteError, match="init_lora_weights 'pissa_niter_2' holds weights for a residual "
                                                   "base that cannot be rebuilt here"):
        rewrite.load_adapter(gm, tmp_path / "peft")
    assert gm.code == before and not gm.info.history
    with pytest.raises(rewrite.RewriteError, match="adapter slots take adapters for the original base"):
        _peft_values(tmp_path / "peft")


def test_olora_on_conv1d_factors_the_out_in_weight(make_tiny, tmp_path):
    """PEFT's OLoRA factors GPT-2's stored `[in, out]` weight and fails; ours is exact at init, and its file
    loads in PEFT with the trained outputs."""
    model = make_tiny("gpt2")
    gm = ours(model, "olora")
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm, inputs), logits(model, inputs), atol=1e-5, rtol=0)
    a = gm.get_parameter("transformer.h.0.attn.c_attn.lora_A.weight")
    assert torch.allclose(torch.triu(a), a) and a.shape == (4, 64)  # R's first rows
    train(gm)
    rewrite.save_adapter(gm, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(gm, inputs), atol=1e-5, rtol=0)


def test_failing_pipeline_puts_the_original_weights_back(make_tiny):
    gm = capture_tiny(make_tiny("llama"))
    before = {name: value.clone() for name, value in gm.state_dict().items()}
    with pytest.raises(rewrite.RewriteError, match="match no module"):
        rewrite.Pipeline([("pissa", {"rank": 4}), ("lora", {"targets": ["nothing"]})]).run(gm)
    after = gm.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_archive_keeps_the_initial_factors(make_tiny, tmp_path):
    gm = ours(make_tiny("llama"))
    train(gm)
    rewrite.save_adapter(gm, tmp_path / "before")
    save(gm, tmp_path / "g.pt2")
    rewrite.save_adapter(load(tmp_path / "g.pt2"), tmp_path / "after")
    before, after = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("before", "after"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_slots_take_adapters_for_the_original_base(make_tiny):
    """No adapter: the base model; this graph's slot values (its converted factors): the trained model; mixed rows."""
    model = make_tiny("llama")
    gm = ours(model)
    train(gm)
    prepared, slots = adapter_slots.prepared(gm)
    assert not [n for n, _ in prepared.named_buffers() if "lora_initial" in n]
    filled = {"none": adapter_slots.defaults(prepared, slots), "own": adapter_slots.values(gm)}
    inputs = fresh_inputs()
    graph = adapter_slots.slotted(copy.deepcopy(prepared), slots)
    for key, expected in [("none", logits(model, inputs)), ("own", logits(gm, inputs))]:
        feeds = {adapter_slots.python_name(k): v for k, v in filled[key].items()}
        with torch.no_grad():
            torch.testing.assert_close(graph(**inputs, **feeds).logits, expected, atol=1e-5, rtol=0)
    stacked = adapter_slots.stack(slots, [filled["own"], filled["none"]], filled["none"])
    mixed = adapter_slots.mixed(prepared, slots)
    index = torch.tensor([0, 1, 0])
    with torch.no_grad():
        feeds = {adapter_slots.python_name(k): v for k, v in stacked.items()}
        rows = mixed(**inputs, **feeds, adapter_index=index).logits
    for row, pick in enumerate(index.tolist()):
        expected = logits(gm if pick == 0 else model, {k: v[row:row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(rows[row:row + 1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options,message", [
    (dict(init="olora", niter=2), "niter 2 is not allowed; use a whole number of at least 0, with init pissa"),
    (dict(niter=-1), "niter -1 is not allowed"),
    (dict(init="kaiming"), "PiSSA init 'kaiming' is not known; use one of pissa, olora"),
])
def test_bad_options_are_one_sentence(make_tiny, options, message):
    gm = capture_tiny(make_tiny("llama"))
    with pytest.raises(rewrite.RewriteError, match=message):
        rewrite.apply(gm, "pissa", **options)


@pytest.mark.slow
def test_cli_applies_olora_and_the_archive_saves_the_converted_adapter(make_tiny, tmp_path):
    """`--init olora` reaches the pass (LoRA's `--init` takes kaiming or gaussian: the flag offers both passes'
    choices), and the archive written by the command still converts."""
    save(capture_tiny(make_tiny("llama")), tmp_path / "base.pt2")
    result = subprocess.run([sys.executable, "-c", "from rewrite.cli.main import main; main()", "apply",
                             str(tmp_path / "base.pt2"), "--pass", "pissa", "--init", "olora", "--rank", "4",
                             "-o", str(tmp_path / "olora.pt2")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    gm = load(tmp_path / "olora.pt2")
    assert gm.info.history[-1]["options"]["init"] == "olora"
    rewrite.save_adapter(gm, tmp_path / "adapter")
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
