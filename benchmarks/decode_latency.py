"""What the KV cache buys: per-token decoding latency in ONNX Runtime of the export with a cache against
re-running the whole prefix through the export without one, on a LLaMA-shaped ~100M-parameter model
(random weights from its config), prompt 256 tokens, 64 new tokens, batch 1 and 8, as a ratio in one run.

    python benchmarks/decode_latency.py [--threads 2] [--prompt 256] [--new 64] [--samples 4]

With the cache, every one of the 64 decoding steps is timed (prefill excluded). Without it, each new
token costs one forward over the whole prefix; that forward is timed at `--samples` prefix lengths
spread over 256..319 and averaged. Optimum's ONNX export is not compared: `optimum[onnxruntime]` and
`optimum-onnx` require transformers < 4.58 and would replace this project's transformers 5.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import rewrite
from rewrite import runtime
from rewrite.runtime.generate import CachedModel, stream_ids


def llama_100m() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def export_both(directory: Path) -> tuple[Path, Path, int]:
    model = llama_100m()
    gm = rewrite.capture(model, {"input_ids": torch.zeros(2, 8, dtype=torch.long),
                                 "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    rewrite.export_onnx(gm, directory / "full.onnx")
    rewrite.export_onnx(gm, directory / "cached.onnx", cache=True)
    return directory / "full.onnx", directory / "cached.onnx", sum(p.numel() for p in model.parameters())


def cached_per_token(model: CachedModel, ids: np.ndarray, new: int) -> float:
    """Seconds per decoding step (the prefill step is not counted)."""
    stamps = [time.perf_counter() for _ in stream_ids(model, ids, np.ones_like(ids), max_new_tokens=new, eos=[])]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def full_prefix_per_token(path: Path, ids: np.ndarray, new: int, samples: int, threads: int) -> float:
    """Seconds for one forward over the prefix, averaged over prefix lengths across the decoding range."""
    sess = runtime.session(path, threads=threads)
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 32000, (ids.shape[0], new))
    times = []
    for length in np.linspace(0, new - 1, samples).astype(int):
        prefix = np.concatenate([ids, extra[:, :length]], 1)
        start = time.perf_counter()
        runtime.run(sess, {"input_ids": prefix, "attention_mask": np.ones_like(prefix)})
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full, cached, params = export_both(Path(tmp))
        print(f"LLaMA-shaped model, {params / 1e6:.0f}M parameters, fp32; ONNX Runtime CPU, {args.threads} threads "
              f"(shared machine: absolute times are noisy, the ratio is measured in one run)")
        model = CachedModel(cached, threads=args.threads)
        for batch in (1, 8):
            ids = np.random.default_rng(batch).integers(0, 32000, (batch, args.prompt))
            with_cache = cached_per_token(model, ids, args.new)
            without = full_prefix_per_token(full, ids, args.new, args.samples, args.threads)
            print(f"batch {batch}: with cache {with_cache * 1e3:.1f} ms/token, re-running the prefix "
                  f"{without * 1e3:.1f} ms/token: {without / with_cache:.1f}x")


if __name__ == "__main__":
    main()
