"""Quiet, honest command output: our own lines only by default, one summary per pass, `--version`,
seeded random draws, `inspect` and `run` say what is (not) trained, piped lines are never wrapped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
import transformers

import rewrite
from rewrite import quiet
from rewrite.cli.main import main


@pytest.fixture
def cli(capsys, monkeypatch):
    def call(*args):
        monkeypatch.setattr(sys, "argv", ["rewrite", *map(str, args)])
        main()
        return capsys.readouterr()
    return call


@pytest.fixture(scope="module")
def headless_dir(tmp_path_factory, tiny_bert_dir):
    """A BERT encoder without a classifier: capturing it as seq-cls draws a fresh head."""
    directory = tmp_path_factory.mktemp("headless")
    config = transformers.AutoConfig.from_pretrained(tiny_bert_dir)
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(directory)
    return directory


def test_version(cli):
    assert cli("--version").out.startswith("rewrite ")


def test_seeded_apply_draws_the_same_adapter(cli, tiny_bert_dir, tmp_path):
    for name in ("a", "b"):
        cli("apply", tiny_bert_dir, "--pass", "lora", "--seed", "3", "-o", tmp_path / f"{name}.pt2")
    a, b = (dict(rewrite.load(tmp_path / f"{n}.pt2").named_parameters()) for n in ("a", "b"))
    lora_a = [n for n in a if "lora_A" in n]
    assert lora_a and all(torch.equal(a[n], b[n]) for n in lora_a)


def test_capture_and_apply_print_our_lines_only_once(cli, headless_dir, tmp_path):
    captured = cli("capture", headless_dir, "--task", "seq-cls", "-o", tmp_path / "g.pt2")
    assert "Loading weights" not in captured.err and "LOAD REPORT" not in captured.err
    captured = cli("apply", tmp_path / "g.pt2", "--pass", "lora", "-o", tmp_path / "l.pt2")
    assert captured.err.count("pass lora:") == 1


def test_inspect_says_what_train_would_train(cli, headless_dir, tmp_path):
    cli("capture", headless_dir, "--task", "seq-cls", "-o", tmp_path / "g.pt2")
    shown = cli("inspect", tmp_path / "g.pt2").out
    assert "trainable params: 0 " in shown and "would train nothing" in shown
    assert "never trained (fresh random weights): classifier" in shown


def test_run_says_the_head_was_never_trained_and_keeps_lines_whole(cli, headless_dir, tmp_path):
    cli("capture", headless_dir, "--task", "seq-cls", "-o", tmp_path / "g.pt2")
    captured = cli("export", tmp_path / "g.pt2", "--onnx", tmp_path / "onnx" / "model.onnx")
    assert "Warning" not in captured.err and "warn" not in captured.err.lower()
    text = "a charming and often affecting journey " * 4
    captured = cli("run", tmp_path / "onnx" / "model.onnx", "--text", text)
    assert "never trained" in captured.err
    assert text in captured.out.splitlines()


def test_help_and_version_do_not_load_torch():
    import subprocess

    code = ("import sys; sys.argv = ['rewrite', '--help']\nfrom rewrite.cli.main import main\nmain()\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Commands:" in done.stdout and "torch not loaded" in done.stdout, done.stderr


QUICKSTART = """
import rewrite
{switch}
gm = rewrite.load_pretrained({model!r}, task="seq-cls")
rewrite.apply(gm, "lora", roles=["q", "v"], rank=8, alpha=16)
rewrite.print_trainable_parameters(gm)
rewrite.save_adapter(gm, "adapter/")
rewrite.apply(gm, "fold")
print(rewrite.export_onnx(gm, "out/model.onnx").max_abs_diff)
"""


@pytest.mark.parametrize("switch", ["", "rewrite.verbose()"])
def test_python_quickstart_is_as_quiet_as_the_command(headless_dir, tmp_path, switch):
    """Load reports, loading bars, exporter logs and library warnings only when asked for."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "REWRITE_VERBOSE")}
    script = QUICKSTART.format(switch=switch, model=str(headless_dir))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trainable params: ")
    if switch:
        assert "LOAD REPORT" in done.stderr and "Warning" in done.stderr
    else:
        assert done.stderr == ""


def _custom_code_tokenizer(source, target):
    """A copy of archive `source` whose tokenizer names a class only custom code would provide."""
    with zipfile.ZipFile(source) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(parts["tokenizer/tokenizer_config.json"])
    config.update(tokenizer_class="MyTokenizer", auto_map={"AutoTokenizer": ["tok.MyTokenizer", None]})
    parts["tokenizer/tokenizer_config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)
    return target


def test_third_party_text_is_kept_for_verbose(cli, headless_dir, tmp_path, capsys, monkeypatch):
    """Our sentence by default; with -v, transformers' and ONNX Runtime's own text after it."""
    monkeypatch.setattr(quiet, "_switch", None)  # -v turns the library verbose: back to the default afterwards
    cli("capture", headless_dir, "--task", "seq-cls", "-o", tmp_path / "g.pt2")
    cli("apply", tmp_path / "g.pt2", "--pass", "lora", "-o", tmp_path / "l.pt2")
    cli("export", tmp_path / "l.pt2", "--onnx", tmp_path / "slots" / "model.onnx", "--adapter-slots")
    (tmp_path / "bad.onnx_adapter").write_bytes(b"not an adapter")
    cases = [(["inspect", _custom_code_tokenizer(tmp_path / "g.pt2", tmp_path / "custom.pt2")],
              "its tokenizer files are not a tokenizer that transformers loads without custom code", "https://hf.co/"),
             (["run", tmp_path / "slots" / "model.onnx", "--adapter", tmp_path / "bad.onnx_adapter", "--text", "hi"],
              "is not an ONNX Runtime adapter file (ONNX Runtime cannot read it)", "onnxruntime_src")]
    for args, ours, theirs in cases:
        for verbose in ([], ["-v"]):
            with pytest.raises(SystemExit) as exit:
                cli(*verbose, *args)
            err = capsys.readouterr().err
            assert exit.value.code == 2 and ours in err, err
            assert (theirs in err) == bool(verbose) and ".rewrite-tmp" not in err.splitlines()[0]
            if not verbose:
                assert len(err.strip().splitlines()) == 1, err
