"""Why zero-shot PET sits at chance on SST-2: each PVP's positive-minus-negative logit margin, untrained.

    python experiments/zero_shot_margin.py [--model DIR] [--data ../shared/data/SST-2]

Prints, per PVP of `pet_sst2_pvps.yaml` on the 872 dev sentences, the margin's mean and spread, the
share of sentences it calls positive, its AUC (how well it ranks positive above negative sentences,
0.5 = no signal), and the accuracy a threshold at its median would give (a calibrated zero-shot).
"""
from __future__ import annotations

import torch

import sst2
from rewrite.training.data import Fields
from rewrite.text import labels
from rewrite.recipes import pet


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The probability that a random positive example outscores a random negative one (Mann-Whitney)."""
    ranks = scores.argsort().argsort().double() + 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    args = sst2.base_parser(__doc__.splitlines()[0]).parse_args()
    model_dir = sst2.setup(args)
    pvps = labels.load_pvps(sst2.HERE / "pet_sst2_pvps.yaml")
    eval_set = pet.read_data(args.data / "k-shot" / "16-13" / "test.tsv", pvps, Fields(text="sentence"),
                             labeled=True)
    positive = torch.tensor([e.label == 1 for e in eval_set])
    logits = pet.zero_shot_logits(pet.capture_masked_lm(model_dir), pvps, eval_set, pet.PetConfig())
    print(f"{'PVP':<12} {'margin mean':>11} {'std':>6} {'positive':>9} {'AUC':>6} {'median-threshold acc':>21}")
    for name, pvp_logits in logits.items():
        margin = pvp_logits[:, 1] - pvp_logits[:, 0]
        calibrated = float(((margin > margin.median()) == positive).float().mean())
        print(f"{name:<12} {float(margin.mean()):>11.3f} {float(margin.std()):>6.3f} "
              f"{float((margin > 0).float().mean()):>9.3f} {auc(margin, positive):>6.3f} {calibrated:>21.3f}")


if __name__ == "__main__":
    main()
