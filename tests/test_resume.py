"""Resume: `rewrite train` SIGKILLed twice mid-run and resumed ends with the uninterrupted run's weights."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

import rewrite
from rewrite.checkpoint import completed

from helpers import sentiment_rows

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
