"""Decoding speed of our cached export against ONNX Runtime GenAI's model builder output of the same weights.

    python benchmarks/genai_decode.py --genai-python VENV/bin/python [--threads 2] [--prompt 128] [--new 32]
    python benchmarks/genai_decode.py --genai-python VENV/bin/python --model tiny   # the benchmark's own test

The model is LLaMA-shaped, 124.7M parameters (hidden 768, 12 layers, 12 heads, 4 KV heads, vocabulary 32000;
random weights from its config, MiniLM's tokenizer). Our arms are `export_onnx(cache=True)` lowered onto ONNX
Runtime's fused ops (the default), the same with `fuse=False`, and int4 (`quantize` with the LM head, block 32,
symmetric, accuracy level 4: GenAI's int4 CPU model's format), the int4 once more with its weights in 4 KiB pages
(`CachedModel(huge_pages=False)`; see `rewrite.runtime.huge_pages`). GenAI's arms are
`onnxruntime_genai.models.builder -p fp32|int4 -e cpu`, run through `og.Generator` as installed, and its int4 once
more with its weights in huge pages too (glibc's `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). GenAI pins its own
onnxruntime, so it runs from another Python that has `onnxruntime-genai` (`--genai-python`; without it only our arms
run). Every arm uses `--threads` intra-op threads, random prompts of `--prompt` tokens, greedy decoding of `--new`
tokens without an early stop; a step is timed from the previous token to the next, the prefill (time to first token)
separately, as the median of `--repeats` runs in one fresh process (ours with only the torch-free runtime imported,
not this one, which built the exports with torch). A shared machine drifts by more than the arms differ (about 20%
between minutes here), so the arms take turns: `--rounds` rounds run every arm once, in alternating order, the arms
of one precision in a row; a figure is the median over the rounds, and a ratio the median of the rounds' ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import train_throughput

MODELS = {
    "llama-125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    "tiny": dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
}
INT4 = {"bits": 4, "block_size": 32, "symmetric": True,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}
GENAI_RUN = """
import json, sys, time, numpy as np, onnxruntime_genai as og
path, batch, prompt, new, repeats = sys.argv[1], *map(int, sys.argv[2:6])
model = og.Model(path)
runs = []
for repeat in range(repeats):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt + new, min_length=prompt + new, do_sample=False, batch_size=batch)
    generator = og.Generator(model, params)
    ids = np.random.default_rng(batch).integers(1000, 30000, (batch, prompt)).astype(np.int32)
    start = time.perf_counter()
    generator.append_tokens(ids)
    generator.generate_next_token()
    stamps = [time.perf_counter()]
    while not generator.is_done():
        generator.generate_next_token()
        stamps.append(time.perf_counter())
    runs.append({"first_s": stamps[0] - start, "step_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1)})
print(json.dumps(runs))
"""


OURS_RUN = """
import json, sys, time, numpy as np
from rewrite.runtime.generate import CachedModel, stream_ids
path, batch, prompt, new, repeats, threads, huge_pages = sys.argv[1], *map(int, sys.argv[2:8])
model = CachedModel(path, threads=threads, huge_pages=bool(huge_pages))
ids = np.random.default_rng(batch).integers(1000, 30000, (batch, prompt))
runs = []
for repeat in range(repeats):
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream_ids(model, ids, np.ones_like(ids), max_new_tokens=new, eos=[])]
    runs.append({"first_s": stamps[0] - start, "step_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1)})
print(json.dumps(runs))
"""


@dataclass(frozen=True)
class Arm:
    """One model as one runtime runs it, ours (`CachedModel`) or GenAI's, its weights in huge pages or not."""

    path: Path
    precision: str  # fp32 or int4: GenAI's arm of the same precision as installed is the reference
    genai: bool = False
    huge_pages: bool = True

    @property
    def reference(self) -> bool:
        return self.genai and not self.huge_pages


def model_dir(name: str, workdir: Path) -> Path:
    train_throughput.MODELS.setdefault(name, {"config": MODELS[name]})
    return train_throughput.model_dir(name, workdir)


def our_exports(directory: Path, out: Path) -> dict[str, Arm]:
    import rewrite

    base = rewrite.load_pretrained(directory)
    arms = {"ours fp32": Arm(out / "fp32" / "model.onnx", "fp32"),
            "ours fp32 unfused": Arm(out / "unfused" / "model.onnx", "fp32"),
            "ours int4": Arm(out / "int4" / "model.onnx", "int4"),
            "ours int4, 4 KiB pages": Arm(out / "int4" / "model.onnx", "int4", huge_pages=False)}
    rewrite.export_onnx(base, arms["ours fp32"].path, cache=True)
    rewrite.export_onnx(base, arms["ours fp32 unfused"].path, cache=True, fuse=False)
    quantized = copy.deepcopy(base)
    rewrite.apply(quantized, "quantize", **INT4)
    rewrite.export_onnx(quantized, arms["ours int4"].path, cache=True, accuracy_level=4)
    return arms


def genai_exports(python: str, directory: Path, out: Path, threads: int) -> dict[str, Arm]:
    """GenAI's builder output for fp32 and int4, with `threads` intra-op threads in its config."""
    arms = {}
    for precision in ("fp32", "int4"):
        target = out / f"genai-{precision}"
        subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(directory), "-o", str(target),
                        "-p", precision, "-e", "cpu", "-c", str(out / "cache")], check=True, capture_output=True)
        config = json.loads((target / "genai_config.json").read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (target / "genai_config.json").write_text(json.dumps(config, indent=2))
        arms[f"GenAI {precision}"] = Arm(target, precision, genai=True, huge_pages=False)
    arms["GenAI int4, huge pages"] = Arm(arms["GenAI int4"].path, "int4", genai=True)
    return arms


def run_ours(arm: Arm, batch: int, args) -> list[dict]:
    """Our arm in a fresh process with only the runtime imported, as deployed and as GenAI's arm runs."""
    done = subprocess.run([sys.executable, "-c", OURS_RUN, str(arm.path), str(batch), str(args.prompt), str(args.new),
                           str(args.repeats), str(args.threads), str(int(arm.huge_pages))],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_genai(python: str, arm: Arm, batch: int, args) -> list[dict]:
    """GenAI's arm in its own Python; glibc backs its heap with huge pages where the arm asks for them."""
    environment = os.environ | ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"} if arm.huge_pages else {})
    done = subprocess.run([python, "-c", GENAI_RUN, str(arm.path), str(batch), str(args.prompt), str(args.new),
                           str(args.repeats)], check=True, capture_output=True, text=True, env=environment)
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed_round(arms: dict[str, Arm], args, reverse: bool) -> dict[tuple[str, int], dict]:
    """Every arm at every batch once, each the median of its process's repeats; the arms of a precision in a row."""
    timings, order = {}, sorted(arms.items(), key=lambda item: item[1].precision)
    for batch in map(int, args.batches.split(",")):
        for name, arm in (reversed if reverse else iter)(order):
            runs = run_genai(args.genai_python, arm, batch, args) if arm.genai else run_ours(arm, batch, args)
            timings[name, batch] = {key: statistics.median(run[key] for run in runs) for key in ("first_s", "step_s")}
    return timings


def summary(arms: dict[str, Arm], rounds: list[dict]) -> dict[str, dict]:
    """Per arm and batch: median times over the rounds and, beside GenAI, median ratios of the same rounds."""
    results = {}
    for (name, batch) in rounds[0]:
        reference = f"GenAI {arms[name].precision}"
        timing = {key: statistics.median(r[name, batch][key] for r in rounds) for key in ("first_s", "step_s")}
        if reference in arms and not arms[name].reference:
            for key in ("first", "step"):
                timing[f"{key}_ratio"] = statistics.median(
                    r[name, batch][f"{key}_s"] / r[reference, batch][f"{key}_s"] for r in rounds)
        results.setdefault(name, dict(graph_size(arms[name].path)))[batch] = timing
    return results


@cache
def graph_size(path: Path) -> dict[str, int]:
    """The arm's graph nodes, and the kernels ONNX Runtime runs per step: the nodes of the graph it keeps after its
    own fusions (its optimized model)."""
    import onnx
    import onnxruntime as ort

    model = path if path.suffix == ".onnx" else path / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights")
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        kernels = len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)
    return {"nodes": len(onnx.load(model, load_external_data=False).graph.node), "kernels": kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-125m", choices=sorted(MODELS))
    parser.add_argument("--genai-python", help="a Python with onnxruntime-genai installed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir(args.model, Path(tmp))
        arms = our_exports(directory, Path(tmp) / "onnx")
        if args.genai_python:
            arms |= genai_exports(args.genai_python, directory, Path(tmp) / "onnx", args.threads)
        rounds = [timed_round(arms, args, reverse=number % 2 == 1) for number in range(args.rounds)]
        results = summary(arms, rounds)
    print(f"{args.model}, prompt {args.prompt}, {args.new} new tokens, ONNX Runtime CPU, {args.threads} threads, "
          f"medians of {args.rounds} rounds (ratios to GenAI of the same precision, paired by round)")
    print("| arm | nodes | kernels per step | batch | ms/token | vs GenAI | time to first token (ms) | vs GenAI |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        for batch, timing in ((b, t) for b, t in result.items() if isinstance(b, int)):
            ratios = [f"{timing[key]:.2f}x" if key in timing else "-" for key in ("step_ratio", "first_ratio")]
            print(f"| {name} | {result['nodes']} | {result['kernels']} | {batch} | {timing['step_s'] * 1e3:.1f} | "
                  f"{ratios[0]} | {timing['first_s'] * 1e3:.0f} | {ratios[1]} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
