"""Training: PEFT-equal gradients, learning on a small task, accumulation/soft-label/loss_fn equivalences,
checkpoint and output files, the CLI, and errors."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

import rewrite
from rewrite.cli.main import cli
from rewrite.errors import RewriteError
from rewrite.training.train import TrainConfig, evaluate, task_loss, train

from helpers import capture_tiny, checkpoint_tensors, first_moments, fresh_inputs, lora_graph, peft_twin, randomize_lora, sentiment_rows

def peft_name(name: str, saved: list[str]) -> str:
    """Our parameter name -> the PEFT model's (adapter name inserted, heads under modules_to_save)."""
    module, _, leaf = name.rpartition(".")
    if module in saved:
        return f"base_model.model.{module}.modules_to_save.default.{leaf}"
    return f"base_model.model.{module}.default.{leaf}"


def trainable(gm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,task", [("bert", "seq-cls"), ("llama", "causal-lm"), ("bert", "masked-lm")])
def test_training_loss_gradients_match_peft(make_tiny, arch, task):
    model = make_tiny(arch, task)
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", rank=8, alpha=16)
    randomize_lora(gm)
    reference = peft_twin(model, gm, task, r=8, lora_alpha=16,
                          target_modules=gm.info.history[-1]["report"]["targets"])
    inputs = fresh_inputs()
    if task == "seq-cls":
        labels = torch.tensor([1, 0, 1])
    else:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        if task == "masked-lm":
            labels[:, ::2] = -100

    task_loss(gm.eval()(**inputs), {"labels": labels}, task).backward()
    reference(**inputs, labels=labels).loss.backward()

    saved = gm.info.modules_to_save or []
    theirs = dict(reference.named_parameters())
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, theirs[peft_name(name, saved)].grad, atol=1e-5, rtol=0)


def test_loss_falls_and_accuracy_rises_on_a_learnable_task(tiny_bert_dir):
    gm = lora_graph(tiny_bert_dir, roles=("q", "k", "v", "o", "mlp"))
    dev = sentiment_rows(64, seed=1)
    # Hugging Face's dropout draws: the thresholds were set on this seed's trajectory (rows draws others).
    config = TrainConfig(epochs=4, lr=1e-2, batch_size=8, progress=False, dropout_parity=True)
    before = evaluate(gm, dev, config=config)

    result = train(gm, sentiment_rows(128, seed=0), eval_data=dev, config=config)

    losses = [h["loss"] for h in result.history if h["split"] == "train"]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.2
    assert result.eval["loss"] < before["loss"] - 0.2
    assert result.eval["accuracy"] >= before["accuracy"] + 0.3
    assert not gm.training


def test_gradient_accumulation_equals_one_big_batch(no_dropout_dir, tmp_path):
    rows = sentiment_rows(8, seed=0)
    runs = {}
    for name, batch, accum in [("big", 8, 1), ("accumulated", 4, 2)]:
        gm = lora_graph(no_dropout_dir)
        config = TrainConfig(output_dir=tmp_path / name, max_steps=1, batch_size=batch, grad_accum=accum,
                             lr=1e-2, save_every=1, progress=False)
        train(gm, rows, config=config)
        runs[name] = (trainable(gm), first_moments(tmp_path / name, 1))

    (weights, moments), (weights2, moments2) = runs["big"], runs["accumulated"]
    for a, b in zip(moments, moments2):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    for name in weights:
        torch.testing.assert_close(weights[name], weights2[name], atol=1e-6, rtol=0)


def test_soft_one_hot_labels_and_a_custom_loss_train_exactly_like_class_ids(no_dropout_dir):
    rows = sentiment_rows(32, seed=0)
    one_hot = [{"text": r["text"], "label": [float(r["label"] == 0), float(r["label"] == 1)]} for r in rows]
    config = TrainConfig(max_steps=3, batch_size=8, lr=1e-2, progress=False)
    results = []
    for data, loss_fn in [(rows, None), (one_hot, None), (rows, lambda out, batch: task_loss(out, batch, "seq-cls"))]:
        gm = lora_graph(no_dropout_dir)
        train(gm, data, config=config, loss_fn=loss_fn)
        results.append(trainable(gm))
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-7, rtol=0)


def test_outputs_checkpoints_and_metrics_log(tiny_bert_dir, tmp_path):
    gm = lora_graph(tiny_bert_dir)
    config = TrainConfig(output_dir=tmp_path, max_steps=5, batch_size=8, save_every=2, keep_checkpoints=2,
                         eval_every=2, progress=False)
    result = train(gm, sentiment_rows(64, seed=0), eval_data=sentiment_rows(16, seed=1), config=config)

    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step-00000004", "step-00000005"]
    weights = checkpoint_tensors(tmp_path / "checkpoints" / steps[-1])["model"]
    assert set(weights) == set(gm.info.trainable)
    for name in gm.info.trainable:
        torch.testing.assert_close(weights[name], gm.get_parameter(name).detach(), atol=0, rtol=0)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval"), (5, "train"), (5, "eval")]
    assert records == result.history
    assert all(0 <= r["accuracy"] <= 1 for r in records if r["split"] == "eval")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = rewrite.load(tmp_path / "model.pt2")
    inputs = fresh_inputs(vocab=30522) | {"token_type_ids": torch.zeros(3, 11, dtype=torch.long)}
    torch.testing.assert_close(reloaded.eval()(**inputs).logits, gm(**inputs).logits, atol=0, rtol=0)


def test_the_saved_adapter_reproduces_the_trained_graph_in_peft(tiny_bert_dir, tmp_path):
    from peft import PeftModel

    gm = lora_graph(tiny_bert_dir)
    train(gm, sentiment_rows(32, seed=0), config=TrainConfig(output_dir=tmp_path, max_steps=3, batch_size=8,
                                                            lr=1e-2, progress=False))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokenizer = gm.info.tokenizer
    inputs = dict(tokenizer(["a good day", "the movie was very sad indeed"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, gm(**inputs).logits, atol=1e-5, rtol=0)


@pytest.fixture
def lm_dir(tmp_path, minilm_dir):
    """A tiny LLaMA with MiniLM's tokenizer: a causal LM that reads ordinary text. Its weights are drawn
    wide (std 0.5): with the default 0.02 its frozen head cannot produce logits far enough apart to learn."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir, model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_causal_lm_loss_falls_on_repeated_text(lm_dir):
    gm = rewrite.load_pretrained(lm_dir, task="causal-lm")
    rewrite.apply(gm, "lora", rank=4, alpha=8, targets="all-linear")
    rows = [{"text": "the cat sat on the mat"}, {"text": "the dog sat on the log and slept"}] * 8
    result = train(gm, rows, eval_data=rows, config=TrainConfig(epochs=6, lr=3e-2, batch_size=4, progress=False))
    losses = [h["loss"] for h in result.history if h["split"] == "train"]
    assert result.eval["loss"] < losses[0] / 2
    assert result.eval["accuracy"] > 0.5  # next-token accuracy: repeated text is predictable


def test_cli_train_writes_graph_adapter_checkpoints_and_log(tiny_bert_dir, tmp_path):
    gm = lora_graph(tiny_bert_dir)
    rewrite.save(gm, tmp_path / "in.pt2")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(24, seed=0)))
    out = tmp_path / "out"

    result = CliRunner().invoke(cli, ["train", str(tmp_path / "in.pt2"), "--data", str(data), "--eval", str(data),
                                      "--max-steps", "3", "--batch-size", "8", "--output-dir", str(out)])

    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"model.pt2", "adapter", "checkpoints", "metrics.jsonl"}
    assert "accuracy" in result.output
    again = CliRunner().invoke(cli, ["train", str(tmp_path / "in.pt2"), "--data", str(data), "--max-steps", "3",
                                     "--output-dir", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert "resumed at step 3; trained 0 steps to step 3" in again.output  # honest: this process trained none
    assert f"resuming from step 3 (checkpoint {out / 'checkpoints' / 'step-00000003'})" in again.output


def test_errors_are_one_sentence(tiny_bert_dir, tmp_path):
    rows = sentiment_rows(8, seed=0)
    base = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls", num_labels=2)
    with pytest.raises(RewriteError, match="no trainable parameters"):
        train(base, rows, config=TrainConfig(progress=False))
    gm = lora_graph(tiny_bert_dir)
    with pytest.raises(RewriteError, match="resume needs the output directory"):
        train(gm, rows, config=TrainConfig(resume=True))
    with pytest.raises(RewriteError, match="batch_size 0 is not allowed"):
        train(gm, rows, config=TrainConfig(batch_size=0))
    with pytest.raises(RewriteError, match="task 'feature-extraction' is not supported"):
        train(gm, rows, config=TrainConfig(task="feature-extraction"))
    train(gm, rows, config=TrainConfig(output_dir=tmp_path, max_steps=1, progress=False))
    with pytest.raises(RewriteError, match="already holds a run's checkpoints; continue it with resume"):
        train(gm, rows, config=TrainConfig(output_dir=tmp_path, max_steps=1, progress=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_sentence(tiny_bert_dir):
    with pytest.raises(RewriteError, match="^device 'cuda' is not available on this machine; use cpu$"):
        train(lora_graph(tiny_bert_dir), sentiment_rows(8, seed=0), config=TrainConfig(device="cuda", progress=False))


@pytest.mark.slow
def test_compiled_training_matches_eager(no_dropout_dir):
    rows = sentiment_rows(32, seed=0)
    weights = []
    for compile_ in (False, True):
        gm = lora_graph(no_dropout_dir)
        config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, compile=compile_, eval_every=2, progress=False)
        result = train(gm, rows, eval_data=rows[:8], config=config)
        weights.append((trainable(gm), result.eval))
    (eager, eager_eval), (compiled, compiled_eval) = weights
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-6, rtol=0)
    assert compiled_eval["accuracy"] == eager_eval["accuracy"]
