"""Sharded checkpoints (`torch.distributed.checkpoint`) resume on another number of ranks: a run checkpointed by 2
FSDP ranks, resumed by one process (no process group, the flat graph) or by 4 FSDP ranks with the same global batch,
ends with the adapter of an uninterrupted run. Also: what a checkpoint holds, checkpoints written before they were
sharded, and the refusals."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from dataclasses import replace

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp
import transformers
from torch.distributed.checkpoint import FileSystemReader

import rewrite
from rewrite.adapters.peft_files import PREFIX
from rewrite.errors import RewriteError
from rewrite.training import checkpoint
from rewrite.training.train import TrainConfig

from conftest import TASK_CLASSES, tiny_config
from helpers import checkpoint_tensors, lora_graph, sentiment_rows

GLOBAL_BATCH = 8
STEPS, SAVED = 4, 2  # the checkpoint at step SAVED is resumed
CASES = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "masked-lm"}


def dropout_free_archive(directory, arch: str, minilm_dir) -> str:
    """A tiny LoRA graph (q and v) of `arch` with every dropout probability 0 and MiniLM's tokenizer, saved."""
    config = tiny_config(arch)
    config.vocab_size = 30522  # MiniLM's tokens
    for name, value in config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    TASK_CLASSES[CASES[arch]].from_config(config).save_pretrained(directory / arch)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(directory / arch)
    gm = rewrite.load_pretrained(directory / arch, task=CASES[arch])
    rewrite.apply(gm, "lora", rank=4, alpha=8, roles=["q", "v"])
    rewrite.save(gm, directory / f"{arch}.pt2")
    return str(directory / f"{arch}.pt2")


def config(output_dir, world: int, **changes) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), max_steps=STEPS, batch_size=GLOBAL_BATCH // world, lr=1e-2,
                       save_every=SAVED, keep_checkpoints=2, progress=False, fsdp=world > 1, device="cpu", **changes)


def rank_main(rank: int, world: int, port: int, archive: str, rows: list[dict], train_config: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rewrite.train(rewrite.load(archive), rows, config=train_config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on(world: int, archive: str, rows: list[dict], train_config: TrainConfig) -> None:
    """`rewrite.train` on `world` ranks (FSDP; spawned, gloo) or in this process (world 1, no process group)."""
    if world == 1:
        rewrite.train(rewrite.load(archive), rows, config=train_config)
    else:
        mp.spawn(rank_main, args=(world, free_port(), archive, rows, train_config), nprocs=world)


def adapter(output_dir) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(output_dir / "adapter" / "adapter_model.safetensors")


def resumed_from_checkpoint(source, output_dir):
    """A new output directory holding only checkpoint `SAVED` of `source` (copied)."""
    name = f"step-{SAVED:08d}"
    shutil.copytree(source / "checkpoints" / name, output_dir / "checkpoints" / name)
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("arch,worlds", [("llama", (1, 4)), ("gpt2", (1,)), ("bert", (1,))])
def test_a_run_saved_on_two_ranks_resumes_on_one_and_on_four(minilm_dir, tmp_path, caplog, arch, worlds):
    archive = dropout_free_archive(tmp_path, arch, minilm_dir)
    rows = sentiment_rows(32, seed=0)  # 4 global batches of 8
    train_on(1, archive, rows, config(tmp_path / "uninterrupted", 1))
    expected = adapter(tmp_path / "uninterrupted")
    train_on(2, archive, rows, config(tmp_path / "two", 2))

    step = tmp_path / "two" / "checkpoints" / f"step-{SAVED:08d}"
    trainable = set(rewrite.load(archive).info.trainable)
    index = FileSystemReader(step).read_metadata().state_dict_metadata
    assert {key.removeprefix("model.") for key in index if key.startswith("model.")} == trainable
    assert all(key.startswith(("model.", "optim.state.", "optim.param_groups.")) for key in index)
    assert {key.removeprefix("optim.state.").rsplit(".", 1)[0] for key in index if key.startswith("optim.state.")} == (
        trainable)
    assert {p.name for p in step.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", checkpoint.STATE_NAME,
                                                 checkpoint.INFO_NAME}
    for name, weight in expected.items():  # the 2-rank run itself, its adapter written whole by rank 0
        torch.testing.assert_close(adapter(tmp_path / "two")[name], weight, atol=1e-5, rtol=0)

    for world in worlds:
        out = resumed_from_checkpoint(tmp_path / "two", tmp_path / f"resumed-on-{world}")
        with caplog.at_level(logging.INFO, logger="rewrite"):
            train_on(world, archive, rows, config(out, world, resume=True))
        got = adapter(out)
        assert got.keys() == expected.keys()
        for name, weight in expected.items():
            torch.testing.assert_close(got[name], weight, atol=1e-5, rtol=0, msg=f"resumed on {world}: {name}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["split"] == "train"] == [3, 4]
        assert rewrite.load(out / "model.pt2").info.trainable == rewrite.load(archive).info.trainable
    assert f"resuming from step {SAVED} (checkpoint {tmp_path / 'resumed-on-1' / 'checkpoints' / step.name})" in [
        r.getMessage() for r in caplog.records]


def test_a_single_process_checkpoint_holds_the_trainable_weights_and_the_optimizer(no_dropout_dir, tmp_path):
    gm = lora_graph(no_dropout_dir)
    rewrite.train(gm, sentiment_rows(16, seed=0), config=replace(config(tmp_path, 1), max_steps=2))
    step = tmp_path / "checkpoints" / "step-00000002"
    assert {p.name for p in step.iterdir()} == {".metadata", "__0_0.distcp", checkpoint.STATE_NAME,
                                                 checkpoint.INFO_NAME}
    saved = checkpoint_tensors(step)
    assert saved["model"].keys() == set(gm.info.trainable) == saved["optim"]["state"].keys()
    for name in gm.info.trainable:
        assert torch.equal(saved["model"][name], gm.get_parameter(name).detach())
    assert set(torch.load(step / checkpoint.STATE_NAME, weights_only=True)) == {"step", "world_size", "scheduler",
                                                                                 "rng"}


def earlier_layout(step) -> None:
    """Rewrites a checkpoint in the layout written before checkpoints were sharded: the full weights under PEFT's
    names in `adapter_model.safetensors`, the full optimizer state in `trainer_state.pt`."""
    whole = checkpoint_tensors(step)
    state = torch.load(step / checkpoint.STATE_NAME, weights_only=True)
    for part in step.iterdir():
        if part.name != checkpoint.INFO_NAME:
            part.unlink()
    safetensors.torch.save_file({PREFIX + name: w for name, w in whole["model"].items()},
                                step / "adapter_model.safetensors", metadata={"format": "pt"})
    torch.save({**state, "optimizer": whole["optim"]}, step / checkpoint.STATE_NAME)


def test_a_checkpoint_written_before_sharding_still_resumes(no_dropout_dir, tmp_path):
    rows = sentiment_rows(32, seed=0)
    rewrite.train(lora_graph(no_dropout_dir), rows, config=config(tmp_path / "uninterrupted", 1))
    out = resumed_from_checkpoint(tmp_path / "uninterrupted", tmp_path / "resumed")
    earlier_layout(out / "checkpoints" / f"step-{SAVED:08d}")
    result = rewrite.train(lora_graph(no_dropout_dir), rows, config=config(out, 1, resume=True))
    assert result.resumed_from == SAVED
    expected = adapter(tmp_path / "uninterrupted")
    for name, weight in adapter(out).items():
        assert torch.equal(weight, expected[name]), name


def test_a_checkpoint_of_another_graph_is_refused(no_dropout_dir, tmp_path):
    rows = sentiment_rows(16, seed=0)
    rewrite.train(lora_graph(no_dropout_dir), rows, config=replace(config(tmp_path, 1), max_steps=2))
    step = tmp_path / "checkpoints" / "step-00000002"
    other = lora_graph(no_dropout_dir, roles=("q",))
    name = next(n for n in lora_graph(no_dropout_dir).info.trainable if n not in other.info.trainable)
    with pytest.raises(RewriteError, match=re.escape(
            f"checkpoint {str(step)!r} has a weight {name} that the graph does not train; it was written for another "
            "graph (resume the graph it was trained from, or train into a new --output-dir)")):
        rewrite.train(other, rows, config=replace(config(tmp_path, 1), max_steps=2, resume=True))
    assert step.is_dir()


def test_a_number_of_ranks_that_does_not_divide_the_global_batch_is_refused(tmp_path):
    saved = {checkpoint.GLOBAL_BATCH: 8, "lr": 0.01}
    with pytest.raises(RewriteError, match=re.escape(
            f"checkpoint {str(tmp_path)!r} was written with a global batch of 8 examples, which 3 ranks cannot share "
            "evenly; resume on a number of ranks that divides 8, with --batch-size 8 divided by it")):
        checkpoint._check_same_settings(saved, {checkpoint.GLOBAL_BATCH: 9, "lr": 0.01}, tmp_path, 3)
    with pytest.raises(RewriteError, match=re.escape(
            "(global_batch_size 8 -> 4); resume with the same ones (--batch-size 2 on 4 ranks), or train into a new "
            "--output-dir")):
        checkpoint._check_same_settings(saved, {checkpoint.GLOBAL_BATCH: 4, "lr": 0.01}, tmp_path, 4)
