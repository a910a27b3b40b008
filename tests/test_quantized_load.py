"""Quantizing while loading (`load_pretrained(..., quantize=...)`, `rewrite capture --quantize`): a meta capture,
the quantize pass on the meta graph, then every tensor read alone from the safetensors files. The graph equals
loading the float model then quantizing it, tensor for tensor and byte for byte (int4, int8 and NF4), on LLaMA
(rotary buffers the file lacks), GPT-2 (Conv1D `[in, out]` weights, a tied LM head), BERT (seq-cls) and the real
MiniLM, fp32 or bf16, sharded or not, and with the base model's prefix; a tensor the file lacks, holds NaN or has
another shape, and a bad choice on the command line, are refused in one sentence."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import rewrite
import rewrite.passes
from rewrite.cli.main import cli, main
from rewrite.errors import RewriteError
from rewrite.graph import quantized

from conftest import tiny_model
from helpers import fresh_inputs

SLOW = pytest.mark.slow
CHECKPOINTS = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "seq-cls"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    """Each tiny model saved as a Hugging Face directory; `llama-sharded` in shards with an index, `llama-bf16`
    in bfloat16 (loaded in the checkpoint's dtype, as a plain load does)."""
    root = tmp_path_factory.mktemp("checkpoints")
    for arch, task in CHECKPOINTS.items():
        tiny_model(arch, task, seed=3).save_pretrained(root / arch)
    tiny_model("llama", seed=3).save_pretrained(root / "llama-sharded", max_shard_size="40KB")
    tiny_model("llama", seed=3).to(torch.bfloat16).save_pretrained(root / "llama-bf16")
    return {path.name: path for path in root.iterdir()}


def tensors(gm) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}


def ties(gm) -> list[list[str]]:
    """The names of each tensor, grouped: tied weights are one tensor under several names."""
    named = tensors(gm)
    return sorted(sorted(n for n, t in named.items() if t is tensor) for tensor in named.values())


def assert_same_graph(loaded, reference) -> None:
    """Every tensor equal in name, kind, dtype, shape, bytes and tying; the same outputs, bit for bit."""
    ours, theirs = tensors(loaded), tensors(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        mine = ours[name]
        assert (type(mine), mine.dtype, mine.shape, mine.requires_grad) == (
            type(tensor), tensor.dtype, tensor.shape, tensor.requires_grad), name
        as_bytes = (lambda t: t.reshape(-1).view(torch.uint8))  # noqa: E731
        assert mine.device.type == "cpu" and torch.equal(as_bytes(mine), as_bytes(tensor)), name
    assert ties(loaded) == ties(reference)
    assert loaded.info.history == reference.info.history and not loaded.info.meta_device
    fresh = fresh_inputs()
    inputs = {name: fresh.get(name, torch.zeros_like(fresh["input_ids"])) for name in loaded.info.input_names}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], reference(**inputs)[0])


def loaded_then_quantized(path, task: str = "auto", **options):
    gm = rewrite.load_pretrained(path, task)
    rewrite.apply(gm, "quantize", **options)
    return gm


@pytest.mark.parametrize("arch,options", [*((arch, {}) for arch in CHECKPOINTS), ("llama", {"dtype": "nf4"}),
                                          ("gpt2", {"dtype": "nf4", "double_quant": False}),
                                          pytest.param("llama-bf16", {"dtype": "int8"}, marks=SLOW)])
def test_quantizing_while_loading_equals_loading_then_quantizing(checkpoints, arch, options):
    loaded = rewrite.load_pretrained(checkpoints[arch], quantize=options)
    assert_same_graph(loaded, loaded_then_quantized(checkpoints[arch], **options))
    assert any(quantized.is_quantized(node) for node in loaded.graph.nodes)


@SLOW
def test_the_real_minilm_checkpoint_loads_quantized(minilm_dir):
    assert_same_graph(rewrite.load_pretrained(minilm_dir, quantize="int4"), loaded_then_quantized(minilm_dir))


@SLOW
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_int8_symmetric_and_per_module_blocks_load_as_the_pass_makes_them(checkpoints, arch):
    options = {"bits": 8, "symmetric": True, "block_size": 16, "block_pattern": {"re:.*0\\..*": 64}}
    loaded = rewrite.load_pretrained(checkpoints[arch], quantize=options)
    assert_same_graph(loaded, loaded_then_quantized(checkpoints[arch], **options))


def test_a_sharded_checkpoint_loads_shard_by_shard(checkpoints):
    path = checkpoints["llama-sharded"]
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(path.glob("*.safetensors"))) > 2
    options = {"bits": 8, "block_size": 32}
    loaded = rewrite.load_pretrained(path, quantize=rewrite.passes.create("quantize", **options))
    assert_same_graph(loaded, loaded_then_quantized(path, **options))


def test_the_base_models_prefix_maps_to_the_checkpoints_keys(checkpoints):
    """A seq-cls checkpoint (`bert.` keys) captured as its bare encoder, as Hugging Face loads it."""
    loaded = rewrite.load_pretrained(checkpoints["bert"], "feature-extraction", quantize="int4")
    assert_same_graph(loaded, loaded_then_quantized(checkpoints["bert"], "feature-extraction"))
    assert not any(name.startswith("bert.") for name in tensors(loaded))


UP = "model.layers.1.mlp.up_proj.weight"
BROKEN = {"missing": (lambda w: w.pop(UP), rf"has no tensor '{UP}' in its safetensors files"),
          "nan": (lambda w: w[UP].__setitem__((3, 5), float("nan")), rf"weight '{UP}' in .* holds NaN"),
          "shape": (lambda w: w.__setitem__("model.norm.weight", torch.ones(63)),
                    r"'model\.norm\.weight' in .* has shape \(63,\), but the config gives \(64,\)")}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_missing_corrupt_or_misshapen_tensor_is_named(checkpoints, tmp_path, broken):
    source = checkpoints["llama"]
    weights = safetensors.torch.load_file(source / "model.safetensors")
    change, message = BROKEN[broken]
    change(weights)
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(RewriteError, match=message):
        rewrite.load_pretrained(tmp_path, quantize="int4")


def test_a_pass_that_quantizes_nothing_is_refused(checkpoints):
    with pytest.raises(RewriteError, match="quantized no projection"):
        rewrite.load_pretrained(checkpoints["gpt2"], quantize=rewrite.passes.create("bitfit"))


def test_cli_capture_quantizes_while_loading_and_refuses_bad_choices_with_exit_2(checkpoints, tmp_path, monkeypatch,
                                                                                 capsys):
    graph = tmp_path / "graph.pt2"
    made = CliRunner().invoke(cli, ["capture", str(checkpoints["gpt2"]), "--quantize", "nf4", "--block-size", "32",
                                    "-o", str(graph)])
    assert made.exit_code == 0, made.output
    assert_same_graph(rewrite.load(graph), loaded_then_quantized(checkpoints["gpt2"], dtype="nf4", block_size=32))
    for args, message in [(["--quantize", "int3"], "'int3' is not one of"),
                          (["--quantize", "int8", "--block-size", "48"], "quantize block size 48 is not supported"),
                          (["--block-size", "32"], "give it with --quantize"),
                          (["--quantize", "int4", "--meta"], "which --meta never does")]:
        monkeypatch.setattr("sys.argv", ["rewrite", "capture", str(checkpoints["gpt2"]), *args,
                                         "-o", str(tmp_path / "bad.pt2")])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2 and message in capsys.readouterr().err.replace("\n", ""), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.pt2"]
