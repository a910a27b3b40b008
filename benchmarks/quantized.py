"""What a quantized base buys, as ratios measured in one run on the LLaMA-shaped 105M model (random weights from
its config, MiniLM's tokenizer; 2 threads):

- ONNX file size of the cached export, int4 / int8 / fp32 (LM head and embeddings stay float, our default and
  bitsandbytes'), int4 with the LM head quantized too (ONNX Runtime GenAI's default), and int4 with the head and
  the word embeddings (GatherBlockQuantized) quantized;
- decoding ms/token with the cache in ONNX Runtime, those (MatMulNBits, accuracy level 4) vs fp32, at batch 1
  and 8 (prompt 128, 32 new tokens; the prefill step is not counted);
- the int4 base with an active rank-16 LoRA adapter file (adapter slots on every projection) vs the int4 base
  alone;
- QLoRA training (LoRA q,v r=8 over an NF4 base quantized while loading) vs fp32 LoRA: the process's peak RSS
  above its import baseline from loading to the last step, and tokens/s.

    python benchmarks/quantized.py [--threads 2] [--prompt 128] [--new 32] [--train-steps 4] [--json out.json]
    python benchmarks/quantized.py --parts train --train-model llama-1b --train-seq 128   # QLoRA where layers dominate
    python benchmarks/quantized.py --model tiny-llama      # the benchmark's own smoke test

Each training arm runs in its own process, so peaks do not leak between them.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZE = {"int4": {"bits": 4, "block_size": 32}, "int8": {"bits": 8, "block_size": 32},
            # ONNX Runtime GenAI's int4 default quantizes the LM head too (its embeddings stay float)
            "int4+head": {"bits": 4, "block_size": 32, "targets": [*LLAMA_LINEAR, "lm_head"]},
            # and the embedding table as GatherBlockQuantized reads it (GenAI's op_types_to_quantize with Gather)
            "int4+head+embeddings": {"bits": 4, "block_size": 32, "targets": [*LLAMA_LINEAR, "lm_head"],
                                     "embeddings": True}}
SIZED = ("fp32", "int8", "int4", "int4+head", "int4+head+embeddings")
QLORA = "nf4"  # load_pretrained(quantize=...): quantized while loading
LORA_TRAIN = {"rank": 8, "alpha": 16, "roles": ["q", "v"]}
ADAPTER_RANK = 16


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_throughput = _sibling("train_throughput")


# ---------------------------------------------------------------- exports


def export_arms(directory: Path, out: Path) -> dict[str, Path]:
    """fp32, int8 and int4 cached exports of the base, the int4 base with adapter slots, and one adapter file."""
    import torch

    import rewrite
    from rewrite.export.onnx_adapters import export_adapter

    base = rewrite.load_pretrained(directory)
    paths = {"fp32": out / "fp32" / "model.onnx"}
    rewrite.export_onnx(base, paths["fp32"], cache=True)
    for name, options in QUANTIZE.items():
        quantized = copy.deepcopy(base)
        rewrite.apply(quantized, "quantize", **options)
        paths[name] = out / name.replace("+", "-") / "model.onnx"
        rewrite.export_onnx(quantized, paths[name], cache=True, accuracy_level=4)
        if name == "int4":
            rewrite.apply(quantized, "lora", rank=ADAPTER_RANK, alpha=2 * ADAPTER_RANK, targets="all-linear")
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for param_name, param in quantized.named_parameters():
                    if ".lora_" in param_name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            paths["int4+slots"] = out / "int4-slots" / "model.onnx"
            rewrite.export_onnx(quantized, paths["int4+slots"], cache=True, adapter_slots=True, accuracy_level=4)
            rewrite.save_adapter(quantized, out / "adapter")
            paths["adapter"] = export_adapter(out / "adapter", out / "adapter.onnx_adapter", paths["int4+slots"])
    return paths


def file_bytes(model: Path) -> int:
    """The model file and its external data, if any."""
    return sum(f.stat().st_size for f in model.parent.iterdir() if f.name.startswith(model.stem) and "onnx" in f.name)


def per_token(model_path: Path, batch: int, prompt: int, new: int, threads: int, adapter: Path | None = None) -> float:
    """Seconds per decoding step at `batch`, the prefill step not counted."""
    import numpy as np

    from rewrite.runtime.adapters import Adapters
    from rewrite.runtime.generate import CachedModel, stream_ids

    model = CachedModel(model_path, threads=threads, adapters=Adapters(active=str(adapter)) if adapter else None)
    ids = np.random.default_rng(batch).integers(1000, 30000, (batch, prompt))
    stamps = [time.perf_counter() for _ in stream_ids(model, ids, np.ones_like(ids), max_new_tokens=new, eos=[])]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def decode(paths: dict[str, Path], args) -> dict:
    """ms/token for every arm and batch, arms interleaved per batch so a noisy machine slows them alike."""
    arms = {**{name: (paths[name], None) for name in SIZED}, "int4+adapter": (paths["int4+slots"], paths["adapter"])}
    result = {}
    for batch in (1, 8):
        times = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, (model, adapter) in arms.items():
                times[name].append(per_token(model, batch, args.prompt, args.new, args.threads, adapter))
        result[batch] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return result


# ---------------------------------------------------------------- training (one process per arm)


def train_child(arm: str, directory: Path, steps: int, warmup: int, batch: int, seq: int) -> dict:
    """Loads, applies LoRA and trains in this process; the peak counts from after the imports."""
    import torch  # noqa: F401  (imported before the baseline, as the model code is)

    import rewrite
    from rewrite.training.train import TrainConfig

    baseline = train_throughput.reset_peak(torch.device("cpu"))
    quantize = QLORA if arm == "qlora" else None
    gm = rewrite.load_pretrained(directory, quantize=quantize) if quantize else rewrite.load_pretrained(directory)
    rewrite.apply(gm, "lora", **LORA_TRAIN)
    config = TrainConfig(max_steps=warmup + steps, batch_size=batch, max_length=seq, lr=1e-4)
    result = rewrite.train(gm, train_throughput.rows(batch * (warmup + steps), seq), config=config)
    step_tokens = batch * seq
    seconds = [step_tokens / h["tokens_per_s"] for h in result.history if h["split"] == "train"][warmup:]
    return {"peak_bytes": train_throughput.peak(torch.device("cpu")) - baseline,
            "tokens_per_s": step_tokens / statistics.median(seconds),
            "trainable": sum(p.numel() for p in gm.parameters() if p.requires_grad)}


def train_arm(arm: str, directory: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", arm, "--model-dir", str(directory),
               "--train-steps", str(args.train_steps), "--train-batch", str(args.train_batch),
               "--train-seq", str(args.train_seq)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training arm {arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report


def table(result: dict) -> str:
    lines = []
    if "sizes" in result:
        sizes = result["sizes"]
        lines.append("ONNX file: " + "; ".join(f"{name} {size / 2**20:.0f} MiB ({size / sizes['fp32']:.2f}x)"
                                                for name, size in sizes.items()))
    for batch, ms in result.get("decode_ms", {}).items():
        lines.append(f"decode batch {batch}: " + "; ".join(
            f"{name} {value:.1f} ms/token ({ms['fp32'] / value:.2f}x fp32's speed)" for name, value in ms.items())
            + f"; the adapter costs {ms['int4+adapter'] / ms['int4']:.2f}x the int4 base")
    if "training" in result:
        fp32, qlora = result["training"]["fp32"], result["training"]["qlora"]
        lines.append(f"training (LoRA q,v r=8): fp32 base peak {fp32['peak_bytes'] / 2**20:.0f} MiB, "
                     f"{fp32['tokens_per_s']:.0f} tokens/s; QLoRA (NF4 base) peak {qlora['peak_bytes'] / 2**20:.0f} MiB "
                     f"({qlora['peak_bytes'] / fp32['peak_bytes']:.2f}x), {qlora['tokens_per_s']:.0f} tokens/s "
                     f"({qlora['tokens_per_s'] / fp32['tokens_per_s']:.2f}x); trainable parameters "
                     f"{fp32['trainable']} and {qlora['trainable']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-100m", choices=["llama-100m", "tiny-llama"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-seq", type=int, default=256)
    parser.add_argument("--train-model", default=None, choices=["llama-100m", "llama-1b", "tiny-llama"],
                        help="the training arms' model (default: --model); llama-1b is TinyLlama-1.1B's shape")
    parser.add_argument("--parts", default="export,train", help="export (file sizes and decoding), train, or both")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_child(args.child, args.model_dir, args.train_steps, 1, args.train_batch, args.train_seq)))
        return
    parts = set(args.parts.split(","))
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "export" in parts:
            paths = export_arms(train_throughput.model_dir(args.model, Path(tmp)), Path(tmp) / "onnx")
            result["sizes"] = {name: file_bytes(paths[name]) for name in SIZED}
            result["decode_ms"] = decode(paths, args)
        if "train" in parts:
            directory = train_throughput.model_dir(args.train_model or args.model, Path(tmp))
            result["training"] = {arm: train_arm(arm, directory, args) for arm in ("fp32", "qlora")}
    print(f"{args.model} (training: {args.train_model or args.model}), ONNX Runtime CPU, {args.threads} threads "
          "(shared machine: ratios are measured in one run)")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))

if __name__ == "__main__":
    main()
