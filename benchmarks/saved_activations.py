"""What autograd keeps for the backward of one training forward: PEFT + HF vs ours, pass by pass.

    python benchmarks/saved_activations.py     # LLaMA-shaped 105M causal LM, batch 1 x 512, LoRA r=8 on q,v

Counted by `rewrite.training.speed.saved_bytes` (`torch.autograd.graph.saved_tensors_hooks`): distinct
storages, parameters left out, loss included. Load-independent, and per token, so it scales with the
batch. Ours is listed with no speed pass, with the default ones before the lean-activation passes,
then adding those one at a time.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as bench  # noqa: E402

LEAN = ["grouped_attention", "gated_activation", "recompute_input"]


def peft(directory: Path, inputs: dict) -> float:
    import transformers
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()
    from rewrite.training.speed import saved_bytes

    return saved_bytes(lambda: model(**inputs, labels=inputs["input_ids"]).loss, model) / 2 ** 20


def ours(directory: Path, inputs: dict, names: list[str]) -> float:
    import rewrite
    from rewrite.training import speed
    from rewrite.training.head_loss import head_of
    from rewrite.training.losses import loss_sum

    gm = rewrite.load_pretrained(directory, task="causal-lm")
    rewrite.apply(gm, "lora", roles=["q", "v"], **bench.LORA)
    for name, param in gm.named_parameters():
        param.requires_grad_(".lora_" in name)
    graph = speed.twin(gm, speed.resolve(names, dropout_parity=False, custom_loss=False)).train()
    return speed.saved_bytes(lambda: loss_sum(graph(**inputs), inputs["input_ids"], "causal-lm", head=head_of(graph)),
                             gm) / 2 ** 20


def main() -> None:
    from rewrite.training.speed import speed_passes

    with tempfile.TemporaryDirectory() as workdir:
        directory = bench.model_dir("llama-100m", Path(workdir))
        torch.manual_seed(0)
        inputs = {"input_ids": torch.randint(0, 32000, (1, 512)),
                  "attention_mask": torch.ones(1, 512, dtype=torch.long)}
        print(f"saved for the backward, llama-100m, batch 1 x 512 (MiB): PEFT {peft(directory, inputs):.1f}")
        first = [name for name in speed_passes() if name not in LEAN]
        for names in ([], first, *(first + LEAN[:i + 1] for i in range(len(LEAN)))):
            label = "+".join(names[len(first):]) or ("first passes" if names else "no pass")
            print(f"  ours, {label:<58} {ours(directory, inputs, names):8.1f}")


if __name__ == "__main__":
    main()
