"""LoRA on embeddings and the LM head (PEFT's `lora.Embedding`, and Linear LoRA on `lm_head`): PEFT's forward,
init, keys and counts in both adapter directions; the fold equals PEFT's `merge_and_unload` on untied models and
PEFT's unmerged forward on tied ones (where PEFT's merge writes into the shared weight); ONNX slots and mixed
batches."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import rewrite
from rewrite.adapters import slots as adapter_slots
from rewrite.adapters.low_rank import LowRank
from rewrite.export.onnx import real_positions
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters, stacked_feeds
from rewrite.graph.params import count_parameters
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.training import speed
from rewrite.training.head_loss import head_of
from rewrite.training.losses import loss_sum
from rewrite import runtime

from conftest import tiny_model
from helpers import assert_folds_to, capture_tiny, fresh_inputs, logits, randomize_trainable

CASES = [  # (arch, task, targets): untied LLaMA, GPT-2 and BERT whose word embedding is their LM head's weight
    ("llama", "causal-lm", ["embed_tokens", "q_proj"]),
    ("gpt2", "causal-lm", ["wte", "lm_head"]),
    ("bert", "masked-lm", ["word_embeddings", "query"]),
]
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "masked-lm": None}
SPEED_PASSES = ["chunked_loss", "fused_lora", "dense_attention", "grouped_attention", "rows", "fast_dropout",
                "gated_activation", "recompute_input", "checkpoint"]


def peft_model(model, task, targets, **config):
    return get_peft_model(copy.deepcopy(model), LoraConfig(task_type=PEFT_TASK[task], r=4, lora_alpha=8,
                                                           target_modules=targets, **config))


def adapted(arch, task, targets):
    model = tiny_model(arch, task)
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", targets=targets, rank=4, alpha=8)
    return model, gm


def gemma():
    torch.manual_seed(0)
    config = transformers.GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return transformers.GemmaForCausalLM(config).eval()


@pytest.mark.parametrize("arch,task,targets", CASES)
def test_both_adapter_directions_equal_peft_with_its_keys_and_counts(arch, task, targets, tmp_path):
    model, gm = adapted(arch, task, targets)
    reference = peft_model(model, task, targets)
    assert count_parameters(gm)[0] == reference.get_nb_trainable_parameters()[0]
    randomize_trainable(gm, 1, scale=0.3)
    rewrite.save_adapter(gm, tmp_path / "ours")
    inputs = fresh_inputs()
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(loaded, inputs), atol=1e-5, rtol=0)
    ours = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(k.rpartition(".")[2] for k in ours if "lora_embedding" in k) == ["lora_embedding_A", "lora_embedding_B"]

    randomize_trainable(reference, 2, scale=0.3)
    reference.save_pretrained(tmp_path / "peft")  # with `lm_head` or `embed_tokens` targeted: the base copy too
    theirs = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k for k in theirs if "base_layer" not in k} == set(ours)
    reload = capture_tiny(model)
    rewrite.load_adapter(reload, tmp_path / "peft")
    torch.testing.assert_close(logits(reload, inputs), logits(reference.eval(), inputs), atol=1e-5, rtol=0)


def test_embedding_init_and_dropout_follow_peft():
    _, gm = adapted("llama", "causal-lm", ["embed_tokens"])
    a = gm.get_parameter("model.embed_tokens.lora_embedding_A")
    b = gm.get_parameter("model.embed_tokens.lora_embedding_B")
    assert a.shape == (4, 128) and b.shape == (64, 4)
    assert torch.count_nonzero(a) == 0 and 0.7 < b.std().item() < 1.3  # PEFT: A zero, B ~ N(0, 1)
    gm = capture_tiny(tiny_model("llama"))
    rewrite.apply(gm, "lora", targets=["embed_tokens"], rank=4, dropout=0.5)
    randomize_trainable(gm, 1, scale=0.3)
    inputs = fresh_inputs()
    gm.train()
    torch.testing.assert_close(logits(gm, inputs), logits(gm, inputs), atol=0, rtol=0)  # PEFT: no branch dropout


def test_the_pad_column_of_a_takes_no_gradient_as_in_peft():
    model, gm = adapted("bert", "masked-lm", ["word_embeddings"])
    reference = peft_model(model, "masked-lm", ["word_embeddings"])
    randomize_trainable(gm, 1, scale=0.3)
    inputs = fresh_inputs()
    inputs["input_ids"][:, 3] = 0  # BERT's pad id
    gm(**inputs).logits.sum().backward()
    layer = reference.base_model.model.bert.embeddings.word_embeddings
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(gm.get_parameter("bert.embeddings.word_embeddings.lora_embedding_A"))
        layer.lora_embedding_B["default"].copy_(gm.get_parameter("bert.embeddings.word_embeddings.lora_embedding_B"))
    reference.eval()(**inputs).logits.sum().backward()
    grad = gm.get_parameter("bert.embeddings.word_embeddings.lora_embedding_A").grad
    assert torch.all(grad[:, 0] == 0) and torch.count_nonzero(grad) > 0
    torch.testing.assert_close(grad, layer.lora_embedding_A["default"].grad, atol=1e-5, rtol=0)


def test_fold_equals_merge_and_unload_on_an_untied_model():
    model, gm = adapted("llama", "causal-lm", ["embed_tokens", "lm_head", "v_proj"])
    base = capture_tiny(model)
    randomize_trainable(gm, 1, scale=0.3)
    merged = peft_model(model, "causal-lm", ["embed_tokens", "lm_head", "v_proj"])
    merged.load_state_dict({f"base_model.model.{k}".replace(".lora_A.weight", ".lora_A.default.weight")
                            .replace(".lora_B.weight", ".lora_B.default.weight")
                            .replace("lora_embedding_A", "lora_embedding_A.default")
                            .replace("lora_embedding_B", "lora_embedding_B.default"): v
                            for k, v in gm.state_dict().items() if "lora_" in k}, strict=False)
    merged = merged.merge_and_unload()
    assert_folds_to(gm, merged, base)


@pytest.mark.parametrize("arch,task,targets", [
    ("gpt2", "causal-lm", ["lm_head"]),
    ("gpt2", "causal-lm", ["wte"]),
    ("gpt2", "causal-lm", ["wte", "lm_head"]),
    ("bert", "masked-lm", ["word_embeddings"]),
    ("bert", "masked-lm", ["decoder"]),
    ("gemma", "causal-lm", ["embed_tokens"]),
])
def test_fold_on_tied_weights_unties_and_equals_peft_unmerged_forward(arch, task, targets, tmp_path):
    """PEFT's merge_and_unload adds the delta into the weight the embedding and the head share, so its merged model
    differs from its own forward (by 10-30 here); the fold gives the adapted module its own merged weight."""
    model = gemma() if arch == "gemma" else tiny_model(arch, task)
    gm = rewrite.capture(copy.deepcopy(model), example_inputs(["input_ids", "attention_mask"], 128, batch=2, seq=8))
    rewrite.apply(gm, "lora", targets=targets, rank=4, alpha=8)
    randomize_trainable(gm, 1, scale=0.3)
    rewrite.save_adapter(gm, tmp_path / "ours")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    inputs = fresh_inputs()
    expected = logits(reference, inputs)
    torch.testing.assert_close(logits(gm.eval(), inputs), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(reference.merge_and_unload(), inputs), expected, atol=1e-2)
    rewrite.apply(gm, "fold")
    torch.testing.assert_close(logits(gm, inputs), expected, atol=1e-5, rtol=0)
    rewrite.save(gm, tmp_path / "folded.pt2")
    torch.testing.assert_close(logits(rewrite.load(tmp_path / "folded.pt2"), inputs), expected, atol=1e-5, rtol=0)


def test_loading_a_peft_file_writes_its_base_embedding_copy_as_peft_does(tmp_path):
    model = tiny_model("llama")
    reference = peft_model(model, "causal-lm", ["embed_tokens"])
    randomize_trainable(reference, 2, scale=0.3)
    reference.save_pretrained(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_model.safetensors"
    weights = safetensors.torch.load_file(file)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    weights[key] = weights[key] + 0.25  # an embedding trained or resized with the adapter
    safetensors.torch.save_file(weights, file)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    gm = capture_tiny(model)
    rewrite.load_adapter(gm, tmp_path / "peft")
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm, inputs), logits(loaded, inputs), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(gm, inputs), logits(reference.eval(), inputs), atol=1e-3)


def test_saved_config_names_the_embedding_targets(tmp_path):
    _, gm = adapted("gpt2", "causal-lm", ["wte", "c_attn"])
    rewrite.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn",
                                                "transformer.wte"]
    assert config["fan_in_fan_out"] is True and config["peft_type"] == "LORA"
    _, gm = adapted("llama", "causal-lm", ["embed_tokens"])
    rewrite.save_adapter(gm, tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_a_variant_without_an_embedding_branch_refuses_an_embedding_target():
    class Variant(LowRank):
        name, title = "variant", "Variant"

    gm = capture_tiny(tiny_model("llama"))
    with pytest.raises(rewrite.RewriteError, match="^Variant on the embedding model.embed_tokens is not supported; "
                                                   "put LoRA on it, or target linear modules with Variant$"):
        rewrite.Pipeline([Variant(targets=["embed_tokens"])]).run(gm)


def test_an_embedding_that_renormalizes_its_rows_is_refused():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8, max_norm=1.0)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids))

    gm = rewrite.capture(Net().eval(), {"input_ids": torch.randint(0, 20, (2, 5))})
    with pytest.raises(rewrite.RewriteError, match=r"^LoRA on the embedding emb is not supported: it renormalizes the "
                                                   r"rows it looks up \(max_norm\), .*; leave it out of the targets$"):
        rewrite.apply(gm, "lora", targets=["emb"])
    assert not gm.info.history


def test_a_target_matching_nothing_lists_the_embeddings_too():
    gm = capture_tiny(tiny_model("gpt2"))
    with pytest.raises(rewrite.RewriteError, match="linear modules in this graph: c_attn, c_fc, c_proj, lm_head; "
                                                   "embeddings: wpe, wte$"):
        rewrite.apply(gm, "lora", targets=["nope"])


def test_training_speed_passes_keep_the_loss_and_gradients_of_embedding_and_head_branches():
    gm = capture_tiny(tiny_model("gpt2"))
    rewrite.apply(gm, "lora", targets=["wte", "lm_head", "c_attn"], rank=4)
    randomize_trainable(gm, 1, scale=0.3)
    fast = speed.twin(gm, speed.resolve(SPEED_PASSES, dropout_parity=False, custom_loss=False)).eval()
    inputs = example_inputs(["input_ids", "attention_mask"], 128, batch=3, seq=11)  # unpadded: every pass applies
    factors = [p for n, p in gm.named_parameters() if ".lora_" in n]
    results = []
    for graph in (gm.eval(), fast):
        loss = loss_sum(graph(**inputs), inputs["input_ids"], "causal-lm", head=head_of(graph))
        results.append((loss, *torch.autograd.grad(loss, factors)))
    for ours, plain in zip(*results):
        torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Slotted and mixed exports of LLaMA with LoRA on embed_tokens and q_proj, three trained adapters (ranks 4, 2,
    8) with their folded graphs and `.onnx_adapter` files."""
    directory = tmp_path_factory.mktemp("embedding-slots")
    model = tiny_model("llama")
    base = capture_tiny(model)

    def trained(rank, seed):
        gm = copy.deepcopy(base)
        rewrite.apply(gm, "lora", targets=["embed_tokens", "q_proj"], rank=rank, alpha=8)
        randomize_trainable(gm, seed, scale=0.3)
        return gm

    untrained = trained(4, seed=0)
    rewrite.export_onnx(untrained, directory / "slots.onnx", adapter_slots=True)
    rewrite.export_onnx(untrained, directory / "mixed.onnx", mixed_adapters=True)
    graphs, files, folded = [], [], []
    for number, rank in enumerate([4, 2, 8]):
        gm = trained(rank, seed=10 + number)
        rewrite.save_adapter(gm, directory / f"adapter{number}")
        files.append(export_adapter(directory / f"adapter{number}", directory / f"a{number}.onnx_adapter",
                                    directory / "slots.onnx"))
        merged = copy.deepcopy(gm)
        rewrite.apply(merged, "fold")
        graphs.append(gm)
        folded.append(merged)
    return directory, untrained, graphs, files, folded


def assert_real_close(got, expected, inputs) -> None:
    """Equal logits at the real (unpadded) positions."""
    expected, got = real_positions(torch.as_tensor(expected), torch.as_tensor(got), inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_embedding_branch_rides_onnx_slots(served):
    directory, _, _, files, folded = served
    inputs = fresh_inputs()
    session = runtime.session(directory / "slots.onnx")
    for number in range(3):
        feeds, options, _ = Adapters(active=str(files[number])).run_inputs(directory / "slots.onnx", 3)
        got = runtime.run(session, inputs | feeds, options)["logits"]
        assert_real_close(got, logits(folded[number], inputs), inputs)


@pytest.mark.slow
def test_mixed_batch_rows_gather_their_own_embedding_branch(served):
    directory, untrained, graphs, files, folded = served
    index = [0, 1, 2, 2, 1, 0]
    inputs = fresh_inputs(batch=len(index))
    got = runtime.run(runtime.session(directory / "mixed.onnx"),
                      inputs | stacked_feeds(files, directory / "mixed.onnx", index))["logits"]
    prepared, slots = adapter_slots.prepared(untrained)
    stacked = adapter_slots.stack(slots, [adapter_slots.values(g) for g in graphs],
                                  adapter_slots.defaults(prepared, slots))
    mixed = adapter_slots.mixed(prepared, slots)
    with torch.no_grad():
        got_torch = mixed(**inputs, **{adapter_slots.python_name(k): v for k, v in stacked.items()},
                          adapter_index=torch.tensor(index)).logits
    for row, pick in enumerate(index):
        one = {k: v[row:row + 1] for k, v in inputs.items()}
        expected = logits(folded[pick], one)
        assert_real_close(got_torch[row:row + 1], expected, one)
        assert_real_close(got[row:row + 1], expected, one)


@pytest.mark.slow  # two CLI processes
def test_the_cli_puts_lora_on_an_embedding_and_folds_it(tmp_path):
    model = tiny_model("gpt2")
    rewrite.save(capture_tiny(model), tmp_path / "base.pt2")
    for command in (["apply", tmp_path / "base.pt2", "--pass", "lora", "--targets", "wte,lm_head", "--rank", "4",
                     "-o", tmp_path / "lora.pt2"], ["fold", tmp_path / "lora.pt2", "-o", tmp_path / "folded.pt2"]):
        result = subprocess.run([sys.executable, "-c", "from rewrite.cli.main import main; main()", *map(str, command)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    gm = rewrite.load(tmp_path / "lora.pt2")
    assert sorted(gm.info.history[-1]["report"]["targets"]) == ["lm_head", "transformer.wte"]
    randomize_trainable(gm, 1, scale=0.3)
    inputs = fresh_inputs()
    expected = logits(gm.eval(), inputs)
    rewrite.apply(gm, "fold")
    torch.testing.assert_close(logits(gm, inputs), expected, atol=1e-5, rtol=0)
    assert not [n for n, _ in rewrite.load(tmp_path / "folded.pt2").named_parameters() if "lora_" in n]


@pytest.mark.slow
def test_a_peft_embedding_adapter_with_its_base_copy_fills_the_slots(served, tmp_path):
    directory = served[0]
    model = tiny_model("llama")
    reference = peft_model(model, "causal-lm", ["embed_tokens", "q_proj"])
    randomize_trainable(reference, 3, scale=0.3)
    reference.save_pretrained(tmp_path / "peft")  # with model.embed_tokens.base_layer.weight, no slot of the model
    file = export_adapter(tmp_path / "peft", tmp_path / "peft.onnx_adapter", directory / "slots.onnx")
    inputs = fresh_inputs()
    feeds, options, _ = Adapters(active=str(file)).run_inputs(directory / "slots.onnx", 3)
    got = runtime.run(runtime.session(directory / "slots.onnx"), inputs | feeds, options)["logits"]
    assert_real_close(got, logits(reference.eval(), inputs), inputs)
