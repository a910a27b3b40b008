"""`rewrite export --adapter-slots`, `rewrite adapter export` and `rewrite run --adapter(s)` through subprocesses."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import rewrite

from helpers import randomize_lora


def run(*args):
    return subprocess.run([sys.executable, "-c", "from rewrite.cli.main import main; main()", *map(str, args)],
                          capture_output=True, text=True)


def ok(*args):
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def served(tiny_bert_dir, tmp_path_factory):
    """A slotted and a mixed tiny-BERT classifier whose head was never trained, and one trained adapter file
    (with its head) for them."""
    directory = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_bert_dir, directory / "model")
    weights = safetensors.torch.load_file(tiny_bert_dir / "model.safetensors")
    safetensors.torch.save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")},
                                directory / "model" / "model.safetensors", metadata={"format": "pt"})
    ok("apply", directory / "model", "--pass", "lora", "--rank", "4", "--alpha", "8", "-o", directory / "lora.pt2")
    ok("export", directory / "lora.pt2", "--onnx", directory / "slots" / "model.onnx", "--adapter-slots")
    exported = ok("export", directory / "lora.pt2", "--onnx", directory / "mixed" / "model.onnx", "--mixed-adapters")
    (directory / "mixed-export.log").write_text(exported.stderr)
    trained = rewrite.load(directory / "lora.pt2")
    randomize_lora(trained)
    with torch.no_grad():
        trained.get_parameter("classifier.weight").mul_(-5.0)
    rewrite.save(trained, directory / "trained.pt2")
    ok("adapter", "export", directory / "trained.pt2", "-o", directory / "a.onnx_adapter",
       "--model", directory / "slots" / "model.onnx")
    return directory


def scores(output: str) -> list[str]:
    return [line.split()[0] for line in output.splitlines() if line.startswith("  ")]


def test_adapter_changes_what_run_prints(served):
    model = served / "slots" / "model.onnx"
    plain = ok("run", model, "--text", "a fine day").stdout
    adapted = ok("run", model, "--adapter", served / "a.onnx_adapter", "--text", "a fine day").stdout
    assert scores(plain) != scores(adapted)
    mixed = ok("run", served / "mixed" / "model.onnx", "--adapters", served / "a.onnx_adapter",
               "--adapter-index", "0,0", "--text", "a fine day", "--text", "a fine day").stdout
    assert scores(mixed) == scores(adapted) * 2


@pytest.mark.parametrize("args,message", [
    (["run", "slots/model.onnx", "--adapter", "nope.onnx_adapter", "--text", "x"], "does not exist"),
    (["run", "mixed/model.onnx", "--adapters", "a.onnx_adapter", "--adapter-index", "3", "--text", "x"],
     "adapter index 3 is out of range for 1 adapters"),
    (["adapter", "export", "lora.pt2", "-o", "out.onnx_adapter", "--model", "mixed/missing.onnx"], "does not exist"),
])
def test_bad_adapter_input_is_one_sentence_exit_2_and_no_file(served, args, message):
    result = run(*[served / a if a.endswith((".onnx", ".onnx_adapter", ".pt2")) else a for a in args])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (served / "out.onnx_adapter").exists()


def test_the_export_summary_lists_the_slot_inputs_and_verifies_once(served):
    summary = (served / "mixed-export.log").read_text()
    slots = [f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight" for i in (0, 1) for m in ("query", "value")
             for ab in "AB"]
    inputs = summary.split("inputs ", 1)[1].split(" -> ")[0].split(", ")
    assert inputs == ["input_ids", "token_type_ids", "attention_mask", *slots, "classifier.weight", "classifier.bias",
                      "adapter_index"]
    assert summary.count("max abs diff") == 1


def test_an_adapter_carrying_the_trained_head_is_not_warned_about_as_untrained(served):
    model = served / "slots" / "model.onnx"
    assert "classifier was never trained" in ok("run", model, "--text", "a fine day").stderr
    assert "never trained" not in ok("run", model, "--adapter", served / "a.onnx_adapter", "--text", "a").stderr


def test_adapter_export_replaces_a_file_only_with_overwrite(served, tmp_path):
    target = tmp_path / "a.onnx_adapter"
    target.write_bytes(b"kept")
    args = ["adapter", "export", served / "trained.pt2", "-o", target, "--model", served / "slots" / "model.onnx"]
    result = run(*args)
    assert result.returncode == 2 and "already exists; pass --overwrite to replace it" in result.stderr
    assert target.read_bytes() == b"kept"
    ok(*args, "--overwrite")
    assert target.read_bytes() == (served / "a.onnx_adapter").read_bytes()
