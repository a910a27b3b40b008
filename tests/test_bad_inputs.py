"""Every failure a user can cause is one sentence: the CLI exits 2 with exactly one line on stderr and
no traceback, the Python API raises RewriteError (leaving the graph as it was), and nothing new is
left anywhere near the output (hidden temporaries included)."""
from __future__ import annotations

import io
import json
import math
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from filelock import FileLock

import rewrite
from rewrite.training.checkpoint import LOCK_NAME
from rewrite.cli.main import main
from rewrite.training.train import TrainConfig

from helpers import sentiment_rows

PVPS = 'labels: {"0": [terrible], "1": [great]}\npvps:\n  - name: first\n    pattern: "{text_a} It was [MASK] ."\n'


def _write_rows(path: Path, rows, header=True, sep="\t") -> Path:
    lines = ([f"label{sep}text"] if header else []) + [f"{r['label']}{sep}{r['text']}" for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rewrite_part(source: Path, target: Path, name: str, data: bytes | None) -> Path:
    """A copy of archive `source` with part `name` replaced by `data` (None: removed)."""
    with zipfile.ZipFile(source) as archive:
        parts = {n: archive.read(n) for n in archive.namelist()}
    if data is None:
        parts.pop(name)
    else:
        parts[name] = data
    with zipfile.ZipFile(target, "w") as archive:
        for part, value in parts.items():
            archive.writestr(part, value)
    return target


def _adapter(directory: Path, config, weights: dict[str, torch.Tensor] | None, raw_config: bytes | None = None) -> Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_bytes(raw_config if raw_config is not None else json.dumps(config).encode())
    if weights is not None:
        safetensors.torch.save_file(weights, directory / "adapter_model.safetensors")
    return directory


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_bert_dir, request):
    """Inputs shared by the cases: archives, an ONNX model, data files, adapters, a finished run."""
    root = tmp_path_factory.mktemp("world")
    base = rewrite.load_pretrained(tiny_bert_dir)
    rewrite.save(base, root / "base.pt2")
    torch.manual_seed(0)
    rewrite.apply(base, "lora", rank=4, alpha=8, roles=["q", "v"])
    rewrite.save(base, root / "lora.pt2")
    rewrite.save_adapter(base, root / "adapter")
    good = safetensors.torch.load_file(root / "adapter" / "adapter_model.safetensors")
    good_config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    with torch.no_grad():
        next(p for n, p in base.named_parameters() if "lora_B" in n).fill_(math.nan)
    rewrite.save(base, root / "nan-lora.pt2")
    meta = rewrite.load_pretrained(tiny_bert_dir, meta=True)
    rewrite.save(meta, root / "meta.pt2")
    folded = rewrite.load(root / "lora.pt2")
    rewrite.apply(folded, "fold")
    rewrite.export_onnx(folded, root / "onnx" / "model.onnx")
    train_tsv = _write_rows(root / "train.tsv", sentiment_rows(16, 0))
    rewrite.train(rewrite.load(root / "lora.pt2"), train_tsv,
                  config=TrainConfig(output_dir=root / "run", max_steps=1, batch_size=4, progress=False))
    (root / "train.tsv").write_bytes(train_tsv.read_bytes())
    (root / "latin1.tsv").write_bytes("label\ttext\n1\tcaf\xe9 cr\xe8me\n".encode("latin-1"))
    _write_rows(root / "headerless.csv", sentiment_rows(6, 1), header=False, sep=",")
    (root / "pvps.yaml").write_text(PVPS)
    (root / "bad-pvps.yaml").write_text("pvps: [1, 2]\n")
    (root / "notes.txt").write_text("not a model\n")
    (root / "fake.onnx").write_text("not an onnx model\n")
    (root / "garbage.pt2").write_bytes(b"not a zip" * 10)
    (root / "afile").write_text("a regular file\n")
    (root / "pipeline.yaml").write_bytes(b"passes:\n  - lora: {rank: \xff}\n")
    lora = root / "lora.pt2"
    _rewrite_part(lora, root / "list-header.pt2", "rewrite.json", b"[1, 2]")
    _rewrite_part(lora, root / "no-graph.pt2", "graph.json", None)
    _rewrite_part(lora, root / "graph-types.pt2", "graph.json", json.dumps({"codegen": None, "nodes": [7]}).encode())
    _rewrite_part(lora, root / "bad-weights.pt2", "weights.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    graph = json.loads(zipfile.ZipFile(lora).read("graph.json"))  # a gadget's first link: attrgetter on a weight
    graph["nodes"][-1:-1] = [{"op": "call_function", "name": "g1", "target": {"$fn": "operator.attrgetter"},
                              "args": {"$tuple": ["__class__.__repr__.__globals__"]}, "kwargs": {"$dict": []},
                              "meta": {"$dict": []}}]
    _rewrite_part(lora, root / "gadget.pt2", "graph.json", json.dumps(graph).encode())
    bert = root / "truncated-bert"
    shutil.copytree(tiny_bert_dir, bert)
    weights = bert / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    wrong = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in good.items()}
    nan = {k: v.clone() for k, v in good.items()}
    next(iter(nan.values())).fill_(math.inf)
    adapters = {
        "not-utf8": _adapter(root / "a-not-utf8", None, good, raw_config=b'{"peft_type": "LORA", "r": \xff}'),
        "no-r": _adapter(root / "a-no-r", {k: v for k, v in good_config.items() if k != "r"}, good),
        "list": _adapter(root / "a-list", [good_config], good),
        "nan": _adapter(root / "a-nan", good_config, nan),
        "shapes": _adapter(root / "a-shapes", good_config, wrong),
        "truncated": _adapter(root / "a-truncated", good_config, good),
    }
    cut = adapters["truncated"] / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])
    # capture, export, run, generate and adapter files: a folded graph, a weight of the wrong shape, NaN weights,
    # and a tiny causal LM exported with its cache
    rewrite.save(folded, root / "folded.pt2")
    query = "bert.encoder.layer.0.attention.self.query.weight"
    with zipfile.ZipFile(lora) as archive:
        tensors = safetensors.torch.load(archive.read("weights.safetensors"))
    tensors[query] = torch.zeros(33, 32)
    _rewrite_part(lora, root / "wrong-shape.pt2", "weights.safetensors", safetensors.torch.save(tensors))
    nan_base = rewrite.load(root / "base.pt2")
    with torch.no_grad():
        nan_base.get_parameter(query).fill_(math.nan)
    rewrite.save(nan_base, root / "nan-base.pt2")
    shutil.copytree(tiny_bert_dir, root / "nan-bert")
    weights = safetensors.torch.load_file(root / "nan-bert" / "model.safetensors")
    weights["bert.embeddings.word_embeddings.weight"][0] = math.inf
    safetensors.torch.save_file(weights, root / "nan-bert" / "model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(0)
    lm = root / "lm"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)).save_pretrained(lm)
    transformers.AutoTokenizer.from_pretrained(tiny_bert_dir, model_input_names=["input_ids", "attention_mask"]
                                               ).save_pretrained(lm)
    rewrite.export_onnx(rewrite.load_pretrained(lm), lm / "onnx" / "model.onnx", cache=True)
    # Training: other training rows, and an output directory a run in progress holds (its lock, while `w` lives).
    _write_rows(root / "other-train.tsv", sentiment_rows(16, 1))
    (root / "busy-run").mkdir()
    busy = FileLock(root / "busy-run" / LOCK_NAME, timeout=0)
    busy.acquire()
    request.addfinalizer(busy.release)
    # PET, mlm-head and messages: a model directory whose model type transformers does not know
    shutil.copytree(tiny_bert_dir, root / "unknown-type")
    (root / "unknown-type" / "config.json").write_text(json.dumps(
        {**json.loads((tiny_bert_dir / "config.json").read_text()), "model_type": "nope"}))
    return {"root": root, "model": tiny_bert_dir, "adapters": adapters, **{p.stem: p for p in root.iterdir()}}


def _files(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


LONG = " ".join(["word"] * 600)

# (case id, argv given the shared inputs `w` and an empty output directory `o`, words the sentence must hold)
CLI_CASES = [
    ("capture-truncated-safetensors", lambda w, o: ["capture", w["truncated-bert"], "-o", o / "g.pt2"], "weights"),
    ("capture-num-labels-0", lambda w, o: ["capture", w["model"], "--num-labels", "0", "-o", o / "g.pt2"], "num_labels"),
    ("capture-output-under-file", lambda w, o: ["capture", w["model"], "-o", w["afile"] / "g.pt2"], "is a file"),
    ("capture-missing-dir", lambda w, o: ["capture", o / "nope", "-o", o / "g.pt2"], "does not exist"),
    ("capture-not-a-model-dir", lambda w, o: ["capture", w["adapter"], "-o", o / "g.pt2"], "config.json"),
    ("capture-existing-output", lambda w, o: ["capture", w["model"], "-o", w["afile"]], "already exists"),
    ("apply-bad-regex", lambda w, o: ["apply", w["base"], "--pass", "lora", "--targets", "re:(", "-o", o / "g.pt2"],
     "regular expression"),
    ("apply-alpha-nan", lambda w, o: ["apply", w["base"], "--pass", "lora", "--alpha", "nan", "-o", o / "g.pt2"], "alpha"),
    ("apply-alpha-inf", lambda w, o: ["apply", w["base"], "--pass", "lora", "--alpha", "inf", "-o", o / "g.pt2"], "alpha"),
    ("apply-rank-0", lambda w, o: ["apply", w["base"], "--pass", "lora", "--rank", "0", "-o", o / "g.pt2"], "rank"),
    ("apply-dropout-1.5", lambda w, o: ["apply", w["base"], "--pass", "lora", "--dropout", "1.5", "-o", o / "g.pt2"],
     "dropout"),
    ("apply-dropout-nan", lambda w, o: ["apply", w["base"], "--pass", "lora", "--dropout", "nan", "-o", o / "g.pt2"],
     "dropout"),
    ("apply-alpha-pattern-nan", lambda w, o: ["apply", w["base"], "--pass", "lora", "--alpha-pattern",
                                              '{"query": NaN}', "-o", o / "g.pt2"], "alpha"),
    ("apply-rank-pattern-not-a-dict", lambda w, o: ["apply", w["base"], "--pass", "lora", "--rank-pattern", "5",
                                                    "-o", o / "g.pt2"], "rank_pattern"),
    ("apply-unknown-pass", lambda w, o: ["apply", w["base"], "--pass", "nope", "-o", o / "g.pt2"], "unknown pass"),
    ("apply-prompt-negative", lambda w, o: ["apply", w["base"], "--pass", "prompt", "--num-virtual-tokens", "-1",
                                            "-o", o / "g.pt2"], "num_virtual_tokens"),
    ("apply-neither-archive-nor-dir", lambda w, o: ["apply", o / "x.txt", "--pass", "lora", "-o", o / "g.pt2"],
     "neither"),
    ("apply-pt2-not-a-zip", lambda w, o: ["apply", w["garbage"], "--pass", "lora", "-o", o / "g.pt2"],
     "not a readable rewrite graph archive"),
    ("apply-pt2-header-list", lambda w, o: ["apply", w["list-header"], "--pass", "lora", "-o", o / "g.pt2"],
     "not a readable rewrite graph archive"),
    ("apply-pt2-no-graph", lambda w, o: ["apply", w["no-graph"], "--pass", "lora", "-o", o / "g.pt2"],
     "not a readable rewrite graph archive"),
    ("apply-pt2-graph-types", lambda w, o: ["apply", w["graph-types"], "--pass", "lora", "-o", o / "g.pt2"],
     "not a readable rewrite graph archive"),
    ("inspect-pt2-gadget", lambda w, o: ["inspect", w["gadget"]], "'operator.attrgetter' is not on the allow-list"),
    ("export-pt2-gadget", lambda w, o: ["export", w["gadget"], "--onnx", o / "m.onnx"], "is not on the allow-list"),
    ("train-pt2-gadget", lambda w, o: ["train", w["gadget"], "--data", w["train"], "--output-dir", o / "r"],
     "is not on the allow-list"),
    ("apply-pt2-bad-weights", lambda w, o: ["apply", w["bad-weights"], "--pass", "lora", "-o", o / "g.pt2"],
     "not a readable rewrite graph archive"),
    ("apply-output-under-file", lambda w, o: ["apply", w["base"], "--pass", "lora", "-o", w["afile"] / "x" / "g.pt2"],
     "is a file"),
    ("apply-pipeline-not-utf8", lambda w, o: ["apply", w["base"], "--pipeline", w["pipeline"], "-o", o / "g.pt2"],
     "pipeline file"),
    ("apply-bad-roles", lambda w, o: ["apply", w["base"], "--pass", "lora", "--roles", "zz", "-o", o / "g.pt2"], "role"),
    ("fold-nan-weights", lambda w, o: ["fold", w["nan-lora"], "-o", o / "g.pt2"], "non-finite"),
    ("fold-output-under-file", lambda w, o: ["fold", w["lora"], "-o", w["afile"] / "g.pt2"], "is a file"),
    ("fold-missing-archive", lambda w, o: ["fold", o / "missing.pt2", "-o", o / "g.pt2"], "does not exist"),
    ("export-opset-5", lambda w, o: ["export", w["base"], "--onnx", o / "m.onnx", "--opset", "5"], "opset"),
    ("export-opset-99", lambda w, o: ["export", w["base"], "--onnx", o / "m.onnx", "--opset", "99"], "opset"),
    ("export-onnx-under-file", lambda w, o: ["export", w["base"], "--onnx", w["afile"] / "m.onnx"], "is a file"),
    ("export-meta-graph", lambda w, o: ["export", w["meta"], "--onnx", o / "m.onnx"], "meta device"),
    ("export-over-existing-files", lambda w, o: ["export", w["base"], "--onnx", w["onnx"] / "model.onnx"],
     "--overwrite"),
    ("run-not-onnx", lambda w, o: ["run", w["fake"], "--text", "hello"], "not an ONNX model"),
    ("run-too-long", lambda w, o: ["run", w["onnx"] / "model.onnx", "--text", LONG, "--no-truncate"], "at most"),
    ("run-not-utf8-text", lambda w, o: ["run", w["onnx"] / "model.onnx", "--text", "caf\udce9"], "UTF-8"),
    ("run-no-tokenizer", lambda w, o: ["run", w["onnx"] / "model.onnx", "--text", "hi", "--tokenizer", w["adapter"]],
     "tokenizer"),
    ("train-not-utf8-data", lambda w, o: ["train", w["lora"], "--data", w["latin1"], "--output-dir", o / "run"],
     "not UTF-8"),
    ("train-headerless", lambda w, o: ["train", w["lora"], "--data", w["headerless"], "--output-dir", o / "run"],
     "--columns"),
    ("train-output-under-file", lambda w, o: ["train", w["lora"], "--data", w["train"], "--output-dir",
                                              w["afile"] / "run"], "is a file"),
    ("train-lr-nan", lambda w, o: ["train", w["lora"], "--data", w["train"], "--lr", "nan", "--output-dir", o / "r"],
     "learning rate"),
    ("train-lr-negative", lambda w, o: ["train", w["lora"], "--data", w["train"], "--lr", "-1", "--output-dir", o / "r"],
     "learning rate"),
    ("train-batch-0", lambda w, o: ["train", w["lora"], "--data", w["train"], "--batch-size", "0", "--output-dir",
                                    o / "r"], "batch_size"),
    ("train-warmup-ratio-2", lambda w, o: ["train", w["lora"], "--data", w["train"], "--warmup-ratio", "2",
                                           "--output-dir", o / "r"], "warmup"),
    ("train-base-graph", lambda w, o: ["train", w["base"], "--data", w["train"], "--output-dir", o / "r"],
     "no trainable parameters"),
    ("train-missing-data", lambda w, o: ["train", w["lora"], "--data", o / "none.tsv", "--output-dir", o / "r"],
     "does not exist"),
    ("train-resume-changed-lr", lambda w, o: ["train", w["lora"], "--data", w["train"], "--output-dir", w["run"],
                                              "--resume", "--max-steps", "1", "--batch-size", "4", "--lr", "0.5"],
     "lr 0.0002 -> 0.5"),
    ("pet-missing-pvp", lambda w, o: ["pet", "--model", w["model"], "--pvp", o / "none.yaml", "--output-dir", o / "p"],
     "PVP file"),
    ("pet-bad-pvp", lambda w, o: ["pet", "--model", w["model"], "--pvp", w["bad-pvps"], "--output-dir", o / "p"],
     "pvp"),
    ("pet-zero-shot-no-eval", lambda w, o: ["pet", "--model", w["model"], "--pvp", w["pvps"], "--zero-shot",
                                            "--output-dir", o / "p"], "--eval"),
    ("pet-no-unlabeled", lambda w, o: ["pet", "--model", w["model"], "--pvp", w["pvps"], "--train", w["train"],
                                       "--output-dir", o / "p"], "--unlabeled"),
    ("pet-lr-nan", lambda w, o: ["pet", "--model", w["model"], "--pvp", w["pvps"], "--train", w["train"],
                                 "--unlabeled", w["train"], "--lr", "nan", "--output-dir", o / "p"], "learning rate"),
    ("pet-output-under-file", lambda w, o: ["pet", "--model", w["model"], "--pvp", w["pvps"], "--train", w["train"],
                                            "--unlabeled", w["train"], "--output-dir", w["afile"] / "p"], "is a file"),
]

# Training, resuming and interruption.
TRAIN_CASES = [
    ("train-device-not-here", lambda w, o: ["train", w["lora"], "--data", w["train"], "--device", "cuda:99",
                                            "--output-dir", o / "r"], "device 'cuda:99' is not available on this "
     "machine; use cpu"),
    ("train-fsdp-one-process", lambda w, o: ["train", w["lora"], "--data", w["train"], "--fsdp", "--output-dir", o / "r"],
     "run it under torchrun --nproc_per_node N"),
    ("train-output-dir-in-use", lambda w, o: ["train", w["lora"], "--data", w["train"], "--output-dir", w["busy-run"]],
     "is in use by another training run; wait for it to end, or train into another --output-dir"),
    ("train-resume-other-data", lambda w, o: ["train", w["lora"], "--data", w["other-train"], "--output-dir", w["run"],
                                              "--resume", "--max-steps", "1", "--batch-size", "4"], "data_sha256 '"),
    ("train-resume-bf16", lambda w, o: ["train", w["lora"], "--data", w["train"], "--output-dir", w["run"], "--resume",
                                        "--max-steps", "1", "--batch-size", "4", "--bf16"], "(bf16 False -> True)"),
]

# Capture, export, run, generate and adapter files.
LM = ("lm", "onnx", "model.onnx")
EXPORT_CASES = [
    ("train-wrong-weight-shape", lambda w, o: ["train", w["wrong-shape"], "--data", w["train"], "--output-dir",
                                               o / "r"], "has shape (33, 32) but the model's config gives it (32, 32)"),
    ("export-wrong-weight-shape", lambda w, o: ["export", w["wrong-shape"], "--onnx", o / "m.onnx"],
     "weight bert.encoder.layer.0.attention.self.query.weight has shape (33, 32) but the model's config gives it "
     "(32, 32)"),
    ("run-generate-not-utf8-text", lambda w, o: ["run", w["root"].joinpath(*LM), "--generate", "--text",
                                                 "\udcff\udcfe bad"], "is not valid UTF-8"),
    ("export-folded-adapter-slots", lambda w, o: ["export", w["folded"], "--onnx", o / "m.onnx", "--adapter-slots"],
     "no adapter parameters to expose as slots; adapter slots need the unfolded graph"),
    ("export-base-adapter-slots", lambda w, o: ["export", w["base"], "--onnx", o / "m.onnx", "--mixed-adapters"],
     "no adapter parameters (LoRA branches, a prompt table or a trained head) to expose as slots"),
    ("adapter-export-existing-output", lambda w, o: ["adapter", "export", w["adapter"], "-o", w["afile"], "--model",
                                                     w["onnx"] / "model.onnx"], "already exists; pass --overwrite"),
    ("export-max-rank-without-slots", lambda w, o: ["export", w["lora"], "--onnx", o / "m.onnx", "--max-rank", "8"],
     "--max-rank does nothing without --adapter-slots or --mixed-adapters"),
    ("export-slots-and-mixed", lambda w, o: ["export", w["lora"], "--onnx", o / "m.onnx", "--adapter-slots",
                                             "--mixed-adapters"], "--adapter-slots adds nothing to --mixed-adapters"),
    ("run-temperature-without-sample", lambda w, o: ["run", w["root"].joinpath(*LM), "--generate", "--text", "hi",
                                                     "--temperature", "0.5"], "--temperature does nothing without --sample"),
    ("run-top-p-without-sample", lambda w, o: ["run", w["root"].joinpath(*LM), "--generate", "--text", "hi",
                                               "--top-p", "0.5"], "--top-p does nothing without --sample"),
    ("run-seed-without-sample", lambda w, o: ["run", w["root"].joinpath(*LM), "--generate", "--text", "hi",
                                              "--seed", "1"], "--seed does nothing without --sample"),
    ("run-top-k-generate-without-sample", lambda w, o: ["run", w["root"].joinpath(*LM), "--generate", "--text", "hi",
                                                        "--top-k", "3"], "--top-k does nothing without --sample"),
    ("run-sample-without-generate", lambda w, o: ["run", w["onnx"] / "model.onnx", "--text", "hi", "--sample"],
     "--sample does nothing without --generate"),
    ("run-max-new-tokens-without-generate", lambda w, o: ["run", w["onnx"] / "model.onnx", "--text", "hi",
                                                          "--max-new-tokens", "5"],
     "--max-new-tokens does nothing without --generate"),
    ("capture-non-finite-weights", lambda w, o: ["capture", w["nan-bert"], "-o", o / "g.pt2"],
     "weight bert.embeddings.word_embeddings.weight in"),
    ("export-non-finite-weights", lambda w, o: ["export", w["nan-base"], "--onnx", o / "m.onnx", "--no-verify"],
     "weight bert.encoder.layer.0.attention.self.query.weight holds NaN or infinite values"),
]

# PET, mlm-head and output files.
PET_CASES = [
    ("pet-output-dir-has-files", lambda w, o: ["pet", "--model", w["model"], "--pvp", w["pvps"], "--train", w["train"],
                                               "--unlabeled", w["train"], "--output-dir", w["run"]],
     "already holds adapter and"),
    ("mlm-head-output-has-files", lambda w, o: ["mlm-head", w["model"], "--data", w["train"], "-o", w["run"]],
     "already holds adapter"),
    ("mlm-head-held-out-0", lambda w, o: ["mlm-head", w["model"], "--data", w["train"], "--held-out", "0",
                                          "-o", o / "m"], "--held-out 0 leaves no held-out text"),
    ("capture-unknown-model-type", lambda w, o: ["capture", w["unknown-type"], "-o", o / "g.pt2"],
     "model type 'nope' is not one that transformers"),
    ("capture-no-class-for-task", lambda w, o: ["capture", w["lm"], "--task", "masked-lm", "-o", o / "g.pt2"],
     "holds a llama model, which transformers has no masked-lm class for; capture it with --task causal-lm"),
    ("pet-model-not-masked-lm", lambda w, o: ["pet", "--model", w["lm"], "--pvp", w["pvps"], "--train", w["train"],
                                              "--unlabeled", w["train"], "--output-dir", o / "p"],
     "no masked-lm class for"),
    ("mlm-head-held-out-all", lambda w, o: ["mlm-head", w["model"], "--data", w["train"], "--held-out", "16",
                                            "-o", o / "m"], "--held-out 16 needs more than 16 texts"),
]

# Adapter merging (`rewrite adapter merge`); the shared adapter is a sequence classifier's, so it holds its head.
MERGE_CASES = [
    ("adapter-merge-modules-to-save", lambda w, o: ["adapter", "merge", w["adapter"], w["adapter"], "--weights",
                                                    "0.5,0.5", "-o", o / "m"],
     "sets modules_to_save (['classifier']), which a merge cannot take"),
    ("adapter-merge-one-adapter", lambda w, o: ["adapter", "merge", w["adapter"], "--weights", "1", "-o", o / "m"],
     "a merge takes at least two adapters, not 1"),
    ("adapter-merge-weights-count", lambda w, o: ["adapter", "merge", w["adapter"], w["adapter"], "--weights",
                                                  "0.2,0.3,0.5", "-o", o / "m"], "3 weights for 2 adapters"),
    ("adapter-merge-unknown-method", lambda w, o: ["adapter", "merge", w["adapter"], w["adapter"], "--weights", "1,1",
                                                   "--method", "mean", "-o", o / "m"], "merge method 'mean' is not known"),
    ("adapter-merge-ties-no-density", lambda w, o: ["adapter", "merge", w["adapter"], w["adapter"], "--weights", "1,1",
                                                    "--method", "ties", "-o", o / "m"], "needs a density in (0, 1]"),
    ("adapter-merge-output-has-files", lambda w, o: ["adapter", "merge", w["adapter"], w["adapter"], "--weights", "1,1",
                                                     "-o", w["run"]], "already holds adapter"),
    ("adapter-merge-not-an-adapter", lambda w, o: ["adapter", "merge", w["model"], w["adapter"], "--weights", "1,1",
                                                   "-o", o / "m"], "has no adapter_config.json"),
]

# `rewrite serve`: refused before it listens (the shared causal LM has a cache but no adapter slots)
SERVE_CASES = [
    ("serve-not-an-onnx-model", lambda w, o: ["serve", w["fake"]], "is not an ONNX model"),
    ("serve-adapter-not-name-file", lambda w, o: ["serve", w["lm"] / "onnx" / "model.onnx", "--adapter", w["afile"]],
     "is not NAME=FILE"),
    ("serve-adapter-without-slots", lambda w, o: ["serve", w["lm"] / "onnx" / "model.onnx", "--adapter",
                                                  f"a={w['afile']}"], "serves the base model only"),
    ("serve-classifier-adapter-without-slots", lambda w, o: ["serve", w["onnx"] / "model.onnx", "--adapter",
                                                             f"a={w['afile']}"], "has no adapter slots"),
    ("serve-empty-adapter-dir", lambda w, o: ["serve", w["lm"] / "onnx" / "model.onnx", "--adapter-dir", o],
     "holds no .onnx_adapter files"),
]

CLI_CASES += TRAIN_CASES + EXPORT_CASES + PET_CASES + MERGE_CASES + SERVE_CASES


@pytest.mark.parametrize("make, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_sentence(w, tmp_path, capsys, monkeypatch, make, words):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["rewrite", *map(str, make(w, out))]
    before = _files(tmp_path, w["root"])
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exit:
        main()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("error:"), err
    assert words in lines[0], err
    assert _files(tmp_path, w["root"]) == before


def _load_adapter(name):
    def call(w):
        gm = rewrite.load(w["base"])
        before = (len(gm.graph.nodes), sorted(n for n, _ in gm.named_parameters()), len(gm.info.history))
        try:
            rewrite.load_adapter(gm, w["adapters"][name])
        finally:
            after = (len(gm.graph.nodes), sorted(n for n, _ in gm.named_parameters()), len(gm.info.history))
            assert after == before, "a refused adapter changed the graph"
            rewrite.load_adapter(gm, w["adapter"])  # and the right one still loads
    return call


def _apply(**options):
    def call(w):
        gm = rewrite.load(w["base"])
        nodes, history = len(gm.graph.nodes), list(gm.info.history)
        try:
            rewrite.apply(gm, "lora", **options)
        finally:
            assert (len(gm.graph.nodes), gm.info.history) == (nodes, history)
    return call


API_CASES = [
    ("load-header-list", lambda w: rewrite.load(w["list-header"]), "not a readable rewrite graph archive"),
    ("load-graph-types", lambda w: rewrite.load(w["graph-types"]), "not a readable rewrite graph archive"),
    ("load-not-a-zip", lambda w: rewrite.load(w["fake"]), "not a readable rewrite graph archive"),
    ("load-pretrained-truncated", lambda w: rewrite.load_pretrained(w["truncated-bert"]), "weights"),
    ("load-pretrained-num-labels-1", lambda w: rewrite.load_pretrained(w["model"], num_labels=1), "num_labels"),
    ("adapter-not-utf8", _load_adapter("not-utf8"), "UTF-8"),
    ("adapter-no-r", _load_adapter("no-r"), "lacks r"),
    ("adapter-list", _load_adapter("list"), "not an object"),
    ("adapter-nan", _load_adapter("nan"), "NaN or infinite"),
    ("adapter-shapes", _load_adapter("shapes"), "has shape"),
    ("adapter-truncated", _load_adapter("truncated"), "truncated"),
    ("apply-alpha-nan", _apply(alpha=math.nan), "alpha"),
    ("apply-bad-regex", _apply(targets="("), "regular expression"),
    ("apply-bad-pattern-regex", _apply(rank_pattern={"(": 4}), "regular expression"),
    ("apply-no-match", _apply(targets=["nothing"]), "match no module"),
    ("save-adapter-of-folded-graph", lambda w: rewrite.save_adapter(rewrite.apply(rewrite.load(w["lora"]), "fold"),
                                                                    w["root"] / "never"), "were folded"),
]


@pytest.mark.parametrize("call, words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_one_sentence_and_changes_nothing(w, call, words):
    with pytest.raises(rewrite.RewriteError) as error:
        call(w)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_data_files_with_bom_long_fields_and_named_columns(tmp_path):
    from rewrite.training.data import Fields, read_examples

    long_text = "x" * 200_000
    bom = tmp_path / "bom.tsv"
    bom.write_bytes("\ufefflabel\tsentence\n1\tgood\n0\t".encode() + long_text.encode() + b"\n")
    rows = read_examples(bom, task="seq-cls", fields=Fields(text="sentence"), label_names=["0", "1"])
    assert [r.label for r in rows] == [1, 0] and rows[1].text == long_text
    headerless = tmp_path / "h.csv"
    headerless.write_text("1,good\n0,bad\n")
    rows = read_examples(headerless, task="seq-cls", fields=Fields(columns=("label", "text")), label_names=["0", "1"])
    assert [(r.label, r.text) for r in rows] == [(1, "good"), (0, "bad")]
    with pytest.raises(rewrite.RewriteError, match="the rows' fields are 1, good .*--columns"):
        read_examples(headerless, task="seq-cls", label_names=["0", "1"])


def test_run_truncates_long_text_with_a_warning(w, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rewrite", "run", str(w["onnx"] / "model.onnx"), "--text", LONG])
    main()
    captured = capsys.readouterr()
    assert "cut to the model's 128 positions" in captured.err and "word" in captured.out
