"""One ONNX model, many adapters: slots filled by `.onnx_adapter` files, and per-row mixed adapters.

Every comparison is against a reference computed another way: each adapter's own folded export, the base
export, PEFT's model in eager PyTorch, or the folded torch graphs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import rewrite
from rewrite.adapters import slots as adapter_slots
from rewrite import runtime
from rewrite.export.onnx import real_positions
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters, SlotLayout, stacked_feeds
from rewrite.adapters.prompt_table import TABLE

from helpers import TASK_TYPES, capture_tiny, fresh_inputs, randomize_lora

# (rank, alpha) of the four adapters: different ranks, so stacking pads them
ADAPTERS = [(4, 8), (2, 4), (8, 8), (4, 16)]
MIXED_INDEX = [0, 1, 2, 3, 3, 2, 1, 0]


def perturb_heads(gm, seed: int) -> None:
    """A trained seq-cls adapter carries its own head (PEFT's modules_to_save): give it other values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in gm.info.trainable:
            if ".lora_" not in name:
                param = gm.get_parameter(name)
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def compare(expected, got, inputs, atol=1e-4):
    expected, got = real_positions(torch.as_tensor(expected), torch.as_tensor(got), inputs)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@dataclass
class Family:
    """A base model, its slotted and mixed exports, four trained adapters, their folded graphs, and the first
    three's folded exports."""

    model: torch.nn.Module
    base: rewrite.RewriteGraph
    vocab: int
    directory: Path
    task: str
    adapters: list[rewrite.RewriteGraph] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    folded: list = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.directory / name

    def inputs(self, batch: int = 3):
        """Another shape than the capture's, with a padded row; every input the model takes (token types too)."""
        return example_inputs(self.base.info.input_names, self.vocab, batch=batch, seq=11, seed=5, pad=True)

    def lora(self, rank: int, alpha: float, seed: int):
        gm = copy.deepcopy(self.base)
        torch.manual_seed(seed)
        rewrite.apply(gm, "lora", rank=rank, alpha=alpha, roles=["q", "v"])
        return gm


def build_family(model, base, vocab, directory: Path) -> Family:
    family = Family(model, base, vocab, directory, base.info.task)
    rewrite.export_onnx(base, family.path("base.onnx"))
    untrained = family.lora(4, 8, seed=0)
    rewrite.export_onnx(untrained, family.path("slots.onnx"), adapter_slots=True)
    rewrite.export_onnx(untrained, family.path("mixed.onnx"), mixed_adapters=True)
    for number, (rank, alpha) in enumerate(ADAPTERS):
        gm = family.lora(rank, alpha, seed=number)
        randomize_lora(gm, seed=10 + number)
        perturb_heads(gm, seed=20 + number)
        rewrite.save_adapter(gm, family.path(f"adapter{number}"))
        family.files.append(export_adapter(family.path(f"adapter{number}"), family.path(f"a{number}.onnx_adapter"),
                                           family.path("slots.onnx")))
        folded = copy.deepcopy(gm)
        rewrite.apply(folded, "fold")
        if number < 3:
            rewrite.export_onnx(folded, family.path(f"folded{number}.onnx"))
        family.adapters.append(gm)
        family.folded.append(folded)
    return family


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from conftest import tiny_model

    model = tiny_model("llama")
    return build_family(model, capture_tiny(model), 128, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def minilm(minilm_dir, tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    base = rewrite.load_pretrained(minilm_dir, task="seq-cls", num_labels=2)
    with torch.no_grad():  # the same fresh head in the graph and in PEFT's model
        for name, param in model.classifier.named_parameters():
            base.get_parameter(f"classifier.{name}").copy_(param)
    return build_family(model, base, 30522, tmp_path_factory.mktemp("minilm"))


FAMILIES = ["llama", pytest.param("minilm", marks=pytest.mark.slow)]


@pytest.fixture(params=FAMILIES)
def family(request) -> Family:
    return request.getfixturevalue(request.param)


def run_onnx(path, inputs, adapters: Adapters | None = None):
    feeds, options, _loaded = (adapters or Adapters()).run_inputs(path, len(inputs["input_ids"]))
    return runtime.run(runtime.session(path), inputs | feeds, options)["logits"]


def test_slots_are_named_inputs_with_rank_zero_defaults(llama):
    layout = SlotLayout.of_model(llama.path("slots.onnx"))
    names = [s.name for s in layout.slots]
    assert names == [f"model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
                     for i in (0, 1) for p in ("q", "v") for ab in ("A", "B")]
    import onnx

    model = onnx.load(str(llama.path("slots.onnx")))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    defaults = {t.name: list(t.dims) for t in model.graph.initializer if t.name in names}
    assert inputs["model.layers.0.self_attn.q_proj.lora_A.weight"] == ["rank", 64]
    assert inputs["model.layers.0.self_attn.v_proj.lora_B.weight"] == [32, "rank"]
    assert defaults["model.layers.0.self_attn.q_proj.lora_A.weight"] == [0, 64]


def test_no_adapter_active_is_the_base_export(family):
    inputs = family.inputs()
    expected = run_onnx(family.path("base.onnx"), inputs)
    compare(expected, run_onnx(family.path("slots.onnx"), inputs), inputs)
    compare(expected, run_onnx(family.path("mixed.onnx"), inputs), inputs)


def test_each_adapter_active_equals_its_folded_export(family):
    inputs = family.inputs()
    outputs = []
    for number in range(3):
        expected = run_onnx(family.path(f"folded{number}.onnx"), inputs)
        got = run_onnx(family.path("slots.onnx"), inputs, Adapters(active=str(family.files[number])))
        compare(expected, got, inputs)
        outputs.append(got)
    assert not np.allclose(outputs[0], outputs[1], atol=1e-3), "the adapters really differ"


def test_mixed_batch_rows_equal_their_own_folded_models(family):
    inputs = family.inputs(batch=len(MIXED_INDEX))
    feeds = stacked_feeds(family.files, family.path("mixed.onnx"), MIXED_INDEX)
    assert feeds["model.layers.0.self_attn.q_proj.lora_A.weight" if family.task != "seq-cls"
                 else "bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape[:2] == (4, 8)  # padded to 8
    got = runtime.run(runtime.session(family.path("mixed.onnx")), inputs | feeds)["logits"]
    prepared, slots = adapter_slots.prepared(family.lora(4, 8, seed=0))  # in PyTorch alone, on the graphs' tensors
    stacked = adapter_slots.stack(slots, [adapter_slots.values(g) for g in family.adapters],
                                  adapter_slots.defaults(prepared, slots))
    torch_graph = adapter_slots.mixed(prepared, slots)
    slot_inputs = {adapter_slots.python_name(k): v for k, v in stacked.items()}
    with torch.no_grad():
        got_torch = torch_graph(**inputs, **slot_inputs, adapter_index=torch.tensor(MIXED_INDEX)).logits
    for number in range(4):
        with torch.no_grad():
            expected = family.folded[number](**inputs).logits
        for row in [row for row, pick in enumerate(MIXED_INDEX) if pick == number]:
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            compare(expected[row:row + 1], got[row:row + 1], one)
            compare(expected[row:row + 1], got_torch[row:row + 1], one)


def test_peft_adapter_directory_equals_peft(family):
    config = LoraConfig(task_type=TASK_TYPES[family.task], r=6, lora_alpha=9)
    peft_model = get_peft_model(copy.deepcopy(family.model), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(family.path("peft"))
    file = export_adapter(family.path("peft"), family.path("peft.onnx_adapter"), family.path("slots.onnx"))
    inputs = family.inputs()
    with torch.no_grad():
        expected = peft_model.eval()(**inputs).logits
    compare(expected, run_onnx(family.path("slots.onnx"), inputs, Adapters(active=str(file))), inputs)


def test_prompt_table_rides_a_slot(tmp_path):
    from conftest import tiny_model

    gm = capture_tiny(tiny_model("llama"))
    rewrite.apply(gm, "prompt", num_virtual_tokens=4)
    rewrite.export_onnx(gm, tmp_path / "slots.onnx", adapter_slots=True)
    with torch.no_grad():
        gm.get_parameter(TABLE).mul_(3.0)
    rewrite.save(gm, tmp_path / "trained.pt2")
    file = export_adapter(tmp_path / "trained.pt2", tmp_path / "p.onnx_adapter", tmp_path / "slots.onnx")
    inputs = fresh_inputs()
    with torch.no_grad():
        expected = gm(**inputs).logits
    compare(expected, run_onnx(tmp_path / "slots.onnx", inputs, Adapters(active=str(file))), inputs)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Another tiny LLaMA (same shapes, other weights) exported with a rank limit of 4."""
    from conftest import tiny_model

    path = tmp_path_factory.mktemp("other") / "other.onnx"
    other = capture_tiny(tiny_model("llama", seed=1))
    rewrite.apply(other, "lora", rank=4, alpha=8, roles=["q", "v"])
    rewrite.export_onnx(other, path, adapter_slots=True, max_rank=4)
    return path


def test_adapter_for_another_base_model_is_refused(llama, other_base):
    with pytest.raises(rewrite.RewriteError, match="made for another base model"):
        Adapters(active=str(llama.files[0])).run_inputs(other_base, 1)


def test_adapter_of_another_architecture_names_the_first_mismatch(llama, tiny_bert_dir, tmp_path):
    gm = rewrite.load_pretrained(tiny_bert_dir)
    rewrite.apply(gm, "lora", rank=4)
    rewrite.save_adapter(gm, tmp_path / "bert")
    output = tmp_path / "x.onnx_adapter"
    with pytest.raises(rewrite.RewriteError, match=r"tensor bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A"
                                                   r"\.weight, which names no slot"):
        export_adapter(tmp_path / "bert", output, llama.path("slots.onnx"))
    assert not output.exists() and not list(tmp_path.glob(".x.onnx_adapter*"))


def test_rank_above_the_slot_limit_is_refused(llama, other_base, tmp_path):
    with pytest.raises(rewrite.RewriteError, match="has rank 8, above the model's slot limit of 4"):
        export_adapter(llama.path("adapter2"), tmp_path / "x.onnx_adapter", other_base)
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_index_out_of_range_and_missing_file_are_one_sentence(llama):
    with pytest.raises(rewrite.RewriteError, match="adapter index 4 is out of range for 2 adapters"):
        stacked_feeds(llama.files[:2], llama.path("mixed.onnx"), [0, 4])
    with pytest.raises(rewrite.RewriteError, match="does not exist"):
        stacked_feeds([llama.path("nope.onnx_adapter")], llama.path("mixed.onnx"), [0])
    with pytest.raises(rewrite.RewriteError, match="has no adapter slots"):
        export_adapter(llama.path("adapter0"), llama.path("x.onnx_adapter"), llama.path("base.onnx"))
    with pytest.raises(rewrite.RewriteError, match="serves one adapter at a time"):
        stacked_feeds(llama.files[:1], llama.path("slots.onnx"), [0])


def test_a_graph_without_unfolded_adapter_parameters_has_no_slots_to_expose(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("llama"))
    with pytest.raises(rewrite.RewriteError, match="^the graph has no adapter parameters .* to expose as slots"):
        adapter_slots.prepared(gm)
    rewrite.apply(gm, "lora", rank=4)
    rewrite.apply(gm, "fold")
    with pytest.raises(rewrite.RewriteError, match=r"^the graph's LoRA branches \(model\.layers\.0\.self_attn\.q_proj, "
                                                   r"\.\.\.\) were folded into its weights, so it has no adapter "
                                                   r"parameters to expose as slots"):
        rewrite.export_onnx(gm, tmp_path / "model.onnx", adapter_slots=True)
    assert list(tmp_path.iterdir()) == []

def test_ptuning_encoder_output_rides_a_slot(tiny_bert_dir, tmp_path):
    from rewrite.training.templates import graph_template

    gm = rewrite.load_pretrained(tiny_bert_dir)
    rewrite.apply(gm, "ptuning", template="[P] [P] {text}", placeholders=["[unused1]", "[unused2]"], encoder="mlp")
    rewrite.export_onnx(gm, tmp_path / "slots.onnx", adapter_slots=True)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.startswith("prompt_encoder."):
                param.add_(torch.randn(param.shape) * 5)
    rewrite.save(gm, tmp_path / "trained.pt2")
    file = export_adapter(tmp_path / "trained.pt2", tmp_path / "p.onnx_adapter", tmp_path / "slots.onnx")
    inputs = example_inputs(gm.info.input_names, 1000, batch=3, seq=9, seed=5)
    inputs["input_ids"][:, 1:3] = torch.tensor(graph_template(gm)[1])  # the template's placeholders after [CLS]
    with torch.no_grad():
        expected = gm(**inputs).logits
    got = run_onnx(tmp_path / "slots.onnx", inputs, Adapters(active=str(file)))
    compare(expected, got, inputs, atol=1e-6)  # this tiny random classifier's logits are about 0.01
    assert np.abs(got - run_onnx(tmp_path / "slots.onnx", inputs)).max() > 1e-5, "the prompts changed the output"


def prompt_family(gm, tmp_path, count: int, scale: float = 1.0):
    """The mixed export of `gm` (a prompt-learning graph), and per adapter (its prompt parameters drawn anew)
    its own export and an adapter file."""
    rewrite.export_onnx(gm, tmp_path / "mixed.onnx", mixed_adapters=True)
    files, own = [], []
    for number in range(count):
        trained = copy.deepcopy(gm)
        generator = torch.Generator().manual_seed(number)
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if name.startswith("prompt_encoder."):
                    param.add_(torch.randn(param.shape, generator=generator) * scale)
        rewrite.save(trained, tmp_path / f"trained{number}.pt2")
        files.append(str(export_adapter(tmp_path / f"trained{number}.pt2", tmp_path / f"p{number}.onnx_adapter",
                                        tmp_path / "mixed.onnx")))
        rewrite.export_onnx(trained, tmp_path / f"own{number}.onnx")
        own.append(tmp_path / f"own{number}.onnx")
    return files, own


def assert_rows_match_own_exports(tmp_path, files, own, inputs, index, atol=1e-4):
    got = run_onnx(tmp_path / "mixed.onnx", inputs, Adapters(stacked=files, index=index))
    for row, number in enumerate(index):
        expected = run_onnx(own[number], inputs)[row:row + 1]
        compare(expected, got[row:row + 1], {k: v[row:row + 1] for k, v in inputs.items()}, atol=atol)


def test_mixed_prompt_tables_rows_equal_their_own_exports(tmp_path):
    from conftest import tiny_model

    gm = capture_tiny(tiny_model("llama"))
    rewrite.apply(gm, "prompt", num_virtual_tokens=4)
    files, own = prompt_family(gm, tmp_path, 3)
    assert_rows_match_own_exports(tmp_path, files, own, fresh_inputs(batch=4), [2, 0, 1, 2])
    longer = capture_tiny(tiny_model("llama"))
    rewrite.apply(longer, "prompt", num_virtual_tokens=6)
    rewrite.save(longer, tmp_path / "longer.pt2")
    with pytest.raises(rewrite.RewriteError, match=r"has shape \(6, 64\) but the model's slot is \[4x64\]"):
        export_adapter(tmp_path / "longer.pt2", tmp_path / "longer.onnx_adapter", tmp_path / "mixed.onnx")
    assert not (tmp_path / "longer.onnx_adapter").exists()


def test_mixed_ptuning_tables_rows_equal_their_own_exports(tiny_bert_dir, tmp_path):
    from rewrite.training.templates import graph_template

    gm = rewrite.load_pretrained(tiny_bert_dir)
    rewrite.apply(gm, "ptuning", template="[P] [P] {text}", placeholders=["[unused1]", "[unused2]"], encoder="mlp")
    files, own = prompt_family(gm, tmp_path, 2, scale=5.0)
    inputs = example_inputs(gm.info.input_names, 1000, batch=3, seq=9, seed=5)
    inputs["input_ids"][:, 1:3] = torch.tensor(graph_template(gm)[1])  # the template's placeholders after [CLS]
    assert_rows_match_own_exports(tmp_path, files, own, inputs, [1, 0, 1], atol=1e-6)  # logits about 0.01
    assert np.abs(run_onnx(own[0], inputs) - run_onnx(own[1], inputs)).max() > 1e-5, "the prompts differ"
