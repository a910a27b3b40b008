"""Where prompt vectors live: the table, the ids that stand for them, and their starting values.

Prompt tuning and P-tuning both route the word-embedding lookup so that some ids read a trainable
table instead of the vocabulary. They share the conventions here: the table at
`prompt_encoder.embedding.weight` (PEFT's name), the ids it answers for in the `prompt_tokens`
buffer, one prompt method per graph, and how a table starts (vocabulary rows or N(0, 1)).
"""
from __future__ import annotations

import torch
from torch import fx, nn

from rewrite.errors import RewriteError
from rewrite.graph.query import architecture
from rewrite.graph.ir import tag

ENCODER = "prompt_encoder"
TABLE = f"{ENCODER}.embedding.weight"
TOKENS = "prompt_tokens"


def check_no_prompt(gm: fx.GraphModule) -> None:
    """One prompt method per graph: each owns the word-embedding lookup and the reserved ids."""
    if hasattr(gm, TOKENS):
        made_by = sorted({tag(n).get("pass", "unknown") for n in gm.graph.find_nodes(op="get_attr", target=TOKENS)})
        raise RewriteError(
            f"the graph already has prompt embeddings (from pass {', '.join(made_by) or 'unknown'}); "
            "start from the base graph to use another prompt method"
        )


def check_not_seq2seq(gm: fx.GraphModule) -> None:
    """PEFT prompts an encoder-decoder's encoder and decoder inputs; the prompt pass extends `input_ids` only."""
    if next(iter(gm.graph.find_nodes(op="placeholder", target="decoder_input_ids")), None) is not None:
        raise RewriteError(f"prompt tuning on {architecture(gm)} is not supported: it is an encoder-decoder model, "
                           "whose decoder inputs PEFT prompts too, and the prompt pass extends only input_ids")


def register_tokens(gm: fx.GraphModule, token_ids: list[int], device: torch.device) -> None:
    """The ids the prompt occupies (virtual ids, or P-tuning's placeholders), as a buffer that moves with the graph."""
    gm.register_buffer(TOKENS, torch.tensor(token_ids, dtype=torch.long, device=device))


def sampled_rows(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Random vocabulary rows (PEFT's SAMPLE_VOCAB): starting values on the scale of real token embeddings."""
    return torch.randint(0, weight.shape[0], (count,))


def initial_table(weight: torch.Tensor, count: int, rows: torch.Tensor | list[int] | None) -> torch.Tensor:
    """Copies of the word-embedding `rows`, or with none N(0, 1) as nn.Embedding draws them (PEFT's RANDOM);
    fp32 for half-precision models, as PEFT keeps its prompts."""
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    if rows is None:
        return nn.Embedding(count, weight.shape[1], device=weight.device, dtype=dtype).weight.detach()
    return weight.detach()[torch.as_tensor(rows, device=weight.device)].to(dtype)
