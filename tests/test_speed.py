"""Training-speed passes: every one gives the unoptimized graph's loss and LoRA gradients (1e-5), in
train and eval mode, on several architectures; `rewrite.training.train` with them trains the same weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rewrite
from rewrite.training import head_loss, speed
from rewrite.training.batches import eval_mode
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.training.head_loss import head_loss_sum, head_of
from rewrite.training.losses import loss_sum
from rewrite.graph.pipeline import pass_class
from rewrite.training.train import TrainConfig, train

from conftest import TASK_CLASSES, tiny_config, tiny_model
from helpers import capture_tiny, fresh_inputs, lora_graph, randomize_lora, sentiment_rows

MODELS = [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "masked-lm"), ("bert", "seq-cls")]
PASSES = ["chunked_loss", "fused_lora", "dense_attention", "grouped_attention", "rows", "fast_dropout",
          "gated_activation", "recompute_input", "checkpoint"]
ROLES = ["q", "k", "v", "o", "mlp"]


def _labels(inputs, task: str) -> torch.Tensor:
    if task == "seq-cls":
        return torch.arange(inputs["input_ids"].shape[0]) % 2
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    if task == "masked-lm":
        labels[:, ::2] = -100
    return labels


def _adapted(arch: str, task: str, dropout: float | None = None, lora_dropout: float = 0.0):
    """The tiny model with LoRA on `ROLES`; `dropout` replaces every dropout probability of its config."""
    model = tiny_model(arch, task)
    if dropout is not None:
        config = tiny_config(arch)
        for name, value in vars(config).items():
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(config, name, dropout)
        torch.manual_seed(0)
        model = TASK_CLASSES[task].from_config(config).eval()
    gm = capture_tiny(model)
    gm.info.task = task
    rewrite.apply(gm, "lora", rank=4, roles=ROLES, dropout=lora_dropout)
    randomize_lora(gm)
    return gm


def _loss_and_grads(graph, lora, inputs, labels, task):
    torch.manual_seed(0)
    outputs = graph(**inputs)
    loss = loss_sum(outputs, labels, task, head=head_of(graph))
    return loss.detach(), torch.autograd.grad(loss, lora)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("arch,task", MODELS)
def test_pass_keeps_loss_and_lora_gradients(arch, task, name, training):
    # a pass that changes train-mode dropout draws is compared without dropout
    gm = _adapted(arch, task, dropout=0.0 if training and speed.speed_of(pass_class(name)).changes_dropout else None)
    names = speed.resolve([name], dropout_parity=False, custom_loss=False)  # with what it needs
    fast = speed.twin(gm, names)
    fast.train(training)
    gm.train(training)
    padded = not any(speed.speed_of(pass_class(n)).unpadded_only for n in names)
    inputs = fresh_inputs() if padded else example_inputs(["input_ids", "attention_mask"], 128, batch=3, seq=11)
    labels = _labels(inputs, task)
    lora = [p for n, p in gm.named_parameters() if ".lora_" in n]
    loss, grads = _loss_and_grads(gm, lora, inputs, labels, task)
    fast_loss, fast_grads = _loss_and_grads(fast, lora, inputs, labels, task)
    torch.testing.assert_close(fast_loss, loss, atol=1e-5, rtol=1e-6)
    for ours, theirs in zip(fast_grads, grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_each_pass_changes_what_it_should():
    reports = {}
    for arch, task in MODELS:
        fast = speed.twin(_adapted(arch, task), PASSES)
        reports[arch, task] = {h["pass"]: h["report"] for h in fast.info.history[-len(PASSES):]}
    assert reports["llama", "causal-lm"]["chunked_loss"]["head"] == "lm_head"
    assert reports["bert", "masked-lm"]["chunked_loss"]["head"] == "cls.predictions.decoder"
    assert reports["bert", "seq-cls"]["chunked_loss"]["head"] is None
    assert reports["llama", "causal-lm"]["fused_lora"] == {"fused": 10, "matmuls": 4, **{
        "summary": "10 LoRA A projections now run as 4 matmuls"}}  # q,k,v and gate,up per layer
    assert reports["gpt2", "causal-lm"]["fused_lora"]["fused"] == 0  # c_attn is one fused projection already
    assert reports["llama", "causal-lm"]["dense_attention"]["kinds"] == ["causal"]
    assert reports["gpt2", "causal-lm"]["dense_attention"]["kinds"] == ["causal"]
    assert reports["bert", "seq-cls"]["dense_attention"]["kinds"] == ["full"]
    assert reports["bert", "seq-cls"]["rows"]["moved"] > 10
    assert reports["llama", "causal-lm"]["grouped_attention"]["grouped"] == 2  # 2 key/value heads for 4 query heads
    assert reports["gpt2", "causal-lm"]["grouped_attention"]["grouped"] == 0
    assert reports["llama", "causal-lm"]["fast_dropout"]["summary"] == "no dropout"  # LLaMA trains without
    assert (reports["gpt2", "causal-lm"]["fast_dropout"]["dropout"], reports["gpt2", "causal-lm"]["fast_dropout"]
            ["attention"]) == (5, 2)  # the embeddings', and per layer the attention output's and the MLP's
    assert (reports["bert", "seq-cls"]["fast_dropout"]["dropout"], reports["bert", "seq-cls"]["fast_dropout"]
            ["attention"]) == (6, 2)  # the same, and the classifier's
    assert reports["llama", "causal-lm"]["gated_activation"]["gated"] == 2  # SwiGLU; GELU MLPs are not gated
    assert reports["bert", "masked-lm"]["gated_activation"]["gated"] == 0
    # per layer: q/k/v and gate/up read a norm; GPT-2's c_attn its ln_1, c_fc its ln_2, c_proj a GELU;
    # BERT's intermediate and output.dense a norm and a GELU, its next layer's q/k/v a norm
    assert reports["llama", "causal-lm"]["recompute_input"]["recomputed"] == 4
    assert reports["gpt2", "causal-lm"]["recompute_input"]["recomputed"] == 6
    assert reports["bert", "seq-cls"]["recompute_input"]["recomputed"] == 5
    assert all(reports[model]["checkpoint"]["blocks"] == [0, 1] for model in MODELS)


def test_graphs_send_padded_batches_to_the_general_graph():
    gm = _adapted("llama", "causal-lm")
    gm.eval()
    graphs = speed.graphs(gm, ["dense_attention"])
    assert graphs.unpadded is not None
    graphs.eval()
    for inputs in (fresh_inputs(), example_inputs(["input_ids", "attention_mask"], 128, batch=3, seq=11)):
        with torch.no_grad():
            torch.testing.assert_close(graphs(**inputs).logits, gm(**inputs).logits, atol=1e-6, rtol=0)


def test_head_loss_equals_the_plain_loss_with_gradients_of_weight_and_bias(monkeypatch):
    monkeypatch.setattr("rewrite.training.head_loss.CHUNK_ELEMENTS", 7 * 50)  # several chunks, the last one short
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=generator)
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    ours = head_loss_sum(hidden, targets, weight, bias)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(2 * ours, [hidden, weight, bias]),
                    torch.autograd.grad(2 * plain, [hidden, weight, bias])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_head_loss_under_bf16_autocast_matches_the_autocast_head():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (9,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        ours = head_loss_sum(hidden, targets, weight)
    torch.testing.assert_close(ours, plain, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(torch.autograd.grad(ours, hidden)[0], torch.autograd.grad(plain, hidden)[0],
                               atol=2e-2, rtol=2e-2)


def test_bf16_training_runs_the_cut_head_in_bf16(prompt_lm_dir, monkeypatch):
    """Under `--bf16` the head `chunked_loss` cut from the graph runs in bf16, as the graph's would (in
    fp32 it costs 2.4x the time on an AMX CPU and gives other numbers)."""
    dtypes = []
    compute_dtype = head_loss._compute_dtype
    monkeypatch.setattr(head_loss, "_compute_dtype", lambda hidden: dtypes.append(compute_dtype(hidden)) or dtypes[-1])
    texts = [{"text": row["text"]} for row in sentiment_rows(8, seed=0)]
    _train_weights(_lm_graph(prompt_lm_dir), texts, bf16=True, speed_passes=["chunked_loss"])
    assert dtypes and set(dtypes) == {torch.bfloat16}


def _train_weights(gm, rows, **options):
    train(gm, rows, config=TrainConfig(max_steps=3, batch_size=4, lr=1e-2, progress=False, **options))
    return {n: p.detach().clone() for n, p in gm.named_parameters() if ".lora_" in n}


def test_training_with_speed_passes_trains_the_same_weights_and_leaves_the_graph(prompt_lm_dir, no_dropout_dir):
    """The causal LM (chunked loss, fused LoRA, unpadded attention) and the classifier (rows, fused LoRA):
    the same weights as without the passes, and the user's graph is the one it was, so fold and
    export see the same model."""
    texts = [{"text": row["text"]} for row in sentiment_rows(12, seed=0)]
    for make, rows in ((lambda: _lm_graph(prompt_lm_dir), texts),
                       (lambda: lora_graph(no_dropout_dir, roles=ROLES), sentiment_rows(12, seed=0))):
        plain_gm, fast_gm = make(), make()
        code = fast_gm.code
        plain = _train_weights(plain_gm, rows, speed_passes=[])
        fast = _train_weights(fast_gm, rows)
        assert fast_gm.code == code and len(fast_gm.info.history) == 1
        for name in plain:
            torch.testing.assert_close(fast[name], plain[name], atol=1e-5, rtol=0)


def _lm_graph(directory):
    gm = rewrite.load_pretrained(directory)
    torch.manual_seed(0)
    rewrite.apply(gm, "lora", rank=4, alpha=8, roles=ROLES)
    return gm


def test_a_custom_loss_gets_logits_and_dropout_parity_drops_rows():
    assert speed.resolve(None, dropout_parity=False, custom_loss=True) == [
        "dense_attention", "grouped_attention", "rows", "fast_dropout", "gated_activation", "fused_lora",
        "recompute_input"]
    assert speed.resolve(None, dropout_parity=True, custom_loss=False, checkpoint=True) == [
        "chunked_loss", "dense_attention", "gated_activation", "fused_lora", "grouped_attention", "recompute_input",
        "checkpoint"]  # without rows, the MLP and LoRA passes do not wait for the attention ones: by name
    with pytest.raises(rewrite.RewriteError, match="not a training-speed pass"):
        speed.resolve(["lora"], dropout_parity=False, custom_loss=False)


def test_a_sharded_run_takes_the_passes_that_rewrite_one_graph_within_its_blocks():
    """FSDP shards the graph the passes rewrote, and evaluates it too: no second graph for unpadded batches, no loss
    instead of logits, no sub-graphs outlined across blocks; named, those are refused in one sentence."""
    assert speed.resolve(None, dropout_parity=False, custom_loss=False, checkpoint=True, sharded=True) == [
        "rows", "fast_dropout", "gated_activation", "fused_lora"]
    assert speed.resolve(None, dropout_parity=True, custom_loss=False, sharded=True) == [
        "gated_activation", "fused_lora"]
    with pytest.raises(rewrite.RewriteError, match=r"^training-speed passes chunked_loss, recompute_input cannot run "
                                                   r"on a graph FSDP shards \(--fsdp\); use some of rows, fast_dropout, "
                                                   r"gated_activation, fused_lora, or drop --fsdp$"):
        speed.resolve(["fused_lora", "chunked_loss", "recompute_input"], dropout_parity=False, custom_loss=False,
                      sharded=True)


def test_the_speed_pipeline_is_the_passes_declarations():
    """A chosen pass brings what it needs, and every declared order holds, whatever order the run names them in."""
    assert speed.resolve(["grouped_attention"], dropout_parity=False, custom_loss=False) == [
        "dense_attention", "grouped_attention"]
    assert speed.resolve(["checkpoint", "recompute_input", "fused_lora", "rows"], dropout_parity=False,
                         custom_loss=False) == ["rows", "fused_lora", "recompute_input", "checkpoint"]


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_minilm_passes_keep_loss_and_gradients(minilm_dir, training):
    gm = rewrite.load_pretrained(minilm_dir, task="seq-cls", num_labels=2)
    rewrite.apply(gm, "lora", rank=8, alpha=16, roles=ROLES)
    randomize_lora(gm)
    names = [n for n in PASSES if not (training and speed.speed_of(pass_class(n)).changes_dropout)]
    fast = speed.twin(gm, names)
    gm.train(training)
    fast.train(training)
    inputs = example_inputs(["input_ids", "attention_mask"], 30522, batch=4, seq=32)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    labels = _labels(inputs, "seq-cls")
    lora = [p for n, p in gm.named_parameters() if ".lora_" in n]
    loss, grads = _loss_and_grads(gm, lora, inputs, labels, "seq-cls")
    fast_loss, fast_grads = _loss_and_grads(fast, lora, inputs, labels, "seq-cls")
    torch.testing.assert_close(fast_loss, loss, atol=1e-5, rtol=1e-6)
    for ours, theirs in zip(fast_grads, grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,task", [("llama", "causal-lm"), ("bert", "seq-cls")])
def test_training_graphs_compile_whole(arch, task):
    """No graph breaks: dynamo captures each training graph, passes and all, as one graph."""
    names = speed.resolve(None, dropout_parity=False, custom_loss=False, checkpoint=True)
    fast = speed.twin(_adapted(arch, task), names)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fast)(**fresh_inputs())
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.slow  # about a minute: aot_eager traces forward and backward of both graphs
def test_compiled_training_graphs_do_not_break_or_recompile(monkeypatch):
    """`--compile`: each training graph compiles once, whole, and serves every later step, whatever the
    sequence length (dynamic shapes from the first compile), padded batches by the general graph."""
    monkeypatch.setattr(speed, "_COMPILE_BACKEND", "aot_eager")  # dynamo and autograd capture; no codegen
    gm = _adapted("llama", "causal-lm")
    graphs = speed.graphs(gm, speed.resolve(None, dropout_parity=False, custom_loss=False), compile=True)
    graphs.train()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for step, seq in enumerate([9, 11, 13, 9, 11, 13]):
        inputs = example_inputs(["input_ids", "attention_mask"], 128, batch=3, seq=seq, seed=step, pad=step % 2 == 1)
        outputs = graphs(**inputs)
        loss_sum(outputs, _labels(inputs, "causal-lm"), "causal-lm", head=head_of(graphs.general)).backward()
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2  # the unpadded and the general graph, once each


def test_evaluating_a_compiled_graph_in_place_compiles_nothing_again():
    """An evaluation switches the graph to eval mode and back (`eval_mode`, as training's evaluation does, sharded
    or not): the graph then runs the very code it ran, so dynamo's compiled code still serves it."""
    gm = _adapted("bert", "seq-cls", dropout=0.1).train()
    compiled = torch.compile(gm, backend="eager", dynamic=False)
    inputs = example_inputs(["input_ids", "attention_mask"], 128, batch=2, seq=9, seed=0)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled(**inputs)
    forward = type(gm).forward
    with eval_mode(gm):
        assert type(gm).forward is not forward  # eval mode's own code: no dropout
        torch.testing.assert_close(gm(**inputs).logits, gm(**inputs).logits, atol=0, rtol=0)
    assert type(gm).forward is forward and gm.training
    compiled(**inputs)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("kind,approximate", [("silu", "none"), ("gelu", "none"), ("gelu", "tanh"), ("relu", "none")])
def test_gated_activation_equals_the_plain_product(kind, approximate):
    from rewrite.passes.gated_activation import gated

    generator = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(5, 7, generator=generator, requires_grad=True) for _ in range(2))
    act = {"silu": F.silu, "relu": F.relu, "gelu": lambda x: F.gelu(x, approximate=approximate)}[kind]
    grad = torch.randn(5, 7, generator=generator)
    ours, plain = gated(gate, up, kind, approximate), act(gate) * up
    torch.testing.assert_close(ours, plain, atol=0, rtol=0)
    for a, b in zip(torch.autograd.grad(ours, [gate, up], grad), torch.autograd.grad(plain, [gate, up], grad)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["grouped_attention", "gated_activation", "recompute_input"])
def test_lean_passes_keep_less_for_the_backward(name):
    gm = _adapted("llama", "causal-lm")
    for param_name, param in gm.named_parameters():
        param.requires_grad_(".lora_" in param_name)
    inputs = example_inputs(["input_ids", "attention_mask"], 128, batch=3, seq=11)
    before = ["dense_attention", "fused_lora"]
    plain, lean = (speed.twin(gm, names).train() for names in (before, [*before, name]))
    assert speed.saved_bytes(lambda: lean(**inputs), gm) < speed.saved_bytes(lambda: plain(**inputs), gm)
