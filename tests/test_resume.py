"""Resume: `rewrite train` SIGKILLed twice mid-run and resumed ends with the uninterrupted run's weights."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import safetensors.torch
import torch

import rewrite
from rewrite.training.checkpoint import LOCK_NAME, completed
from rewrite.errors import RewriteError
from rewrite.training.train import TrainConfig

from helpers import lora_graph, sentiment_rows

CLI = [sys.executable, "-c", "from rewrite.cli.main import main; main()"]
TIMEOUT = 300


def train_command(graph, data, output_dir, *extra) -> list[str]:
    return [*CLI, "train", str(graph), "--data", str(data), "--eval", str(data), "--output-dir", str(output_dir),
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--save-every", "3", "--seed", "7", *extra]


def run_to_end(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr


def kill_when(command: list[str], ready) -> None:
    """Starts `command`, SIGKILLs it as soon as `ready()` holds, and checks it was still running then."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def steps_done(output_dir) -> int:
    log = output_dir / "metrics.jsonl"
    return sum(1 for line in log.read_text().splitlines() if '"split": "train"' in line) if log.exists() else 0


def without_timing(output_dir) -> list[dict]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.mark.slow
def test_sigkilled_and_resumed_run_equals_an_uninterrupted_one(tiny_bert_dir, tmp_path):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls", num_labels=2)  # dropout 0.1: RNG state matters
    torch.manual_seed(0)
    rewrite.apply(gm, "lora", rank=4, alpha=8, roles=["q", "v"])
    rewrite.save(gm, tmp_path / "in.pt2")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(64, seed=0)))  # 2 x 16 steps
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"

    run_to_end(train_command(tmp_path / "in.pt2", data, reference))
    # First kill: while the first checkpoint is being written or just after; second: between checkpoints.
    checkpoints = interrupted / "checkpoints"
    kill_when(train_command(tmp_path / "in.pt2", data, interrupted),
              lambda: checkpoints.is_dir() and any(checkpoints.iterdir()))
    kill_when(train_command(tmp_path / "in.pt2", data, interrupted, "--resume"),
              lambda: steps_done(interrupted) >= 20)
    assert 0 < max(step for step, _ in completed(checkpoints)) < 32
    run_to_end(train_command(tmp_path / "in.pt2", data, interrupted, "--resume"))

    expected = safetensors.torch.load_file(reference / "adapter" / "adapter_model.safetensors")
    got = safetensors.torch.load_file(interrupted / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert without_timing(interrupted) == without_timing(reference)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000030", "step-00000032"]


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {  # what a full disk or an interrupted copy leaves: (damage, the part the message names)
    "truncated-shards": (lambda step: _truncate(step / "__0_0.distcp"), "its shards (*.distcp) are damaged or missing"),
    "missing-index": (lambda step: (step / ".metadata").unlink(), ".metadata is missing"),
    "bad-json": (lambda step: (step / "checkpoint.json").write_text('{"step": '), "checkpoint.json is damaged"),
    "missing-state": (lambda step: (step / "trainer_state.pt").unlink(), "trainer_state.pt is missing"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(no_dropout_dir, tmp_path, caplog, damage):
    rows = sentiment_rows(32, seed=0)
    config = TrainConfig(output_dir=tmp_path, max_steps=4, batch_size=8, lr=1e-2, save_every=1, progress=False)
    rewrite.train(lora_graph(no_dropout_dir), rows, config=config)
    uninterrupted = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    newest, before = tmp_path / "checkpoints" / "step-00000004", tmp_path / "checkpoints" / "step-00000003"
    spoil, part = DAMAGES[damage]
    spoil(newest)

    gm = lora_graph(no_dropout_dir)
    with caplog.at_level(logging.INFO, logger="rewrite"):
        result = rewrite.train(gm, rows, config=replace(config, resume=True))

    assert result.resumed_from == 3 and result.steps == 4
    assert [r.getMessage() for r in caplog.records if r.name == "rewrite.training.checkpoint"] == [
        f"checkpoint {str(newest)!r} is unreadable ({part}); removed it and resuming from step 3 (checkpoint {before})"]
    got = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for key in uninterrupted:
        assert torch.equal(got[key], uninterrupted[key]), key
    assert [step for step, _ in completed(tmp_path / "checkpoints")] == [3, 4]


def test_resume_says_its_step_and_refuses_when_no_checkpoint_reads(no_dropout_dir, tmp_path, caplog):
    rows = sentiment_rows(16, seed=0)
    config = TrainConfig(output_dir=tmp_path, max_steps=2, batch_size=8, save_every=1, keep_checkpoints=1,
                         progress=False, resume=True)
    rewrite.train(lora_graph(no_dropout_dir), rows, config=config)
    newest = tmp_path / "checkpoints" / "step-00000002"
    with caplog.at_level(logging.INFO, logger="rewrite"):
        rewrite.train(lora_graph(no_dropout_dir), rows, config=config)
    assert f"resuming from step 2 (checkpoint {newest})" in [r.getMessage() for r in caplog.records]

    (newest / "checkpoint.json").write_text("[]")
    with pytest.raises(RewriteError, match=re.escape(
            f"no checkpoint in {str(newest.parent)!r} can be read (the newest: checkpoint {str(newest)!r} is "
            f"unreadable (checkpoint.json is damaged)); delete {str(newest.parent)!r} to train from step 0")):
        rewrite.train(lora_graph(no_dropout_dir), rows, config=config)
    assert newest.is_dir()


def test_a_run_into_a_directory_in_use_is_refused_and_a_killed_runs_lock_blocks_nothing(tiny_bert_dir, tmp_path):
    rewrite.save(lora_graph(tiny_bert_dir), tmp_path / "in.pt2")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(16, seed=0)))
    run = tmp_path / "run"
    first = subprocess.Popen(train_command(tmp_path / "in.pt2", data, run, "--max-steps", "100000", "--save-every",
                                           "100000"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while steps_done(run) < 1:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        for extra in ([], ["--resume"]):
            second = subprocess.run(train_command(tmp_path / "in.pt2", data, run, "--max-steps", "2", *extra),
                                    capture_output=True, text=True, timeout=TIMEOUT)
            assert second.returncode == 2 and second.stderr.splitlines() == [
                f"error: output directory {str(run)!r} is in use by another training run; wait for it to end, or "
                "train into another --output-dir"], second.stderr
    finally:
        first.kill()
        first.wait()
    assert (run / LOCK_NAME).is_file()  # left by the killed run; the OS released its lock
    run_to_end(train_command(tmp_path / "in.pt2", data, run, "--max-steps", "2"))
    assert steps_done(run) == 2
