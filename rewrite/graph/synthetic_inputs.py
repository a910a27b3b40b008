"""Synthetic model inputs: for capture, for ONNX verification and for benchmarks."""
from __future__ import annotations

import torch

DEFAULT_INPUT_NAMES = ("input_ids", "attention_mask")


def example_inputs(
    input_names: list[str] | tuple[str, ...],
    vocab_size: int,
    batch: int = 2,
    seq: int = 8,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pad: bool = False,
) -> dict[str, torch.Tensor]:
    """Token ids in the vocabulary, an attention mask (left-padded on the last row if `pad`), zero type ids."""
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for name in input_names:
        if name == "input_ids":
            value = torch.randint(0, vocab_size, (batch, seq), generator=generator)
        elif name == "attention_mask":
            value = torch.ones(batch, seq, dtype=torch.long)
            if pad and batch > 1 and seq > 2:
                value[-1, : seq // 2] = 0
        else:
            value = torch.zeros(batch, seq, dtype=torch.long)
        inputs[name] = value.to(device)
    return inputs
