"""Quantizing while loading: peak memory of `load_pretrained(path)` against `load_pretrained(path, quantize=...)`
on a LLaMA-shaped checkpoint, and the plan for a 7B LLaMA (config only, meta device, no weights).

    python benchmarks/quantized_load.py [--model llama-140m|tiny] [--kinds float,int4,nf4] [--json PATH]

(a) A random LLaMA-shaped checkpoint (fp32 safetensors, a few hundred MB) is written to a temp dir; each kind
loads it in a fresh process (glibc's mmap threshold fixed at 1 MB, see `ALLOCATOR`), which reports its peak
RSS (/proc VmHWM) and its RSS once torch, transformers and rewrite are imported (the baseline). The table gives
the peak over the baseline, also as a ratio to the float weights' size: a plain load holds them all (and
whatever transformers keeps while loading); quantizing while loading holds the quantized model and one float
tensor at a time; both pay for tracing the model (torch.export), a cost that does not grow with the weights.
Each kind is `rewrite capture --quantize KIND` (the quantize pass's `dtype`).
(b) For LLaMA-7B's shape, captured on the meta device and quantized there: the quantized modules, their float
bytes against their packed bytes, the whole model's float and quantized bytes, and the predicted peak of
quantizing while loading: the quantized model plus the largest float tensor read, and plus the largest
projection's quantization workspace (its temporaries, measured as a multiple of the weight in a fresh process).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
MODELS = {
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "llama-140m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
}
GIB = 2**30
# glibc serves blocks under its mmap threshold, which grows to 32 MB as large blocks are freed, from heaps it seldom
# gives back: one layer's freed temporaries then stay resident, and the peak varies by hundreds of MB from run to
# run. A fixed threshold returns every block over 1 MB when freed, in every arm alike.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def proc_status(field_name: str) -> int:
    """This process's /proc/self/status value in bytes (VmRSS now, VmHWM the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def pass_options(kind: str):
    """`rewrite capture --quantize KIND` as `load_pretrained`'s argument (None: a float load)."""
    return None if kind == "float" else kind


def child(kind: str, directory: str) -> None:
    """One load in this (fresh) process; prints its memory as JSON."""
    import rewrite
    import rewrite.passes  # noqa: F401  (registers the passes before the baseline is read)

    baseline = proc_status("VmRSS")
    gm = rewrite.load_pretrained(directory, quantize=pass_options(kind))
    held = sum(t.nbytes for t in {id(t): t for t in [*gm.parameters(), *gm.buffers()]}.values())
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": proc_status("VmHWM"), "model_bytes": held}))


def workspace(kind: str, rows: str, columns: str) -> None:
    """Prints the peak memory of quantizing one random `[rows, columns]` weight, over the weight's own bytes."""
    import torch

    from rewrite.graph import nf4, quantized

    weight = torch.randn(int(rows), int(columns))
    before = proc_status("VmRSS")
    block = nf4.DEFAULT_BLOCK_SIZE if kind == "nf4" else quantized.DEFAULT_BLOCK_SIZE
    fmt = quantized.Format(kind, block, double_quant=kind == "nf4")
    quantized.quantize_as(weight, fmt)
    print(json.dumps({"workspace_per_weight": (proc_status("VmHWM") - before) / weight.nbytes}))


def run_child(*args: str) -> dict:
    """`args` in a fresh process of this script, under `ALLOCATOR`; its JSON line."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, **ALLOCATOR})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_checkpoint(shape: dict, directory: Path) -> int:
    """A random fp32 LLaMA checkpoint; returns its weights' size in bytes."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, tie_word_embeddings=False))
    model.save_pretrained(directory)
    return sum(p.nbytes for p in model.parameters())


def measure(kinds: list[str], shape: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        float_bytes = write_checkpoint(shape, Path(tmp))
        rows = {}
        for kind in kinds:
            row = run_child("--child", kind, tmp)
            row["peak_over_baseline_per_float"] = (row["peak_bytes"] - row["baseline_bytes"]) / float_bytes
            rows[kind] = row
    return {"float_weights_bytes": float_bytes, "loads": rows}


def plan(kind: str, shape: dict) -> dict:
    """The 7B plan of `kind`, from the config alone; the workspace of quantizing its largest projection measured
    in a fresh process (on random weights of that shape)."""
    import transformers

    import rewrite
    import rewrite.passes  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        transformers.LlamaConfig(**shape, architectures=["LlamaForCausalLM"]).save_pretrained(tmp)
        gm = rewrite.load_pretrained(tmp, meta=True)
    floats = {name: t for name, t in gm.named_parameters()}
    rewrite.apply(gm, "quantize", dtype=kind)
    report = gm.info.history[-1]["report"]
    after = {name: t.nbytes for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    packed = sum(size for name, size in after.items() if name.rpartition(".")[0] in report["modules"])
    weights = [floats[f"{module}.weight"] for module in report["modules"]]
    largest_name, largest = max(floats.items(), key=lambda item: item[1].nbytes)
    widest = max(weights, key=lambda t: t.nbytes)
    factor = run_child("--workspace", kind, *map(str, widest.shape))["workspace_per_weight"]
    model = sum(after.values())
    return {"modules": len(report["modules"]), "quantized_float_bytes": sum(t.nbytes for t in weights),
            "quantized_bytes": packed, "model_float_bytes": sum(t.nbytes for t in floats.values()),
            "model_quantized_bytes": model, "largest_float_tensor": largest_name, "largest_float_bytes": largest.nbytes,
            "predicted_peak_bytes": model + largest.nbytes, "largest_projection_bytes": widest.nbytes,
            "quantize_workspace_per_weight": factor,
            "predicted_peak_with_workspace_bytes": model + max(largest.nbytes, int(widest.nbytes * factor))}


def print_tables(measured: dict, plans: dict, model: str) -> None:
    print(f"(a) {model}: float weights {measured['float_weights_bytes'] / GIB:.3f} GiB")
    print("| load | baseline RSS GiB | peak RSS GiB | model held GiB | peak - baseline - held GiB | "
          "(peak - baseline) / float weights |")
    print("|---|---|---|---|---|---|")
    for kind, row in measured["loads"].items():
        extra = row["peak_bytes"] - row["baseline_bytes"] - row["model_bytes"]
        print(f"| {kind} | {row['baseline_bytes'] / GIB:.3f} | {row['peak_bytes'] / GIB:.3f} | "
              f"{row['model_bytes'] / GIB:.3f} | {extra / GIB:.3f} | {row['peak_over_baseline_per_float']:.2f}x |")
    print("(b) LLaMA-7B shape, meta device")
    print("| kind | modules | their float GiB | packed GiB | model float GiB | model quantized GiB | largest float "
          "tensor | predicted peak GiB | quantize workspace / weight | with workspace GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, row in plans.items():
        print(f"| {kind} | {row['modules']} | {row['quantized_float_bytes'] / GIB:.2f} | "
              f"{row['quantized_bytes'] / GIB:.2f}"
              f" | {row['model_float_bytes'] / GIB:.2f} | {row['model_quantized_bytes'] / GIB:.2f} | "
              f"{row['largest_float_tensor']} ({row['largest_float_bytes'] / GIB:.2f}) | "
              f"{row['predicted_peak_bytes'] / GIB:.2f} | {row['quantize_workspace_per_weight']:.1f}x | "
              f"{row['predicted_peak_with_workspace_bytes'] / GIB:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-140m")
    parser.add_argument("--kinds", default="float,int4,nf4", help="comma-separated: float, int4, int8, nf4")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--workspace", nargs=3, metavar=("KIND", "ROWS", "COLUMNS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.workspace:
        child(*args.child) if args.child else workspace(*args.workspace)
        return
    kinds = args.kinds.split(",")
    measured = measure(kinds, MODELS[args.model])
    plans = {kind: plan(kind, LLAMA_7B) for kind in kinds if kind != "float"}
    print_tables(measured, plans, args.model)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, **measured, "plans_7b": plans}, indent=2))


if __name__ == "__main__":
    main()
