"""Planning a rewrite of a big model needs no weights: capture a LLaMA-7B-shaped model on the meta
device and put LoRA on it, reporting seconds and peak RSS (target: under 15 s and 1 GB on 2 cores).

    python benchmarks/meta_capture.py
"""
from __future__ import annotations

import resource
import time

import torch
import transformers

import rewrite
from rewrite.graph.synthetic_inputs import example_inputs

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    config = transformers.LlamaConfig(**LLAMA_7B)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    inputs = example_inputs(["input_ids", "attention_mask"], config.vocab_size, device="meta")
    gm = rewrite.capture(model, inputs, info={"config": config})
    captured = time.perf_counter()
    rewrite.apply(gm, "lora", rank=16, alpha=32, roles=["q", "k", "v", "o"])
    done = time.perf_counter()
    params = sum(p.numel() for p in gm.parameters())
    print(f"LLaMA-7B shape on meta: {params / 1e9:.2f}B parameters, {len(gm.graph.nodes)} nodes")
    print(f"capture {captured - start:.1f} s, LoRA pass {done - captured:.2f} s, total {done - start:.1f} s")
    print(f"peak RSS {peak_rss_mb():.0f} MB (after imports: {baseline:.0f} MB)")
    rewrite.print_trainable_parameters(gm)


if __name__ == "__main__":
    main()
