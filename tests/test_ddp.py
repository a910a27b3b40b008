"""DDP and FSDP: `torchrun --nproc_per_node 2` (gloo, CPU) with batch b per rank updates like one process with batch 2b,
and a run checkpointed on 2 ranks resumes on 1 with the same global batch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import rewrite
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.training.batches import input_names

from helpers import first_moments, lora_graph, sentiment_rows

CLI = [sys.executable, "-c", "from rewrite.cli.main import main; main()"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]


def train_args(graph, data, output_dir, batch_size: int) -> list[str]:
    return ["train", str(graph), "--data", str(data), "--output-dir", str(output_dir), "--max-steps", "2",
            "--batch-size", str(batch_size), "--lr", "1e-2", "--save-every", "1", "--keep-checkpoints", "2"]


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b(no_dropout_dir, tmp_path, wrapper):  # noqa: F811
    rewrite.save(lora_graph(no_dropout_dir), tmp_path / "in.pt2")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(16, seed=0)))
    sharding = ["--fsdp"] if wrapper == "fsdp" else []

    run([*CLI, *train_args(tmp_path / "in.pt2", data, tmp_path / "one", batch_size=8)])
    run([*TORCHRUN, *CLI, *train_args(tmp_path / "in.pt2", data, tmp_path / "two", batch_size=4), *sharding,
         "--eval", str(data), "--eval-every", "1"])  # gathered for evaluation after step 1, sharded again for step 2

    for single, ranks in zip(first_moments(tmp_path / "one", 1), first_moments(tmp_path / "two", 1)):
        torch.testing.assert_close(ranks, single, atol=1e-8, rtol=1e-5)
    weights = [safetensors.torch.load_file(tmp_path / run_dir / "adapter" / "adapter_model.safetensors")
               for run_dir in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-6, rtol=0)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000002" / "checkpoint.json").read_text())
    assert state["world_size"] == 2
    graphs = [rewrite.load(tmp_path / run_dir / "model.pt2") for run_dir in ("one", "two")]  # flat, sharded or not
    inputs = example_inputs(input_names(graphs[0]), graphs[0].info.config.vocab_size, batch=3, seq=11, pad=True)
    torch.testing.assert_close(graphs[1](**inputs).logits, graphs[0](**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_run_checkpointed_on_two_ranks_resumes_on_one_with_the_same_global_batch(no_dropout_dir, tmp_path):
    rewrite.save(lora_graph(no_dropout_dir), tmp_path / "in.pt2")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(16, seed=0)))
    two, resumed = tmp_path / "two", tmp_path / "resumed"
    run([*TORCHRUN, *CLI, *train_args(tmp_path / "in.pt2", data, two, batch_size=4), "--fsdp"])
    shutil.copytree(two / "checkpoints" / "step-00000001", resumed / "checkpoints" / "step-00000001")

    refused = subprocess.run([*CLI, *train_args(tmp_path / "in.pt2", data, resumed, batch_size=4), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "(global_batch_size 8 -> 4)" in refused.stderr, refused.stderr
    run([*CLI, *train_args(tmp_path / "in.pt2", data, resumed, batch_size=8), "--resume"])

    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2]  # step 1 came from the checkpoint
    weights = [safetensors.torch.load_file(run_dir / "adapter" / "adapter_model.safetensors")
               for run_dir in (two, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_fsdp_evaluates_in_eval_mode_one_unit_at_a_time_as_one_process_does(tiny_bert_dir, tmp_path):
    """With dropout on, 5 evaluation examples at batch 2 per rank (3 and 2: 2 batches on rank 0, 1 on rank 1, which
    runs one more the metrics do not count, so both gather each unit together): the metrics of one process at
    batch 4. The learning rate is too small to move the weights, so both evaluate the same model."""
    rewrite.save(lora_graph(tiny_bert_dir), tmp_path / "in.pt2")
    data, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(8, seed=0)))
    dev.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(5, seed=1)))

    def evaluated(command: list[str], out, batch_size: int, *sharding: str) -> dict:
        run([*command, "train", str(tmp_path / "in.pt2"), "--data", str(data), "--eval", str(dev), "--output-dir",
             str(out), "--max-steps", "1", "--batch-size", str(batch_size), "--lr", "1e-12", "--eval-every", "1", *sharding])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in records if r["split"] == "eval")

    one = evaluated(CLI, tmp_path / "one", 4)
    two = evaluated([*TORCHRUN, *CLI], tmp_path / "two", 2, "--fsdp")
    assert two["accuracy"] == one["accuracy"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
