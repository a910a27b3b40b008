"""`rewrite adapter merge` / `rewrite.adapters.merge.merge_adapters` against PEFT's `add_weighted_adapter`: the
same tensors and config from the same adapters (DARE with the same seed), the same outputs through PEFT and
through `rewrite.load_adapter`, and bad input refused in one sentence with nothing written."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import rewrite
from rewrite.adapters.merge import merge_adapters

from conftest import tiny_config, tiny_model
from helpers import capture_tiny, fresh_inputs, logits, run_cli

# per architecture (and variant): the adapters' LoraConfig arguments (B trained, i.e. random); GPT-2's c_attn/c_proj are Conv1D
# (fan_in_fan_out) and its second adapter leaves out c_proj (a module only the first adapter holds)
ADAPTERS = {
    "llama": [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
              dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 4}),
              dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])],
    "gpt2": [dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
             dict(r=4, lora_alpha=4, target_modules=["c_attn"])],
    "bert": [dict(r=2, lora_alpha=4, target_modules=["query", "value"]),
             dict(r=2, lora_alpha=8, target_modules=["query", "value"])],
    # PEFT's Embedding LoRA (and the embedding weight PEFT saves beside it); a gaussian-initialized first adapter
    "llama-embedding": [dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights="gaussian"),
                        dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])],
}
WEIGHTS = [0.7, -0.3, 0.5]
# (method, options): every combination type of PEFT's, pruning at density 0.5
CASES = [("linear", {}), ("svd", {}), ("cat", {}), ("svd", dict(svd_rank=3, svd_clamp=0.9)),
         ("ties", dict(density=0.5)), ("ties", dict(density=0.5, majority_sign="frequency")),
         ("magnitude_prune", dict(density=0.5)), ("dare_linear", dict(density=0.5, seed=7)),
         ("dare_ties", dict(density=0.5, seed=7)), ("ties_svd", dict(density=0.5)),
         ("dare_linear_svd", dict(density=0.5, seed=7)), ("dare_ties_svd", dict(density=0.3, seed=3)),
         ("magnitude_prune_svd", dict(density=0.5))]


def _peft_options(options: dict) -> dict:
    names = {"majority_sign": "majority_sign_method"}
    return {names.get(k, k): v for k, v in options.items() if k != "seed"}


class World:
    """A tiny model with PEFT adapters a0, a1, ... (random A and B), each saved as its own directory."""

    def __init__(self, arch: str, root, count: int):
        self.model = _bert_encoder() if arch == "bert" else tiny_model(arch.split("-")[0])
        self.names = [f"a{i}" for i in range(count)]
        configs = ADAPTERS[arch][:count]
        self.peft = get_peft_model(copy.deepcopy(self.model), LoraConfig(**configs[0]), adapter_name="a0")
        for name, config in zip(self.names[1:], configs[1:]):
            self.peft.add_adapter(name, LoraConfig(**config))
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, param in self.peft.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        self.root = root
        self.peft.save_pretrained(root / "peft", selected_adapters=self.names)
        self.dirs = [root / "peft" / name for name in self.names]
        self.weights = WEIGHTS[:count]

    def peft_merge(self, name: str, method: str, options: dict):
        """PEFT's merged adapter `name`, saved; `torch.manual_seed(seed)` first, as our seed means."""
        torch.manual_seed(options.get("seed", 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.peft.add_weighted_adapter(self.names, self.weights, name, combination_type=method,
                                           **_peft_options(options))
        self.peft.save_pretrained(self.root / "merged", selected_adapters=[name])
        return self.root / "merged" / name


def _bert_encoder():
    """BERT without a head, so its adapters hold no modules_to_save (a classifier would)."""
    torch.manual_seed(0)
    return transformers.BertModel(tiny_config("bert"), add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache = {}

    def get(arch: str, count: int = 2) -> World:
        if (arch, count) not in cache:
            cache[arch, count] = World(arch, tmp_path_factory.mktemp(f"{arch}{count}"), count)
        return cache[arch, count]
    return get


def _files(directory):
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, safetensors.torch.load_file(directory / "adapter_model.safetensors")


def _assert_same_adapter(ours, theirs):
    config, tensors = _files(ours)
    peft_config, peft_tensors = _files(theirs)
    assert sorted(tensors) == sorted(peft_tensors)
    for key, value in peft_tensors.items():
        assert tensors[key].shape == value.shape and tensors[key].dtype == value.dtype, key
        torch.testing.assert_close(tensors[key], value, atol=1e-6, rtol=0)
    for field in ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                  "init_lora_weights", "use_rslora", "lora_dropout", "bias"):
        assert config[field] == peft_config[field], field
    assert sorted(config["target_modules"]) == sorted(peft_config["target_modules"])


def _name(method: str, options: dict) -> str:
    return "_".join([method, *(f"{k}{v}" for k, v in sorted(options.items()))]).replace(".", "")


@pytest.mark.parametrize("arch", list(ADAPTERS))
@pytest.mark.parametrize("method,options", CASES, ids=[_name(*c) for c in CASES])
def test_merge_equals_peft(worlds, tmp_path, arch, method, options):
    world = worlds(arch)
    theirs = world.peft_merge(_name(method, options), method, options)
    ours = merge_adapters(world.dirs, world.weights, tmp_path / "ours", method=method, **options)
    _assert_same_adapter(ours, theirs)


@pytest.mark.parametrize("method,options", [("linear", {}), ("svd", {}), ("cat", {}), ("ties", dict(density=0.5)),
                                            ("dare_ties", dict(density=0.5, seed=7))],
                         ids=["linear", "svd", "cat", "ties", "dare_ties"])
def test_three_adapters_equal_peft(worlds, tmp_path, method, options):
    world = worlds("llama", 3)
    theirs = world.peft_merge(_name(method, options), method, options)
    _assert_same_adapter(merge_adapters(world.dirs, world.weights, tmp_path / "ours", method=method, **options),
                         theirs)


@pytest.mark.parametrize("arch,method,options", [
    ("llama", "linear", {}), ("llama", "svd", {}), ("llama", "dare_ties", dict(density=0.5, seed=7)),
    ("gpt2", "cat", {}), ("gpt2", "ties", dict(density=0.5)), ("bert", "svd", {}), ("bert", "linear", {}),
    ("llama-embedding", "dare_linear_svd", dict(density=0.5, seed=7)),
])
def test_merged_adapter_gives_peft_outputs(worlds, tmp_path, arch, method, options):
    """PEFT's model with its merged adapter active == PEFT loading our files == our graph loading them (where our
    graph takes the adapter's kind: embedding LoRA is PEFT's only)."""
    world = worlds(arch)
    name = _name(method, options)
    world.peft_merge(name, method, options)
    ours = merge_adapters(world.dirs, world.weights, tmp_path / "ours", method=method, **options)
    world.peft.set_adapter(name)
    inputs = fresh_inputs()
    expected = _outputs(world.peft.eval(), inputs)
    loaded = PeftModel.from_pretrained(copy.deepcopy(world.model), ours).eval()
    torch.testing.assert_close(_outputs(loaded, inputs), expected, atol=1e-5, rtol=0)
    if arch != "llama-embedding":
        gm = rewrite.load_adapter(capture_tiny(world.model), ours)
        torch.testing.assert_close(_outputs(gm.eval(), inputs), expected, atol=1e-5, rtol=0)
    base = _outputs(world.model, inputs)
    assert (expected - base).abs().max() > 1e-3  # the merged adapter does change the outputs


def _outputs(module, inputs):
    with torch.no_grad():
        out = module(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_svd_at_full_rank_is_the_weighted_sum_of_deltas(worlds, tmp_path):
    """With rank r1 + r2 the svd merge is exact: W + sum_i w_i s_i B_i A_i, module by module."""
    world = worlds("gpt2")
    ours = merge_adapters(world.dirs, world.weights, tmp_path / "ours", method="svd", svd_rank=8)
    _, tensors = _files(ours)
    _, a0 = _files(world.dirs[0])
    _, a1 = _files(world.dirs[1])
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_{}.weight"
    expected = sum(w * s * (t[key.format("B")] @ t[key.format("A")]) for w, s, t in [(0.7, 2.0, a0), (-0.3, 1.0, a1)])
    torch.testing.assert_close(tensors[key.format("B")] @ tensors[key.format("A")], expected, atol=1e-5, rtol=0)


def test_dare_seed_decides_the_masks(worlds, tmp_path):
    world = worlds("llama")
    runs = {name: _files(merge_adapters(world.dirs, world.weights, tmp_path / name, method="dare_linear",
                                        density=0.5, seed=seed))[1]
            for name, seed in [("first", 5), ("again", 5), ("other", 6)]}
    key = next(iter(runs["first"]))
    assert torch.equal(runs["first"][key], runs["again"][key])
    assert not torch.equal(runs["first"][key], runs["other"][key])


def test_dare_without_seed_draws_from_torchs_generator_as_peft_does(worlds, tmp_path):
    world = worlds("llama")
    theirs = world.peft_merge("dare_global", "dare_ties", dict(density=0.5, seed=9))
    torch.manual_seed(9)
    _assert_same_adapter(merge_adapters(world.dirs, world.weights, tmp_path / "ours", method="dare_ties",
                                        density=0.5), theirs)


def test_rslora_adapters_merge_at_scale_one(tmp_path):
    """PEFT copies use_rslora into the merged config, so its merged adapter (lora_alpha = r) runs sqrt(r) times too
    strong; ours says use_rslora false, so the delta is the weighted sum of the adapters' deltas."""
    model = tiny_model("llama")
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                           target_modules=["q_proj", "v_proj"]), adapter_name="a0")
    peft.add_adapter("a1", LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "peft", selected_adapters=["a0", "a1"])
    ours = merge_adapters([tmp_path / "peft" / "a0", tmp_path / "peft" / "a1"], [0.5, 0.5], tmp_path / "ours",
                          method="cat")
    assert _files(ours)[0]["use_rslora"] is False
    merged = PeftModel.from_pretrained(copy.deepcopy(model), ours).merge_and_unload()
    with torch.no_grad():
        for name, module in peft.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "a0" in module.lora_A:
                module.base_layer.weight += 0.5 * module.get_delta_weight("a0") + 0.5 * module.get_delta_weight("a1")
    inputs = fresh_inputs()
    with peft.disable_adapter():
        expected = logits(peft, inputs)
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=0)


def test_cli_merge_end_to_end(worlds, tmp_path):
    world = worlds("llama")
    theirs = world.peft_merge("cli_ties", "ties", dict(density=0.5))
    result = run_cli("adapter", "merge", *world.dirs, "--weights", ",".join(map(str, world.weights)), "--method",
                     "ties", "--density", "0.5", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"wrote {tmp_path / 'out'} (ties merge of 2 adapters)"
    _assert_same_adapter(tmp_path / "out", theirs)


def _write_adapter(directory, config: dict, tensors: dict):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(tensors, directory / "adapter_model.safetensors")
    return directory


@pytest.fixture(scope="module")
def odd(worlds, tmp_path_factory):
    """Adapters a merge refuses, beside the good LLaMA pair: other ranks, another base model, DoRA, PiSSA,
    modules_to_save, a prompt-tuning adapter, a regex target."""
    world = worlds("llama")
    root = tmp_path_factory.mktemp("odd")
    config, tensors = _files(world.dirs[0])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    rank2 = {k: (v[:2] if ".lora_A." in k else v[:, :2]).contiguous() for k, v in tensors.items()}
    wide = {k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in tensors.items()}
    head = {**tensors, "base_model.model.lm_head.weight": torch.zeros(128, 64)}
    return {
        "good": world.dirs, "weights": world.weights,
        "rank2": _write_adapter(root / "rank2", {**config, "r": 2, "lora_alpha": 4}, rank2),
        "wide": _write_adapter(root / "wide", config, wide),
        "dora": _write_adapter(root / "dora", {**config, "use_dora": True}, tensors),
        "pissa": _write_adapter(root / "pissa", {**config, "init_lora_weights": "pissa"}, tensors),
        "head": _write_adapter(root / "head", {**config, "modules_to_save": ["lm_head"]}, head),
        "prompt": _write_adapter(root / "prompt", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2},
                                 {"prompt_embeddings": torch.zeros(2, 64)}),
        "regex": _write_adapter(root / "regex", {**config, "target_modules": ".*q_proj"}, tensors),
        "stray": _write_adapter(root / "stray", config, {**tensors, key.format("A").replace("weight", "bias"):
                                                         torch.zeros(4)}),
        "no-b": _write_adapter(root / "no-b", config, {k: v for k, v in tensors.items() if k != key.format("B")}),
        "rank-text": _write_adapter(root / "rank-text", {**config, "r": "4"}, tensors),
        "no-r": _write_adapter(root / "no-r", {k: v for k, v in config.items() if k != "r"}, tensors),
        "empty": _write_adapter(root / "empty", config, {}),
    }


# (case id, (directories, weights, options) given the adapters `o`, words the sentence must hold)
BAD = [
    ("one-adapter", lambda o: ([o["good"][0]], [1.0], {}), "at least two adapters"),
    ("weights-count", lambda o: (o["good"], [1.0], {}), "1 weights for 2 adapters"),
    ("weight-nan", lambda o: (o["good"], [1.0, math.nan], {}), "not all finite"),
    ("unknown-method", lambda o: (o["good"], o["weights"], dict(method="mean")), "merge method 'mean' is not known"),
    ("ties-without-density", lambda o: (o["good"], o["weights"], dict(method="ties")), "needs a density in (0, 1]"),
    ("density-0", lambda o: (o["good"], o["weights"], dict(method="dare_ties", density=0.0)), "density in (0, 1]"),
    ("density-above-1", lambda o: (o["good"], o["weights"], dict(method="ties_svd", density=1.5)), "(0, 1]"),
    ("bad-majority-sign", lambda o: (o["good"], o["weights"], dict(method="ties", density=0.5, majority_sign="max")),
     "majority sign method 'max' is not known"),
    ("svd-rank-0", lambda o: (o["good"], o["weights"], dict(svd_rank=0)), "svd rank 0 is not a positive number"),
    ("svd-rank-too-big", lambda o: (o["good"], o["weights"], dict(svd_rank=65)), "svd rank 65 is more than"),
    ("linear-other-ranks", lambda o: ([o["good"][0], o["rank2"]], o["weights"], dict(method="linear")),
     "every module needs the same rank"),
    ("dare-other-ranks", lambda o: ([o["good"][0], o["rank2"]], o["weights"], dict(method="dare_linear", density=0.5)),
     "every module needs the same rank"),
    ("other-base-model", lambda o: ([o["good"][0], o["wide"]], o["weights"], {}), "different base models"),
    ("dora", lambda o: ([o["good"][0], o["dora"]], o["weights"], {}), "sets use_dora"),
    ("pissa", lambda o: ([o["pissa"], o["good"][1]], o["weights"], {}), "init_lora_weights 'pissa'"),
    ("modules-to-save", lambda o: ([o["good"][0], o["head"]], o["weights"], {}), "sets modules_to_save"),
    ("not-lora", lambda o: ([o["good"][0], o["prompt"]], o["weights"], {}), "PROMPT_TUNING adapter"),
    ("regex-and-list-targets", lambda o: ([o["good"][0], o["regex"]], o["weights"], {}), "a regex in one and a list"),
    ("stray-tensor", lambda o: ([o["good"][0], o["stray"]], o["weights"], {}), "is not a LoRA factor"),
    ("missing-b", lambda o: ([o["good"][0], o["no-b"]], o["weights"], {}), "has no lora_B for"),
    ("rank-not-a-number", lambda o: ([o["good"][0], o["rank-text"]], o["weights"], {}), "positive whole ranks"),
    ("config-without-r", lambda o: ([o["good"][0], o["no-r"]], o["weights"], {}), "lacks r, which a LoRA adapter"),
    ("no-tensors", lambda o: ([o["good"][0], o["empty"]], o["weights"], {}), "holds no LoRA tensors"),
]


@pytest.mark.parametrize("make,words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_sentence_and_writes_nothing(odd, tmp_path, make, words):
    directories, weights, options = make(odd)
    with pytest.raises(rewrite.RewriteError) as error:
        merge_adapters(directories, weights, tmp_path / "out", **options)
    assert words in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


CLI_BAD = [
    ("weights-not-numbers", lambda o: ["--weights", "0.7,x"], "--weights '0.7,x' is not"),
    ("density-without-pruning", lambda o: ["--weights", "0.7,0.3", "--density", "0.5"],
     "--density does nothing without"),
    ("seed-without-dare", lambda o: ["--weights", "0.7,0.3", "--method", "ties", "--density", "0.5", "--seed", "1"],
     "--seed does nothing without"),
    ("svd-rank-with-linear", lambda o: ["--weights", "0.7,0.3", "--method", "linear", "--svd-rank", "2"],
     "--svd-rank does nothing without"),
    ("majority-sign-with-svd", lambda o: ["--weights", "0.7,0.3", "--majority-sign", "frequency"],
     "--majority-sign does nothing without"),
    ("other-ranks", lambda o: ["--weights", "0.7,0.3", "--method", "linear", "--replace-second", o["rank2"]],
     "every module needs the same rank"),
]


@pytest.mark.parametrize("make,words", [c[1:] for c in CLI_BAD], ids=[c[0] for c in CLI_BAD])
def test_cli_bad_input_exits_2_with_one_line(odd, tmp_path, make, words):
    args = [str(a) for a in make(odd)]
    sources = list(odd["good"])
    if "--replace-second" in args:
        at = args.index("--replace-second")
        sources[1] = args[at + 1]
        del args[at:at + 2]
    result = run_cli("adapter", "merge", *sources, *args, "-o", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert words in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
