"""IA³ pass: PEFT's IA3 in both adapter directions (biased keys and values, GPT-2's Conv1D, BERT's head), its default
targets against PEFT's, PEFT's feed-forward rules, the fold against `merge_and_unload`, the adapter files, ONNX
slots and mixed batches, and its errors."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FEEDFORWARD
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS

import rewrite
from rewrite.adapters import slots as adapter_slots
from rewrite.export.onnx import real_positions
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters
from rewrite.graph.params import count_parameters
from rewrite import runtime

from conftest import TASK_CLASSES, tiny_config
from helpers import TASK_TYPES, capture_tiny, fresh_inputs, logits, randomize_trainable

PREFIX = "base_model.model."


def model_of(arch: str, task: str = "causal-lm", **extra):
    """conftest's tiny model, its config changed by `extra` (LLaMA's `attention_bias`)."""
    config = tiny_config(arch)
    config.update(extra)
    torch.manual_seed(0)
    return TASK_CLASSES[task].from_config(config).eval()


def peft_sites(peft_model) -> tuple[set[str], set[str]]:
    """The modules PEFT adapted, and those it scales at their input."""
    layers = {name.removeprefix(PREFIX): module for name, module in peft_model.named_modules()
              if hasattr(module, "ia3_l") and name.startswith(PREFIX)}
    return set(layers), {name for name, module in layers.items() if module.is_feedforward}


def report(gm) -> dict:
    return gm.info.history[-1]["report"]


def same(ours, theirs, inputs=None) -> None:
    inputs = inputs or fresh_inputs()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_targets_are_peft_defaults_with_peft_counts(arch):
    model = model_of(arch)
    gm = capture_tiny(model)
    rewrite.apply(gm, "ia3")
    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(task_type="CAUSAL_LM"))
    assert (set(report(gm)["targets"]), set(report(gm)["feedforward"])) == peft_sites(peft_model)
    assert count_parameters(gm)[0] == peft_model.get_nb_trainable_parameters()[0]


def test_bert_default_is_structural_and_peft_table_is_one_option_away():
    """PEFT's `output.dense` also matches BERT's attention output (a suffix accident); the structural default
    leaves it alone, and PEFT's own lists reproduce PEFT's default exactly."""
    model = model_of("bert", "seq-cls")
    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(task_type="SEQ_CLS"))
    base = capture_tiny(model)
    gm = copy.deepcopy(base)
    rewrite.apply(gm, "ia3")
    assert set(report(gm)["targets"]) == peft_sites(peft_model)[0] - {
        f"bert.encoder.layer.{i}.attention.output.dense" for i in (0, 1)}
    gm = base
    rewrite.apply(gm, "ia3", targets=PEFT_TARGETS["bert"], feedforward=PEFT_FEEDFORWARD["bert"])
    assert (set(report(gm)["targets"]), set(report(gm)["feedforward"])) == peft_sites(peft_model)
    assert count_parameters(gm)[0] == peft_model.get_nb_trainable_parameters()[0]


CASES = {"llama-biased": ("llama", "causal-lm", dict(attention_bias=True)), "gpt2": ("gpt2", "causal-lm", {}),
         "bert": ("bert", "seq-cls", {})}  # GPT-2's and BERT's defaults: also in the quick matrix (test_matrix.py)


@pytest.mark.parametrize("case", ["llama-biased", pytest.param("gpt2", marks=pytest.mark.slow),
                                  pytest.param("bert", marks=pytest.mark.slow)])
def test_both_adapter_directions_and_fold_equal_peft(case, tmp_path):
    """Ours saved, PEFT loads it with our outputs and merges it as we fold; PEFT's saved, we load with its outputs.
    The folded graph is node for node the base capture."""
    arch, task, config = CASES[case]
    model = model_of(arch, task, **config)
    base = capture_tiny(model)
    gm = copy.deepcopy(base)
    rewrite.apply(gm, "ia3")
    randomize_trainable(gm, 1, around_current=True)
    rewrite.save_adapter(gm, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    same(gm, theirs)

    folded = copy.deepcopy(gm)
    rewrite.apply(folded, "fold")
    same(folded, theirs.merge_and_unload())
    ops = lambda g: [(n.op, str(n.target)) for n in g.graph.nodes]  # noqa: E731
    assert ops(folded) == ops(base)
    assert not [name for name, _ in folded.named_parameters() if "ia3_l" in name]

    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(task_type=TASK_TYPES[task],
                                                                target_modules=report(gm)["targets"],
                                                                feedforward_modules=report(gm)["feedforward"]))
    randomize_trainable(peft_model, 2, around_current=True)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    rewrite.load_adapter(loaded, tmp_path / "peft")
    same(loaded, peft_model.eval())


def test_adapter_files_are_peft_files_for_conv1d(tmp_path):
    """Keys `base_model.model.<path>.ia3_l`, `[out, 1]` and `[1, in]`, and the config fields PEFT writes (Conv1D
    sets fan_in_fan_out)."""
    model = model_of("gpt2")
    gm = capture_tiny(model)
    rewrite.apply(gm, "ia3")
    rewrite.save_adapter(gm, tmp_path / "ours")
    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    ours, theirs = [safetensors.torch.load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft")]
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ours[PREFIX + "transformer.h.0.attn.c_attn.ia3_l"].shape == (192, 1)
    assert ours[PREFIX + "transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 256)
    config, peft_config = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft")]
    for key in ("peft_type", "task_type", "fan_in_fan_out", "init_ia3_weights", "modules_to_save", "exclude_modules"):
        assert config[key] == peft_config[key], key
    assert config["fan_in_fan_out"] is True
    assert config["feedforward_modules"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


@pytest.mark.parametrize("targets,feedforward", [(["k_proj", "up_proj", "p_proj"], ["p_proj"]),
                                                 (["k_proj", "up_proj"], ".*up_proj")])
def test_feedforward_modules_follow_peft_rules(targets, feedforward, tmp_path):
    """A list entry matches the end of the path with no dot boundary (`p_proj` is `up_proj`; PEFT wants the list
    among the targets' names), a string fullmatches."""
    model = model_of("llama")
    base = capture_tiny(model)
    gm = copy.deepcopy(base)
    rewrite.apply(gm, "ia3", targets=targets, feedforward=feedforward)
    assert report(gm)["feedforward"] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert gm.get_parameter("model.layers.0.mlp.up_proj.ia3_l").shape == (1, 64)
    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                                                                feedforward_modules=feedforward))
    randomize_trainable(peft_model, 3, around_current=True)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = base
    rewrite.load_adapter(loaded, tmp_path / "peft")
    assert report(loaded)["feedforward"] == report(gm)["feedforward"]
    same(loaded, peft_model.eval())


def test_vectors_train_and_the_base_does_not():
    gm = capture_tiny(model_of("llama"))
    rewrite.apply(gm, "ia3")
    logits(gm, fresh_inputs())  # no_grad forward first: the graph is reusable
    gm(**fresh_inputs()).logits.square().mean().backward()
    grads = {name: param.grad for name, param in gm.named_parameters()}
    assert all(grads[name] is not None and grads[name].abs().sum() > 0 for name in gm.info.trainable)
    assert all(grad is None for name, grad in grads.items() if name not in gm.info.trainable)


def test_errors_are_one_sentence(tmp_path):
    base = capture_tiny(model_of("llama"))
    gm = copy.deepcopy(base)
    with pytest.raises(rewrite.RewriteError, match=r"^IA³ feedforward \['o_proj'\] matches none of its targets "
                                                   r"\(down_proj, k_proj, v_proj\); name modules among the targets$"):
        rewrite.apply(gm, "ia3", feedforward=["o_proj"])
    rewrite.apply(gm, "lora", roles=["v"])
    with pytest.raises(rewrite.RewriteError, match=r"^model\.layers\.0\.self_attn\.v_proj is already adapted by LoRA; "
                                                   "fold it first or start from the base graph$"):
        rewrite.apply(gm, "ia3")
    gm = base
    rewrite.apply(gm, "ia3")
    rewrite.apply(gm, "fold")
    with pytest.raises(rewrite.RewriteError, match="^the graph's IA³ vectors were folded into its weights, so it has "
                                                   "no adapter to save"):
        rewrite.save_adapter(gm, tmp_path / "x")


def run_onnx(path, inputs, adapters: Adapters | None = None):
    feeds, options, _loaded = (adapters or Adapters()).run_inputs(path, len(inputs["input_ids"]))
    return runtime.run(runtime.session(path), inputs | feeds, options)["logits"]


def close(expected, got, inputs) -> None:
    expected, got = real_positions(torch.as_tensor(expected), torch.as_tensor(got), inputs)
    torch.testing.assert_close(torch.as_tensor(got), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_rows_in_pytorch_equal_each_adapters_graph(arch):
    """The per-row graph scales each row by its own adapter's vectors (GPT-2's Conv1D reads 2-D inputs); a row on
    the no-adapter defaults (ones) is the base model."""
    model = model_of(arch)
    gm = capture_tiny(model)
    rewrite.apply(gm, "ia3")
    trained = [copy.deepcopy(gm) for _ in range(2)]
    for number, adapter in enumerate(trained):
        randomize_trainable(adapter, 10 + number, around_current=True)
    prepared, slots = adapter_slots.prepared(gm)
    defaults = adapter_slots.defaults(prepared, slots)
    assert all(torch.equal(value, torch.ones_like(value)) for value in defaults.values())
    stacked = adapter_slots.stack(slots, [adapter_slots.values(a) for a in trained] + [defaults], defaults)
    mixed = adapter_slots.mixed(prepared, slots)
    index = [1, 2, 0]
    inputs = fresh_inputs()
    with torch.no_grad():
        got = mixed(**inputs, **{adapter_slots.python_name(k): v for k, v in stacked.items()},
                    adapter_index=torch.tensor(index)).logits
    for row, number in enumerate(index):
        expected = logits(trained[number] if number < 2 else model, inputs)[row:row + 1]
        torch.testing.assert_close(got[row:row + 1], expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_onnx_slots_and_mixed_rows_equal_each_adapters_graph(arch, tmp_path):
    """No adapter is the base (vectors of ones); one active, or one per row (GPT-2's 2-D Conv1D input too), is that
    adapter's own graph; PEFT's saved adapter through the slots is PEFT's model."""
    model = model_of(arch)
    gm = capture_tiny(model)
    rewrite.apply(gm, "ia3")
    rewrite.export_onnx(gm, tmp_path / "slots.onnx", adapter_slots=True)
    rewrite.export_onnx(gm, tmp_path / "mixed.onnx", mixed_adapters=True)
    inputs = fresh_inputs()
    close(logits(model, inputs), run_onnx(tmp_path / "slots.onnx", inputs), inputs)
    close(logits(model, inputs), run_onnx(tmp_path / "mixed.onnx", inputs), inputs)
    trained, files = [], []
    for number in range(2):
        adapter = copy.deepcopy(gm)
        randomize_trainable(adapter, 10 + number, around_current=True)
        rewrite.save_adapter(adapter, tmp_path / f"a{number}")
        one = export_adapter(tmp_path / f"a{number}", tmp_path / f"a{number}.onnx_adapter", tmp_path / "slots.onnx")
        close(logits(adapter, inputs), run_onnx(tmp_path / "slots.onnx", inputs, Adapters(active=str(one))), inputs)
        files.append(str(export_adapter(tmp_path / f"a{number}", tmp_path / f"m{number}.onnx_adapter",
                                        tmp_path / "mixed.onnx")))
        trained.append(adapter)
    index = [1, 0, 1]
    got = run_onnx(tmp_path / "mixed.onnx", inputs, Adapters(stacked=files, index=index))
    for row, number in enumerate(index):
        row_inputs = {k: v[row:row + 1] for k, v in inputs.items()}
        close(logits(trained[number], inputs)[row:row + 1], got[row:row + 1], row_inputs)
    assert not np.allclose(got[0], got[1], atol=1e-3), "the adapters really differ"

    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(task_type="CAUSAL_LM"))
    randomize_trainable(peft_model, 4, around_current=True)
    peft_model.save_pretrained(tmp_path / "peft")
    file = export_adapter(tmp_path / "peft", tmp_path / "peft.onnx_adapter", tmp_path / "slots.onnx")
    close(logits(peft_model.eval(), inputs), run_onnx(tmp_path / "slots.onnx", inputs, Adapters(active=str(file))),
          inputs)
