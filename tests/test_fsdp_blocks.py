"""FSDP per transformer block (`rewrite.training.distributed.shard`), 2 processes on CPU with gloo (4 for the
vocabulary-parallel cases): the losses and LoRA gradients of 20 steps equal one process training the flat graph on the
whole batch; each block is an FSDP unit whose parameters are the only ones gathered while it runs; a frozen untied
word embedding and LM head keep only their rows on each rank, never gathered; a quantized base's packed weights (NF4,
int4) are sharded with their block; a graph that cannot be outlined is one unit; the model gathered on rank 0 after
training holds the base weights unchanged."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import rewrite
from rewrite.graph.params import apply_trainable
from rewrite.graph.query import block_of
from rewrite.training.batches import eval_mode
from rewrite.training import distributed, speed
from rewrite.training.train import TrainConfig

from conftest import TASK_CLASSES, TINY_VOCAB, tiny_config
from helpers import capture_tiny, mapped_ranges, randomize_lora

WORLD = 2
STEPS = 20
BATCH, SEQ = 4, 12  # global; each rank takes BATCH // WORLD rows
CASES = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "masked-lm", "llama-tied": "causal-lm",
         "llama-checkpoint": "causal-lm", "llama-bf16": "causal-lm", "qwen2": "causal-lm",
         "qwen2-uneven": "causal-lm", "llama-nf4": "causal-lm", "gpt2-int4": "causal-lm", "llama-speed": "causal-lm",
         "bert-speed": "masked-lm"}
SHARDING = {"llama-checkpoint": {"checkpoint": True}, "llama-bf16": {"bf16": True}}  # distributed.shard's options
SPEED = speed.resolve(None, dropout_parity=False, custom_loss=False, sharded=True)  # what `-speed` cases run
BLOCKS = 2
UNEVEN_VOCAB = 129  # 65 + 64 rows on 2 ranks, 33 + 33 + 33 + 30 on 4
VOCABULARY = {"llama": ["model.embed_tokens", "lm_head"], "qwen2": ["model.embed_tokens", "lm_head"],
              "gpt2": [], "bert": []}  # GPT-2's and BERT's word embeddings are tied to their heads: FSDP gathers them
FOUR = ["llama", "qwen2-uneven"]  # also trained on 4 ranks
PARTS = {"llama": 7, "qwen2": 7, "gpt2": 4, "bert": 6}  # the projections of a block, each a unit of its own


def dropout_free_graph(case: str):
    """A tiny LoRA graph (q and v, random A and B) with every dropout probability 0, in train mode; `-tied` ties an
    MLP weight of block 1 to block 0's, which per-block sharding refuses; `-uneven` has a vocabulary the ranks do
    not divide; `-nf4` and `-int4` train over a quantized base (QLoRA)."""
    arch = case.split("-")[0]
    config = tiny_config(arch)
    if case.endswith("-uneven"):
        config.vocab_size = UNEVEN_VOCAB
    for name, value in config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    gm = capture_tiny(TASK_CLASSES[CASES[case]].from_config(config).eval())
    if case.endswith("-tied"):
        gm.get_submodule("model.layers.1.mlp.up_proj").weight = gm.get_parameter("model.layers.0.mlp.up_proj.weight")
    if case.endswith(("-nf4", "-int4")):
        rewrite.apply(gm, "quantize", dtype=case.rpartition("-")[2])
    rewrite.apply(gm, "lora", rank=4, alpha=8, roles=["q", "v"])
    randomize_lora(gm)
    apply_trainable(gm)
    return gm.train()


def batch(step: int, task: str, rows: slice) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, 128, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, 128, (BATCH, SEQ), generator=generator) if task == "masked-lm" else ids
    return {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows]), "labels": labels[rows]}


def mean_loss(gm, inputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    logits = gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    labels = inputs["labels"]
    if task == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def train(gm, task: str, rows: slice, world: int, bf16: bool = False) -> dict:
    """STEPS AdamW steps on `rows` of each global batch: the global mean loss and the full LoRA gradients per step,
    and the trained LoRA weights. Equal shares, so FSDP's gradient average over ranks is the global mean's. `bf16`:
    under autocast, as `rewrite.train` runs bf16."""
    named = [(name, gm.get_parameter(name)) for name in gm.info.trainable]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    losses, grads = [], []
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = mean_loss(gm, batch(step, task, rows), task)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        grads.append({name: full(p.grad) for name, p in named})
        total = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "grads": grads, "weights": {name: full(p) for name, p in named}}


def evaluated(gm, task: str, rows: slice, bf16: bool = False) -> torch.Tensor:
    """The logits of `rows` of the first batch in eval mode (the graph switched in place, sharded or not)."""
    inputs = batch(0, task, rows)
    with eval_mode(gm), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def own_parameters(gm, paths: list[str]) -> dict[str, list[str]]:
    """Each unit's parameter names, those of the units nested in it (a block's projections) aside."""
    owned = {path: [] for path in paths}
    for name, _ in gm.named_parameters():
        owner = max((path for path in paths if name.startswith(path + ".")), key=len, default=None)
        if owner is not None:
            owned[owner].append(name)
    return owned


def watch_gathering(gm, paths: list[str]) -> list[tuple[str, bool, list[str]]]:
    """Per unit call: the unit, whether its parameters were gathered, and the other units gathered then, but those it
    lies in (a block's norms while one of its projections runs)."""
    seen = []
    owned = own_parameters(gm, paths)

    def check(path):
        def hook(module, args):
            gathered = {other for other in paths if not any(isinstance(gm.get_parameter(name), DTensor)
                                                             for name in owned[other])}
            around = {other for other in paths if path.startswith(other + ".")}
            seen.append((path, path in gathered, sorted(gathered - around - {path})))
        return hook

    for path in paths:
        gm.get_submodule(path).register_forward_pre_hook(check(path))
    return seen


def gathered_alone(seen: list[tuple[str, bool, list[str]]], checkpointed: bool = False) -> bool:
    """Whether each unit call ran gathered with every other unit sharded. FSDP does not reshard a unit after a
    forward recomputed in the backward (it does after the unit's backward), so a checkpointed block's projections
    stay gathered together while it recomputes: there, other units of the same block may be gathered."""
    return all(gathered and (not others or checkpointed and all(block_of(other) == block_of(path) for other in others))
               for path, gathered, others in seen)


def watch_dtypes(gm, paths: list[str]) -> set[torch.dtype]:
    """The dtypes of the parameters the units run with."""
    dtypes = set()
    for path, names in own_parameters(gm, paths).items():
        gm.get_submodule(path).register_forward_pre_hook(
            lambda module, args, names=names: dtypes.update(gm.get_parameter(name).dtype for name in names))
    return dtypes


def watch_rows(gm, paths: list[str]) -> list[list[tuple[int, ...]]]:
    """Per vocabulary-parallel unit call: the local shapes of its parameters, each a row shard (never gathered)."""
    seen = []
    for path in paths:
        gm.get_submodule(path).register_forward_pre_hook(lambda module, args: seen.append(
            [tuple(p.to_local().shape) if isinstance(p, DTensor) else None for p in module.parameters()]))
    return seen


def unchanged_base(gm, layout, case: str) -> bool:
    """Whether every frozen tensor of `gm`, gathered whole on rank 0 (`full_state`, what is written after training),
    equals the untrained graph's, and the graph written from them holds the packed weights FSDP sharded as
    parameters as buffers again (a collective; True on the other ranks)."""
    full = distributed.full_state(gm)
    if not torch.distributed.get_rank() == 0:
        return True
    untrained = dropout_free_graph(case)
    reference = untrained.state_dict(keep_vars=True)
    frozen = [name for name, tensor in reference.items() if not tensor.requires_grad]
    buffers = {name for name, _ in layout.gathered_twin(gm, full).named_buffers()}
    return (full.keys() == reference.keys() and all(torch.equal(full[name], reference[name]) for name in frozen)
            and set(layout.packed) <= buffers)


def rank_main(rank: int, port: int, out: str, world: int, cases: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger(distributed.__name__).addHandler(handler)
    ctx = distributed.setup("cpu")
    results = {}
    for case in cases:
        warnings.clear()
        task = CASES[case]
        gm = dropout_free_graph(case)
        before = gm.code
        flat = speed.rewrite_in_place(gm, SPEED if case.endswith("-speed") else [])
        rewritten = gm.code != before
        layout = distributed.shard(gm, ctx, **SHARDING.get(case, {}), flat=flat)
        seen, dtypes = watch_gathering(gm, layout.units), watch_dtypes(gm, layout.units)
        rows = watch_rows(gm, layout.vocabulary)
        share = BATCH // world
        bf16 = SHARDING.get(case, {}).get("bf16", False)
        results[case] = {**train(gm, task, slice(rank * share, (rank + 1) * share), world, bf16), "paths": layout.paths,
                         "parts": layout.parts, "edges": layout.edges, "vocabulary": layout.vocabulary,
                         "rows": ctx.gather(rows),
                         "units": len(distributed.units(gm)), "seen": list(seen), "dtypes": dtypes,
                         "packed": ctx.gather({name: (tuple(gm.get_parameter(name).to_local().shape),
                                                      tuple(gm.get_parameter(name).shape)) for name in layout.packed}),
                         "warnings": list(warnings), "unchanged": unchanged_base(gm, layout, case),
                         "rewritten": rewritten}
        results[case]["eval_logits"] = evaluated(gm, task, slice(rank * share, (rank + 1) * share), bf16)
        results[case]["eval_seen"] = seen[len(results[case]["seen"]):]
    if ctx.main:
        torch.save(results, out)
    ctx.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tmp_path_factory, world: int, cases: list[str]) -> dict:
    out = tmp_path_factory.mktemp("fsdp") / "results.pt"
    mp.spawn(rank_main, args=(free_port(), str(out), world, cases), nprocs=world)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    return spawn(tmp_path_factory, WORLD, list(CASES))


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory):
    return spawn(tmp_path_factory, 4, FOUR)


def row_shards(case: str, world: int) -> list[tuple[int, int]]:
    """Each rank's (rows, hidden) of a vocabulary table: `torch.chunk`'s split."""
    vocab = UNEVEN_VOCAB if case.endswith("-uneven") else TINY_VOCAB
    share = -(-vocab // world)
    return [(min(share, max(vocab - rank * share, 0)), tiny_config(case.split("-")[0]).hidden_size)
            for rank in range(world)]


def assert_trains_like_one_process(got: dict, case: str, world: int) -> None:
    vocabulary = VOCABULARY[case.split("-")[0]]
    assert got["vocabulary"] == vocabulary
    units = BLOCKS + len(got["parts"]) + len(got["edges"]) - len(vocabulary)
    assert got["units"] == units + 1 and len(got["paths"]) == BLOCKS and got["edges"] and not got["warnings"]
    # each projection a unit inside its block's; with the speed passes, fused_lora computes q's and v's LoRA A in one
    # product, read in q's part: v stays in its block
    fused = 1 if case.endswith("-speed") else 0
    assert len(got["parts"]) == BLOCKS * (PARTS[case.split("-")[0]] - fused)
    assert got["rewritten"] == case.endswith("-speed")
    checkpointed = SHARDING.get(case, {}).get("checkpoint", False)
    recomputed = BLOCKS + len(got["parts"]) if checkpointed else 0
    assert len(got["seen"]) == STEPS * (units + recomputed) and gathered_alone(got["seen"], checkpointed)
    assert got["rows"] == [[[shape]] * STEPS * len(vocabulary) for shape in row_shards(case, world)]  # never gathered
    quantized = case.endswith(("-nf4", "-int4"))
    assert got["dtypes"] == ({torch.float32, torch.uint8} if quantized else {torch.float32}) and got["unchanged"]
    assert bool(got["packed"][0]) == quantized  # a quantized base's packed weights: each rank holds its rows
    for shards in zip(*(ranks.values() for ranks in got["packed"])):
        rows, share = shards[0][1][0], -(-shards[0][1][0] // world)
        assert [local[0] for local, _ in shards] == [min(share, max(rows - r * share, 0)) for r in range(world)]
    expected = train(dropout_free_graph(case), CASES[case], slice(0, BATCH), 1)
    torch.testing.assert_close(got["losses"], expected["losses"], atol=1e-5, rtol=0)
    for step, (grads, reference) in enumerate(zip(got["grads"], expected["grads"])):
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], atol=1e-5, rtol=0, msg=f"step {step} {name}")
    for name, weight in expected["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, atol=1e-5, rtol=0)
    assert len(got["eval_seen"]) == units and gathered_alone(got["eval_seen"])  # one unit at a time in eval too
    trained = dropout_free_graph(case)
    with torch.no_grad():
        for name, weight in got["weights"].items():
            trained.get_parameter(name).copy_(weight)
    torch.testing.assert_close(got["eval_logits"], evaluated(trained, CASES[case], slice(0, BATCH // world)),
                               atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama", "gpt2", "bert", "llama-checkpoint", "qwen2", "qwen2-uneven", "llama-nf4",
                                  "gpt2-int4", "llama-speed", "bert-speed"])
def test_fsdp_per_block_trains_like_one_process(sharded_runs, case):
    """Also with activation checkpointing per block: each block runs again in the backward, gathered again. LLaMA's
    and Qwen2's word embedding and head are vocabulary-parallel, also over a vocabulary 2 ranks do not divide. Over
    a quantized base (NF4, int4), each rank holds its rows of the packed weights, gathered with their block. With the
    training-speed passes a sharded run takes, rewriting the graph before it is sharded, against one process
    without them."""
    assert_trains_like_one_process(sharded_runs[case], case, WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("case", FOUR)
def test_fsdp_on_four_ranks_trains_like_one_process(four_rank_runs, case):
    assert_trains_like_one_process(four_rank_runs[case], case, 4)


@pytest.mark.slow
def test_a_graph_that_cannot_be_outlined_is_one_unit_and_says_why(sharded_runs):
    got = sharded_runs["llama-tied"]
    assert got["units"] == 1 and got["paths"] == [] and got["seen"] == []
    assert got["warnings"] == ["FSDP shards the graph as one unit, gathered whole for every step: tensors "
                               "model.layers.0.mlp.up_proj.weight, model.layers.1.mlp.up_proj.weight are one tensor "
                               "tied across a block boundary"]
    expected = train(dropout_free_graph("llama-tied"), "causal-lm", slice(0, BATCH), 1)
    torch.testing.assert_close(got["losses"], expected["losses"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_bf16_fsdp_gathers_and_computes_in_bf16_and_keeps_fp32_shards(sharded_runs):
    got = sharded_runs["llama-bf16"]
    assert got["dtypes"] == {torch.bfloat16} and gathered_alone(got["seen"])
    assert got["vocabulary"] == VOCABULARY["llama"]
    expected = train(dropout_free_graph("llama-bf16"), "causal-lm", slice(0, BATCH), 1)  # fp32
    assert all(weight.dtype == torch.float32 for weight in got["weights"].values())
    torch.testing.assert_close(got["losses"], expected["losses"], atol=2e-2, rtol=0)
    for name, weight in expected["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, atol=2e-2, rtol=0)


def test_offloading_shards_is_refused_off_fsdp_and_off_gpus(tmp_path):
    gm = dropout_free_graph("llama")
    rows = [{"text": "a b c"}] * 4
    for fsdp, where in ((False, "does not use --fsdp"), (True, "is on the CPU")):
        config = TrainConfig(fsdp=fsdp, fsdp_offload=True, device="cpu", output_dir=tmp_path / str(fsdp))
        with pytest.raises(rewrite.RewriteError, match=f"keeps FSDP's shards in CPU memory .* but this run {where}"):
            rewrite.train(gm, rows, config=config)


def directory_rank_main(rank: int, port: int, directory: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    weights = Path(directory) / "model.safetensors"
    gm = rewrite.load_pretrained(directory)
    rewrite.apply(gm, "lora", rank=4, alpha=8, roles=["q", "v"])
    apply_trainable(gm)
    mapped = bool(mapped_ranges(weights))
    layout = distributed.shard(gm.train(), ctx)
    shapes = {name: tuple(gm.get_parameter(name).to_local().shape) for name in ("model.embed_tokens.weight",
                                                                            "model.layers.0.mlp.up_proj.weight")}
    results = ctx.gather({"mapped before": mapped, "mapped after": bool(mapped_ranges(weights)), "shapes": shapes,
                          "vocabulary": layout.vocabulary})
    if ctx.main:
        torch.save(results, out)
    ctx.close()


@pytest.mark.slow
def test_a_model_directory_sharded_keeps_only_each_ranks_rows(tmp_path):
    """Trained from a Hugging Face directory, each rank maps the weights file until FSDP replaces each weight by its
    rows: then nothing of the file stays mapped, so no rank keeps pages of the rows it does not hold."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.update(dict(vocab_size=8192, intermediate_size=4096))  # 2 MiB tables, 1 MiB MLP weights: mapped, not read
    TASK_CLASSES["causal-lm"].from_config(config).save_pretrained(tmp_path / "model")
    out = tmp_path / "results.pt"
    mp.spawn(directory_rank_main, args=(free_port(), str(tmp_path / "model"), str(out)), nprocs=WORLD)
    ranks = torch.load(out, weights_only=False)
    assert [r["mapped before"] for r in ranks] == [True, True] and [r["mapped after"] for r in ranks] == [False, False]
    hidden = config.hidden_size
    assert all(r["shapes"] == {"model.embed_tokens.weight": (4096, hidden), "model.layers.0.mlp.up_proj.weight":
                               (2048, hidden)} for r in ranks)
    assert ranks[0]["vocabulary"] == VOCABULARY["llama"]
