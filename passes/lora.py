"""LoRA: `y = W0 x + b + scale * B(A(dropout(x)))`, with PEFT's semantics, inserted as graph nodes.

Targets are chosen like PEFT (`targets`: a regex that fullmatches the module path, a list of names
matched exactly or as a `.suffix`, or `"all-linear"`) or structurally (`roles`: q, k, v, o, mlp, down, read
off the graph by `rewrite.graph.query`). With neither, the default is roles q and v. Targets may also name
embeddings (`embed_tokens`, `wte`), which get PEFT's `lora.Embedding` branch (`rewrite.adapters.embedding`). The branch's weights
live at `<module path>.lora_A.weight` / `.lora_B.weight`, PEFT's names, and adapter files are PEFT's
LORA (`adapter_config.json` + `base_model.model.<path>.lora_A.weight` ...), in both directions.

Everything LoRA shares with its variants (DoRA, PiSSA) is the adapter layer's `LowRank`: options, target
rules, adapter files, slots, and the fold, which merges each branch into its base weight,
`W0 += scale * B @ A`, and erases it: a folded graph is node for node the base capture.
"""
from __future__ import annotations

from dataclasses import dataclass

from rewrite.adapters.low_rank import LowRank
from rewrite.graph.pipeline import register


@register
@dataclass
class LoraPass(LowRank):
    name = "lora"
    title = "LoRA"
    adapts_lookups = True
