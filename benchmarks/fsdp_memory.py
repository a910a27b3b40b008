"""Per-rank peak memory of LoRA training with FSDP per block, against one process, on a LLaMA-shaped model.

    python benchmarks/fsdp_memory.py [--model llama-1b] [--worlds 1,2,4] [--steps 3] [--json out.json]
    python benchmarks/fsdp_memory.py --model tiny-llama      # the benchmark's own smoke test
    python benchmarks/fsdp_memory.py --device cuda --worlds 1,2 --global-batch 8 --seq 1024   # benchmarks/gpu.sh

The model (random weights from its config; `llama-1b` is TinyLlama-1.1B's shape, 4.1 GiB of fp32 weights) is
captured with LoRA on q and v (r=8) and saved as a `.pt2` once. Each world size then trains it from that
archive as `rewrite train` does, in fresh processes: 1 is a single process, N > 1 is `torchrun` with `--fsdp`
(gloo on this CPU). The global batch is the same in every run (`--global-batch` x `--seq` tokens a step).
Each rank reports the peak RSS (/proc VmHWM) from loading the archive to the last step, above its RSS once
torch and rewrite are imported; the table gives the largest rank's, as a ratio to the fp32 weights and to the
single process's. Writing the outputs is not counted: rank 0 writes the whole model then, whatever the world.
glibc's mmap threshold is fixed (`ALLOCATOR`, which says why) in every run alike.
Tokens/s are the whole job's (every rank's tokens), the median over the steps after the first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import train_throughput

LORA = {"rank": 8, "alpha": 16, "roles": ["q", "v"]}
GIB = 2**30
# glibc's default threshold (128 KB), kept from growing (as `quantized_load.ALLOCATOR` does, which says why). A rank
# with 1/N of the batch allocates activations 1/N the size of one process's: a threshold above a rank's but not
# above one process's (1 MB here) keeps the freed activations in heaps that seldom shrink in N > 1 ranks only
# (2 ranks 0.68x and 4 ranks 0.38x of one process at 1 MB, against 0.64x and 0.37x at this threshold)
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def make_archive(model: str, workdir: Path) -> Path:
    import rewrite

    archive = workdir / f"{model}.pt2"
    gm = rewrite.load_pretrained(train_throughput.model_dir(model, workdir))
    rewrite.apply(gm, "lora", **LORA)
    rewrite.save(gm, archive)
    return archive


def child(archive: Path, steps: int, batch: int, seq: int, fsdp: bool, device_type: str) -> None:
    """One rank: load the archive and train; writes its figures beside the archive."""
    import torch

    import rewrite
    from rewrite.training import train as training

    device = torch.device(device_type, int(os.environ.get("LOCAL_RANK", "0")) if device_type == "cuda" else None)
    baseline = train_throughput.reset_peak(device)
    peak_at_end = {}
    write_outputs = training._Run.write_outputs

    def measured_write(run):  # the training peak ends where the outputs begin
        peak_at_end["bytes"] = train_throughput.peak(device)
        write_outputs(run)

    training._Run.write_outputs = measured_write
    gm = rewrite.load(archive)
    weights = sum(p.numel() * p.element_size() for p in gm.parameters())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as out:
        config = training.TrainConfig(max_steps=steps, batch_size=batch, max_length=seq, lr=1e-4, fsdp=fsdp,
                                      output_dir=out, device=device_type)
        result = rewrite.train(gm, train_throughput.rows(batch * world * steps, seq), config=config)
    seconds = [batch * seq / h["tokens_per_s"] for h in result.history if h["split"] == "train"][1:]
    rank = int(os.environ.get("RANK", "0"))
    (archive.parent / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "peak_bytes": peak_at_end["bytes"] - baseline, "weight_bytes": weights,
        "tokens_per_s": world * batch * seq / statistics.median(seconds)}))


def run_world(archive: Path, world: int, args) -> list[dict]:
    script = [__file__, "--child", str(archive), "--steps", str(args.steps), "--seq", str(args.seq),
              "--batch", str(args.global_batch // world), "--device", args.device]
    command = ([sys.executable, *script] if world == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                *script, "--fsdp"])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **ALLOCATOR})
    if done.returncode:
        raise SystemExit(f"world {world} failed:\n{done.stderr[-3000:]}")
    return [json.loads((archive.parent / f"rank{rank}.json").read_text()) for rank in range(world)]


def table(results: dict[int, list[dict]]) -> str:
    single = max(r["peak_bytes"] for r in results[1]) if 1 in results else None
    lines = ["| ranks | peak per rank (GiB) | x weights | x one process | tokens/s |", "|---|---|---|---|---|"]
    for world, ranks in results.items():
        peak, weights = max(r["peak_bytes"] for r in ranks), ranks[0]["weight_bytes"]
        versus = f"{peak / single:.2f}x" if single else "-"
        lines.append(f"| {world} | {peak / GIB:.2f} | {peak / weights:.2f}x | {versus} | "
                     f"{ranks[0]['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b", choices=["llama-1b", "llama-100m", "tiny-llama"])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: one GPU per rank, bf16, peak allocated GPU memory instead of RSS")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch, args.seq, args.fsdp, args.device)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        archive = make_archive(args.model, Path(tmp))
        results = {world: run_world(archive, world, args) for world in worlds}
    print(f"{args.model}, LoRA q,v r={LORA['rank']}, global batch {args.global_batch} x {args.seq} tokens, "
          f"{args.steps} steps, {'CPU (gloo)' if args.device == 'cpu' else 'GPUs (NCCL, bf16)'}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({str(w): r for w, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
