"""Adapter slots on a model exported with a KV cache: generation with an adapter file active, or with a mixed
batch of adapters, against each adapter's folded cached export and PEFT's `generate`."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import rewrite
from rewrite.cli.main import main
from rewrite.errors import RewriteError
from rewrite.runtime.generate import generate
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters

from helpers import peft_twin, randomize_lora
from test_adapter_cli import run
from test_kv_cache import TEXTS, byte_tokenizer, hf_generate, tiny_lm

ADAPTERS = [(4, 8), (2, 4)]  # (rank, alpha): different ranks, so the mixed model pads them
MIXED_TEXTS = [*TEXTS, "once upon a time"]
MIXED_INDEX = [1, 0, 1]
STEPS = 12


@dataclass
class Served:
    """A base causal LM, its cached exports with slots and mixed slots, and per adapter: the trained graph, its
    file and its folded cached export."""

    directory: Path
    arch: str
    adapters: list = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    folded: list[Path] = field(default_factory=list)

    def model(self, name: str) -> Path:
        return self.directory / name / "model.onnx"


def lora(directory: Path, rank: int, alpha: float):
    gm = rewrite.load_pretrained(directory)
    rewrite.apply(gm, "lora", rank=rank, alpha=alpha)
    return gm


_BUILT: dict[str, Served] = {}


def build(arch: str, tmp_path_factory) -> Served:
    """Once per module and architecture: each export with a cache takes 5-15 s on a loaded 2-core machine."""
    if arch in _BUILT:
        return _BUILT[arch]
    directory = tmp_path_factory.mktemp(arch)
    tiny_lm(arch).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    served = _BUILT[arch] = Served(directory, arch)
    untrained = lora(directory, 4, 8)
    rewrite.export_onnx(untrained, served.model("slots"), cache=True, adapter_slots=True)
    rewrite.export_onnx(untrained, served.model("mixed"), cache=True, mixed_adapters=True)
    for number, (rank, alpha) in enumerate(ADAPTERS):
        gm = lora(directory, rank, alpha)
        randomize_lora(gm, seed=10 + number)
        rewrite.save_adapter(gm, directory / f"adapter{number}")
        served.files.append(export_adapter(directory / f"adapter{number}", directory / f"a{number}.onnx_adapter",
                                           served.model("slots")))
        folded = copy.deepcopy(gm)
        rewrite.apply(folded, "fold")
        rewrite.export_onnx(folded, served.model(f"folded{number}"), cache=True)
        served.adapters.append(gm)
        served.folded.append(served.model(f"folded{number}"))
    return served


@pytest.fixture(scope="module", params=["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def served(request, tmp_path_factory) -> Served:
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Served:
    return build("llama", tmp_path_factory)


def ours(path: Path, texts=TEXTS, adapters: Adapters | None = None):
    return generate(path, texts, max_new_tokens=STEPS, eos=[], keep_logits=True, adapters=adapters)


def same(got, tokens: np.ndarray, logits: np.ndarray) -> None:
    np.testing.assert_array_equal(got.token_ids, tokens)
    assert np.abs(np.stack(got.logits, 1) - logits).max() <= 1e-4


def test_no_adapter_active_generates_as_the_base_model(served):
    base = transformers.AutoModelForCausalLM.from_pretrained(served.directory).eval()
    tokens, logits = hf_generate(base)
    for model in ("slots", "mixed"):  # rank-0 slots; every row on the mixed model's defaults
        same(ours(served.model(model)), tokens[:, :STEPS], logits[:, :STEPS])


@pytest.mark.parametrize("number", range(len(ADAPTERS)))
def test_active_adapter_generates_as_its_folded_export_and_peft(served, number):
    slotted = ours(served.model("slots"), adapters=Adapters(active=str(served.files[number])))
    folded = ours(served.folded[number])
    same(slotted, folded.token_ids, np.stack(folded.logits, 1))
    rank, alpha = ADAPTERS[number]
    base = transformers.AutoModelForCausalLM.from_pretrained(served.directory).eval()
    gm = served.adapters[number]
    targets = sorted({n.split(".lora_")[0].rpartition(".")[2] for n, _ in gm.named_parameters() if ".lora_" in n})
    reference = peft_twin(base, gm, "causal-lm", r=rank, lora_alpha=alpha, target_modules=targets,
                          fan_in_fan_out=served.arch == "gpt2")
    tokens, logits = hf_generate(reference)
    same(slotted, tokens[:, :STEPS], logits[:, :STEPS])
    assert len(set(slotted.token_ids[0].tolist())) > 3  # the text is not one repeated token


def test_mixed_batch_rows_generate_as_their_own_folded_models(served):
    files = [str(f) for f in served.files]
    mixed = ours(served.model("mixed"), MIXED_TEXTS, Adapters(stacked=files, index=MIXED_INDEX))
    alone = [ours(path, MIXED_TEXTS) for path in served.folded]
    for row, number in enumerate(MIXED_INDEX):
        np.testing.assert_array_equal(mixed.token_ids[row], alone[number].token_ids[row])
        assert np.abs(np.stack(mixed.logits, 1)[row] - np.stack(alone[number].logits, 1)[row]).max() <= 1e-4


def cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.argv", ["rewrite", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())  # rich wraps long sentences


def test_cli_generates_with_an_adapter_and_with_mixed_adapters(llama, monkeypatch, capsys):
    served = llama
    run = ["run", "--generate", "--max-new-tokens", "6"]
    code, adapted, _ = cli([*run[:1], served.model("slots"), *run[1:], "--adapter", served.files[1],
                            "--text", TEXTS[0]], monkeypatch, capsys)
    assert code == 0 and adapted == generate(served.folded[1], TEXTS[:1], max_new_tokens=6).texts[0] + "\n"
    code, out, _ = cli([*run[:1], served.model("mixed"), *run[1:], "--adapters", f"{served.files[0]},{served.files[1]}",
                        "--adapter-index", "1,0", "--text", TEXTS[0], "--text", TEXTS[1]], monkeypatch, capsys)
    expected = [generate(served.folded[n], TEXTS, max_new_tokens=6).texts[row] for row, n in enumerate([1, 0])]
    assert code == 0 and all(text in out for text in expected)


@pytest.mark.parametrize("model, args, message", [
    ("slots", ["--adapter", "missing.onnx_adapter"], "does not exist"),
    ("mixed", ["--adapters", "a0.onnx_adapter", "--adapter-index", "0,1"], "out of range for 1 adapters"),
    ("mixed", ["--adapter", "a0.onnx_adapter"], "takes stacked adapters"),
    ("slots", ["--adapters", "a0.onnx_adapter"], "serves one adapter at a time"),
    ("slots", ["--adapter-index", "0,0"], "picks among --adapters"),
    ("folded0", ["--adapter", "a0.onnx_adapter"], "has no adapter slots"),
])
def test_bad_adapter_input_when_generating_is_one_sentence_and_exit_2(llama, model, args, message,
                                                                      monkeypatch, capsys):
    served = llama
    args = [served.directory / a if a.endswith(".onnx_adapter") else a for a in args]
    code, out, err = cli(["run", served.model(model), "--generate", "--text", TEXTS[0], "--text", TEXTS[1], *args],
                         monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_prompt_table_slot_with_a_cache_is_refused_and_nothing_is_written(tmp_path):
    directory = tmp_path / "base"
    tiny_lm("llama").save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    gm = rewrite.load_pretrained(directory)
    rewrite.apply(gm, "prompt", num_virtual_tokens=3)
    for mixed in (False, True):
        with pytest.raises(RewriteError, match="cannot take the prompt pass's prompt table as an adapter slot"):
            rewrite.export_onnx(gm, tmp_path / "out" / "model.onnx", cache=True, adapter_slots=not mixed,
                                mixed_adapters=mixed)
    rewrite.save(gm, tmp_path / "prompt.pt2")
    result = run("export", tmp_path / "prompt.pt2", "--onnx", tmp_path / "out" / "model.onnx", "--with-cache",
                 "--mixed-adapters")  # a fresh process: its log lines go to its own stderr
    err = " ".join(result.stderr.split())
    assert result.returncode == 2 and "stored as the cache's constant prefix" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_p_tuning_tables_ride_slots_of_a_cache_export_one_per_row(llama, tmp_path):
    """P-tuning's lookup is replayed on the cached graph, so its table is an ordinary slot there."""
    gm = rewrite.load_pretrained(llama.directory)
    rewrite.apply(gm, "ptuning", template="[P] [P] {text} [P]", encoder="mlp")
    rewrite.export_onnx(gm, tmp_path / "slots" / "model.onnx", cache=True, adapter_slots=True)
    rewrite.export_onnx(gm, tmp_path / "mixed" / "model.onnx", cache=True, mixed_adapters=True)
    files, folded = [], []
    for number in range(2):
        trained = copy.deepcopy(gm)
        generator = torch.Generator().manual_seed(number)
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if name.startswith("prompt_encoder."):
                    param.add_(torch.randn(param.shape, generator=generator) * 0.5)
        rewrite.save(trained, tmp_path / f"p{number}.pt2")
        files.append(str(export_adapter(tmp_path / f"p{number}.pt2", tmp_path / f"p{number}.onnx_adapter",
                                        tmp_path / "slots" / "model.onnx")))
        rewrite.apply(trained, "fold")
        rewrite.export_onnx(trained, tmp_path / f"folded{number}" / "model.onnx", cache=True)
        folded.append(ours(tmp_path / f"folded{number}" / "model.onnx"))
    assert not np.array_equal(folded[0].token_ids, folded[1].token_ids), "the prompts change the text"
    for number in range(2):
        slotted = ours(tmp_path / "slots" / "model.onnx", adapters=Adapters(active=files[number]))
        same(slotted, folded[number].token_ids, np.stack(folded[number].logits, 1))
    mixed = ours(tmp_path / "mixed" / "model.onnx", adapters=Adapters(stacked=files, index=[1, 0]))
    for row, number in enumerate([1, 0]):
        np.testing.assert_array_equal(mixed.token_ids[row], folded[number].token_ids[row])
        assert np.abs(np.stack(mixed.logits, 1)[row] - np.stack(folded[number].logits, 1)[row]).max() <= 1e-4
