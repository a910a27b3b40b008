"""The `rewrite` command end to end, through subprocesses, including bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import rewrite


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "from rewrite.cli.main import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def ok(*args, cwd=None):
    result = run(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def base_archive(tiny_bert_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "base.pt2"
    ok("capture", tiny_bert_dir, "-o", path)
    return path


def test_capture_apply_inspect_fold_export_run(tiny_bert_dir, base_archive, tmp_path):
    ok("apply", base_archive, "--pass", "lora", "--roles", "q,v", "--rank", "4", "--alpha", "8", "--dropout", "0.05",
       "-o", tmp_path / "lora.pt2")
    shown = ok("inspect", tmp_path / "lora.pt2").stdout
    assert "lora(" in shown and "bert.encoder.layer.1.attention.self.value" in shown
    assert "trainable params: 1,090 || all params:" in shown  # 2 layers x (q, v) x 4 x (32 + 32) + classifier 66

    ok("fold", tmp_path / "lora.pt2", "-o", tmp_path / "folded.pt2")
    exported = ok("export", tmp_path / "folded.pt2", "--onnx", tmp_path / "model.onnx").stderr
    assert exported.count("max abs diff") == 1  # the verification is reported once
    predictions = ok("run", tmp_path / "model.onnx", "--text", "a fine film", "--top-k", "2").stdout
    assert "a fine film" in predictions and "LABEL_" in predictions


def test_apply_takes_a_model_directory_and_a_pipeline_file(tiny_bert_dir, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("passes:\n  - lora: {targets: [query, key], rank: 2, alpha: 4}\n")
    ok("apply", tiny_bert_dir, "--pipeline", pipeline, "-o", tmp_path / "out.pt2")
    history = rewrite.load(tmp_path / "out.pt2").info.history
    assert history[0]["options"]["targets"] == ["query", "key"] and len(history[0]["report"]["targets"]) == 4


def test_pipeline_files_can_be_json(tiny_bert_dir, tmp_path):
    pipeline = tmp_path / "pipeline.json"
    pipeline.write_text(json.dumps([{"lora": {"roles": ["o"], "rank": 2}}, "fold"]))
    ok("apply", tiny_bert_dir, "--pipeline", pipeline, "-o", tmp_path / "out.pt2")
    assert [h["pass"] for h in rewrite.load(tmp_path / "out.pt2").info.history] == ["lora", "fold"]


@pytest.mark.parametrize("args,message", [
    (["--pass", "lora", "--targets", "nope"], "match no module; linear modules in this graph: classifier, dense, key, query, value"),
    (["--pass", "lora", "--roles", "q,x"], "role x is not known"),
    (["--pass", "lora", "--rank", "0"], "LoRA rank 0 is not allowed"),
    (["--pass", "lora", "--rank", "33"], "LoRA rank 33 is too large"),
    (["--pass", "lora", "--alpha", "-1"], "LoRA alpha -1.0 is not allowed"),
    (["--pass", "lorra"], "unknown pass 'lorra'; available passes:"),
    (["--pass", "fold", "--rank", "4"], "option --rank is not accepted by pass fold"),
    ([], "give either --pass NAME"),
])
def test_bad_apply_input_is_one_sentence_exit_2_and_no_file(base_archive, tmp_path, args, message):
    result = run("apply", base_archive, *args, "-o", tmp_path / "out.pt2")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.pt2").exists()


def test_directory_without_config_is_exit_2(tmp_path):
    result = run("capture", tmp_path, "-o", tmp_path / "x.pt2")
    assert result.returncode == 2 and "has no config.json" in result.stderr and "Traceback" not in result.stderr


def test_truncated_archive_is_exit_2(base_archive, tmp_path):
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(base_archive.read_bytes()[:5000])
    result = run("inspect", broken)
    assert result.returncode == 2 and "is not a readable rewrite graph archive" in result.stderr


def test_help_everywhere():
    from click.testing import CliRunner

    from rewrite.cli.main import cli

    for command in [None, *cli.commands]:
        result = CliRunner().invoke(cli, [command, "--help"] if command else ["--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
