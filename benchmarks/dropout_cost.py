"""What dropout costs a training step, and what `fast_dropout` buys back: MiniLM seq-cls (batch 32 x
seq 128) trained by `rewrite.training.train` with the checkpoint's dropout drawn by torch (the default speed
passes but `fast_dropout`), drawn by `fast_dropout` (the defaults), and with every dropout
probability set to 0 (the defaults), same data.

    python benchmarks/dropout_cost.py [--steps 8]

On CPU torch draws each mask one element at a time, and scaled-dot-product attention with dropout
leaves its fused kernel for the math path; the run without dropout bounds what a cheaper dropout
could buy. Tokens/s is the median over the steps after the first.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import train_throughput

DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")


def tokens_per_s(directory: Path, steps: int, implementation: str = "rewrite") -> float:
    """`train_throughput`'s run of ours (`rewrite=-fast_dropout`: the defaults but that pass), one warm-up step."""
    spec = train_throughput.MODELS["minilm"]
    result = train_throughput.run_rewrite(directory, spec, "eager", steps - 1, 1, implementation)
    return spec["batch"] * spec["seq"] / result["step_s"]


def without_dropout(directory: Path, workdir: Path) -> Path:
    copy = workdir / "no-dropout"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update({key: 0.0 for key in DROPOUTS})
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        directory = train_throughput.model_dir("minilm", Path(workdir))
        drawn_by_torch = tokens_per_s(directory, args.steps, "rewrite=-fast_dropout")
        fast = tokens_per_s(directory, args.steps)
        plain = tokens_per_s(without_dropout(directory, Path(workdir)), args.steps)
    print(f"MiniLM seq-cls 32 x 128, rewrite.train tokens/s: {drawn_by_torch:,.0f} with torch's dropout, "
          f"{fast:,.0f} with fast_dropout ({fast / drawn_by_torch:.2f}x), {plain:,.0f} without dropout "
          f"({plain / drawn_by_torch:.2f}x)")


if __name__ == "__main__":
    main()
