"""SIGKILL at random moments (seeded) during `apply`, `export` and `train`: earlier outputs stay intact,
no partial final file appears, and the next run in the same place leaves no temporaries behind."""
from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

import rewrite
from rewrite.training.checkpoint import completed

from helpers import run_cli, sentiment_rows

LEFTOVERS = (".rewrite-tmp-", ".step-", ".trash-")


def _ctrl_c_as_a_terminal_gives_it() -> None:
    """A suite run in the background of a non-interactive shell inherits SIGINT ignored, and Python then installs no
    Ctrl-C handler: the command is started with it restored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from rewrite.cli.main import main; main()", *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            preexec_fn=_ctrl_c_as_a_terminal_gives_it)


def _kill_at(process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(LEFTOVERS))


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def lora_archive(tmp_path_factory, tiny_bert_dir) -> Path:
    path = tmp_path_factory.mktemp("kill") / "lora.pt2"
    gm = rewrite.load_pretrained(tiny_bert_dir)
    rewrite.apply(gm, "lora", rank=4, alpha=8)
    rewrite.save(gm, path)
    return path


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_kill_during_apply(lora_archive, tmp_path, seed):
    output = tmp_path / "g.pt2"
    _ok(run_cli("apply", lora_archive, "--pass", "fold", "-o", output))
    before = _digest(output)
    _kill_at(_start("apply", lora_archive, "--pass", "fold", "-o", output, "--overwrite"),
             random.Random(seed).uniform(1.0, 8.0))
    assert _digest(output) == before or rewrite.load(output).info.history[-1]["pass"] == "fold"
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {"g.pt2"}
    _ok(run_cli("apply", lora_archive, "--pass", "fold", "-o", tmp_path / "again.pt2"))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_kill_during_export(lora_archive, tmp_path, seed):
    model = tmp_path / "out" / "model.onnx"
    _ok(run_cli("export", lora_archive, "--onnx", model))
    before = {p.name: _digest(p) for p in model.parent.iterdir()}
    _kill_at(_start("export", lora_archive, "--onnx", model, "--overwrite"), random.Random(seed).uniform(1.0, 10.0))
    onnx.checker.check_model(str(model))  # the old model or a whole new one, never a torn one
    assert {p.name for p in model.parent.iterdir() if not p.name.startswith(".")} == set(before)
    _ok(run_cli("export", lora_archive, "--onnx", model, "--overwrite"))
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_during_train_then_resume(lora_archive, tmp_path, seed):
    data = tmp_path / "train.tsv"
    data.write_text("label\ttext\n" + "".join(f"{r['label']}\t{r['text']}\n" for r in sentiment_rows(48, 0)))
    run = tmp_path / "run"
    args = ["train", lora_archive, "--data", data, "--output-dir", run, "--batch-size", "4", "--save-every", "1",
            "--epochs", "2"]
    _kill_at(_start(*args), random.Random(seed).uniform(2.0, 12.0))
    for step_dir in (run / "checkpoints").glob("step-*") if (run / "checkpoints").is_dir() else []:
        assert {p.name for p in step_dir.iterdir()} == {".metadata", "__0_0.distcp", "trainer_state.pt",
                                                         "checkpoint.json"}
    assert not (run / "model.pt2").exists() or rewrite.load(run / "model.pt2")
    _ok(run_cli(*args, "--resume"))
    assert rewrite.load(run / "model.pt2") and _leftovers(tmp_path) == []


def _interrupt_when(process: subprocess.Popen, ready) -> str:
    """Sends Ctrl-C's SIGINT as soon as `ready()` holds (the process still running then); its stderr."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, f"it ended before it could be interrupted: {process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"Ctrl-C did not stop it: {process.communicate()[1][-3000:]}") from None
    assert process.returncode == 130, err
    return err


@pytest.mark.parametrize("save_every", [2, 100000])
def test_ctrl_c_during_train_names_the_step_resume_continues_from(lora_archive, tmp_path, save_every):
    data = tmp_path / "train.tsv"
    data.write_text("label\ttext\n" + "".join(f"{r['label']}\t{r['text']}\n" for r in sentiment_rows(16, 0)))
    run = tmp_path / "run"
    log = run / "metrics.jsonl"
    err = _interrupt_when(_start("train", lora_archive, "--data", data, "--output-dir", run, "--batch-size", "4",
                                 "--max-steps", "100000", "--save-every", save_every, stderr=subprocess.PIPE),
                          lambda: log.exists() and log.read_text().count("\n") >= 3)
    saved = [step for step, _ in completed(run / "checkpoints")]
    if save_every == 2:
        assert saved and err.splitlines()[-1] == f"interrupted; `--resume` continues from step {saved[-1]}"
    else:
        assert saved == [] and err.splitlines()[-1] == ("interrupted before the first checkpoint was saved; run the "
                                                        "command again to start over")
    assert "Traceback" not in err and _leftovers(tmp_path) == []


def test_ctrl_c_during_export_leaves_nothing(lora_archive, tmp_path):
    out = tmp_path / "out"
    err = _interrupt_when(_start("export", lora_archive, "--onnx", out / "model.onnx", stderr=subprocess.PIPE),
                          lambda: out.is_dir() and any(out.iterdir()))  # while its files are being written
    assert err.strip().splitlines() == ["interrupted; nothing was written"]
    assert not out.exists() or list(out.iterdir()) == []
