"""PET, a recipe above the engine: pattern-verbalizer pairs, zero-shot evaluation, and PET / iPET training on a captured masked LM.

Pattern-Exploiting Training (Schick & Schuetze, EACL 2021) writes each input as a cloze text with one
`[MASK]` and reads the label from the MLM logits of label words at the mask (the `verbalizer` pass
does that as a graph rewrite). A pattern-verbalizer pair (PVP) is data: a pattern with `{text_a}`,
`{text_b}` and `[MASK]`, and label words per label, read from YAML/JSON:

    labels: {"0": [terrible], "1": [great]}      # shared by every pattern (or per pattern)
    pvps:
      - name: it-was
        pattern: "{text_a} It was [MASK] ."
      - pattern: "Just [MASK] ! {text_a}"
        labels: {"0": [bad], "1": [good]}

The recipe (`run_pet`), as in PET's reference implementation:

1. One model per PVP (LoRA + verbalizer head on a copy of the captured graph) is trained on the few
   labeled examples with cross-entropy over the label scores, optionally mixed with an auxiliary
   MLM loss on patterned unlabeled text (`alpha * CE + (1 - alpha) * MLM`).
2. The models label the unlabeled set: their logits are averaged, weighted by each model's accuracy
   on the training set *before* training (PET's `wmean`; `mean` weighs them equally).
3. A plain sequence classifier (LoRA + classification head, no pattern) is distilled on those soft
   labels with PET's loss, `KL(softmax(t / T) || softmax(s / T)) * T^2` per example, T = 2.

iPET (Schick & Schuetze, 2021) repeats step 1 for several generations; each model of the next
generation also trains on unlabeled examples labeled by a random subset of the other models, the
set growing by `scale_factor` per generation, balanced like the labeled set and drawn with
probability proportional to the labeling confidence.

Inputs are rendered as text ("the movie ... It was [MASK] ."), so training goes through
`rewrite.training.train` and serving through the exported model unchanged. Truncation shortens only the
text slots (PET's rule: one token at a time from the longer slot), never the pattern or the mask.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rewrite.training import data
from rewrite.training.batches import eval_mode, graph_inputs, input_names, predict_batches, to_device
from rewrite.graph.capture import load_pretrained
from rewrite.text.examples import Example
from rewrite.training.data import CLASSIFICATION, IGNORE_INDEX, Fields
from rewrite.errors import RewriteError
from rewrite.graph.ir import RewriteGraph, deep_copy, info
from rewrite.text.labels import PVP, Aggregation, check_label_words
from rewrite.graph.nodes import drop_outputs
from rewrite.graph.options import check_choices
from rewrite.graph.pipeline import apply
from rewrite.training.train import TrainConfig, train

log = logging.getLogger(__name__)

Reduction = Literal["wmean", "mean"]  # ensemble weights: accuracy before training, or equal
REDUCTIONS: tuple[str, ...] = Reduction.__args__
Export = Literal["auto", "distilled", "best-pvp"]  # which model `rewrite pet` exports
EXPORTS: tuple[str, ...] = Export.__args__


# ---------------------------------------------------------------- patterns


def patterned(pvp: PVP, examples: Sequence[Example], tokenizer, max_length: int) -> list[Example]:
    """`examples` rendered through the pattern (text only; the label and `where` are kept)."""
    return [Example(pvp.render(e, tokenizer, max_length), None, e.label, e.where) for e in examples]


# ---------------------------------------------------------------- configuration and results


def _default_pattern_training() -> TrainConfig:
    return TrainConfig(task=CLASSIFICATION, epochs=20, lr=1e-3, batch_size=8, progress=False)


def _default_final_training() -> TrainConfig:
    """A fixed step budget, as PET's reference does (`sc_max_steps`): counted in epochs, a small unlabeled
    set gets too few optimizer steps (TREC-6, 500 texts: 48 steps scored 0.31, 300 steps 0.81)."""
    return TrainConfig(task=CLASSIFICATION, max_steps=300, lr=1e-3, batch_size=32, progress=False)


@dataclass
class PetConfig:
    """PET's knobs. `pattern_training` trains each PVP model, `final_training` the distilled classifier
    (their `max_length` also bounds the patterned inputs); `lora` are the LoRA pass's options."""

    pattern_training: TrainConfig = field(default_factory=_default_pattern_training)
    final_training: TrainConfig = field(default_factory=_default_final_training)
    lora: dict[str, Any] = field(default_factory=lambda: {"rank": 8, "alpha": 16.0, "roles": ["q", "v"]})
    aggregation: Aggregation = "mean"
    mlm_alpha: float | None = None
    temperature: float = 2.0
    reduction: Reduction = "wmean"
    generations: int = 1
    scale_factor: float = 5.0
    models_fraction: float = 0.25
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        check_choices(self)
        if self.mlm_alpha is not None and not 0.0 < self.mlm_alpha <= 1.0:
            raise RewriteError(f"mlm_alpha {self.mlm_alpha!r} is not allowed; use a number in (0, 1]")
        if not self.temperature > 0:
            raise RewriteError(f"temperature {self.temperature!r} is not allowed; use a number greater than 0")
        if not isinstance(self.generations, int) or self.generations < 1:
            raise RewriteError(f"generations {self.generations!r} is not allowed; use a whole number of at least 1")
        if not self.scale_factor > 1 or not 0 < self.models_fraction <= 1:
            raise RewriteError("iPET needs scale_factor > 1 and models_fraction in (0, 1]")


@dataclass
class PatternModel:
    """One trained PVP model: its graph, its weight in the ensemble (training-set accuracy before
    training) and, when an evaluation set was given, its logits and accuracy there."""

    pvp: PVP
    graph: RewriteGraph
    weight: float
    eval_logits: torch.Tensor | None = None
    eval_accuracy: float | None = None


@dataclass
class PetResult:
    """Per generation, the PVP models; the ensemble's and the distilled classifier's evaluation accuracy."""

    generations: list[list[PatternModel]]
    ensemble_accuracy: float | None
    final: RewriteGraph | None
    final_accuracy: float | None
    final_steps: int | None = None  # the distilled classifier's optimizer steps

    def summary(self) -> dict[str, Any]:
        return {
            "generations": [[{"pvp": m.pvp.name, "train_accuracy_before_training": m.weight,
                              "eval_accuracy": m.eval_accuracy} for m in models] for models in self.generations],
            "ensemble_accuracy": self.ensemble_accuracy,
            "final_accuracy": self.final_accuracy,
            "final_steps": self.final_steps,
        }


# ---------------------------------------------------------------- graphs, predictions, ensembles


def capture_masked_lm(model_dir: str | Path) -> RewriteGraph:
    """The base every PVP model copies: the checkpoint captured once as a masked LM."""
    return load_pretrained(model_dir, task="masked-lm")


def pattern_graph(base: RewriteGraph, pvp: PVP, config: PetConfig, *, lora: bool,
                  mlm_logits: bool = False) -> RewriteGraph:
    """A copy of `base` with LoRA (when training) and the PVP's verbalizer head."""
    gm = deep_copy(base)
    if lora:
        apply(gm, "lora", **config.lora)
    apply(gm, "verbalizer", labels=pvp.labels, aggregation=config.aggregation, mlm_logits=mlm_logits, pattern=pvp.pattern)
    return gm


def predict_logits(gm: RewriteGraph, examples: Sequence[Example], batch_size: int) -> torch.Tensor:
    """Eval-mode class logits `[examples, labels]` (text, or text pairs), batch by batch."""
    tokenizer = info(gm).tokenizer

    def tokenized(chunk: Sequence[Example]) -> dict[str, torch.Tensor]:
        pairs = [e.pair for e in chunk] if chunk[0].pair is not None else None
        return dict(tokenizer([e.text for e in chunk], pairs, padding=True, return_tensors="pt"))

    chunks = (tokenized(examples[start:start + batch_size]) for start in range(0, len(examples), batch_size))
    with eval_mode(gm):
        logits = predict_batches(gm, chunks, input_names(gm), next(gm.parameters()).device,
                                 lambda batch, outputs: outputs.logits.float().cpu())
    return torch.cat(logits)


def accuracy(logits: torch.Tensor, examples: Sequence[Example]) -> float:
    labels = torch.tensor([e.label for e in examples])
    return float((logits.argmax(-1) == labels).float().mean())


def merge_logits(logits: Sequence[torch.Tensor], weights: Sequence[float], reduction: str = "wmean") -> torch.Tensor:
    """PET's ensemble: the models' logits averaged, weighted by `weights` (`wmean`) or equally (`mean`)."""
    stacked = torch.stack(list(logits))
    w = torch.tensor(list(weights), dtype=stacked.dtype) if reduction == "wmean" else torch.ones(len(logits))
    if not w.sum() > 0:
        log.warning("every model scored 0 on the training set before training; weighting them equally")
        w = torch.ones(len(logits))
    return torch.einsum("m,m...->...", w / w.sum(), stacked)


def distillation_loss(outputs, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """PET's: `KL(q || softmax(s / T)) * T^2` summed over classes, averaged over examples, where the
    batch's soft labels are `q = softmax(teacher logits / T)`."""
    log_p = F.log_softmax(outputs.logits.float() / temperature, dim=-1)
    q = batch["labels"]
    return F.kl_div(log_p, q, reduction="sum") * temperature**2 / q.shape[0]


class AuxiliaryMlmLoss:
    """PET's `alpha * CE(label scores) + (1 - alpha) * MLM`: every labeled batch is paired with the next
    batch of patterned unlabeled text, 15% of whose tokens (never the pattern's mask) are MLM targets."""

    def __init__(self, gm: RewriteGraph, texts: Sequence[str], alpha: float, batch_size: int, seed: int):
        self.gm, self.texts, self.alpha, self.batch_size = gm, list(texts), alpha, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.texts), generator=self.generator).tolist()
        chosen, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        tokenizer = info(self.gm).tokenizer
        encoded = tokenizer([self.texts[i] for i in chosen], padding=True, return_tensors="pt",
                            return_special_tokens_mask=True)
        ids = encoded["input_ids"]
        keep = (encoded["special_tokens_mask"].bool() | (encoded["attention_mask"] == 0)
                | (ids == tokenizer.mask_token_id))
        encoded["input_ids"], labels = data.mask_tokens(ids, keep, tokenizer, self.generator)
        batch = {**graph_inputs(encoded, input_names(self.gm)), "labels": labels}
        return to_device(batch, next(self.gm.parameters()).device)

    def __call__(self, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ce = F.cross_entropy(outputs.logits.float(), batch["labels"])
        unlabeled = self._next_batch()
        targets = unlabeled.pop("labels")
        mlm_logits = self.gm(**unlabeled).mlm_logits
        chosen = targets != IGNORE_INDEX
        mlm = F.cross_entropy(mlm_logits[chosen].float(), targets[chosen]) if chosen.any() else ce * 0
        return self.alpha * ce + (1 - self.alpha) * mlm


# ---------------------------------------------------------------- the recipe


def zero_shot_logits(base: RewriteGraph, pvps: Sequence[PVP], examples: Sequence[Example],
                     config: PetConfig) -> dict[str, torch.Tensor]:
    """Per PVP, its untrained class logits `[examples, labels]` on `examples` written through its pattern."""
    tokenizer = info(base).tokenizer
    max_length = config.pattern_training.max_length
    return {pvp.name: predict_logits(pattern_graph(base, pvp, config, lora=False),
                                     patterned(pvp, examples, tokenizer, max_length), config.eval_batch_size)
            for pvp in pvps}


def zero_shot(base: RewriteGraph, pvps: Sequence[PVP], eval_set: Sequence[Example],
              config: PetConfig) -> dict[str, Any]:
    """Each PVP's accuracy with no training, and the equal-weight ensemble's."""
    all_logits = zero_shot_logits(base, pvps, eval_set, config)
    per_pattern = {name: accuracy(logits, eval_set) for name, logits in all_logits.items()}
    for name, score in per_pattern.items():
        log.debug("zero-shot %s: accuracy %.4f", name, score)
    ensemble = accuracy(merge_logits(list(all_logits.values()), [1.0] * len(pvps), "mean"), eval_set)
    log.debug("zero-shot ensemble of %d PVPs: accuracy %.4f", len(pvps), ensemble)
    return {"patterns": per_pattern, "ensemble": ensemble}


def train_pattern_model(base: RewriteGraph, pvp: PVP, labeled: Sequence[Example], config: PetConfig, *,
                        extra: Sequence[Example] = (), unlabeled: Sequence[Example] = (),
                        seed: int = 0) -> PatternModel:
    """A PVP model trained on `labeled` (+ iPET's `extra`); its ensemble weight is its accuracy on
    `labeled` before training. With `mlm_alpha`, PET's auxiliary MLM loss runs on `unlabeled`."""
    tokenizer = info(base).tokenizer
    training = dataclasses.replace(config.pattern_training, seed=seed, label_names=pvp.label_names)
    auxiliary = config.mlm_alpha is not None and config.mlm_alpha < 1 and len(unlabeled) > 0
    torch.manual_seed(seed)
    gm = pattern_graph(base, pvp, config, lora=True, mlm_logits=auxiliary)
    train_set = patterned(pvp, labeled, tokenizer, training.max_length)
    weight = accuracy(predict_logits(gm, train_set, config.eval_batch_size), labeled)
    loss_fn = None
    if auxiliary:
        texts = [e.text for e in patterned(pvp, unlabeled, tokenizer, training.max_length)]
        loss_fn = AuxiliaryMlmLoss(gm, texts, config.mlm_alpha, training.batch_size, seed)
    train(gm, [*train_set, *patterned(pvp, extra, tokenizer, training.max_length)], config=training, loss_fn=loss_fn)
    if auxiliary:
        drop_outputs(gm, "mlm_logits")  # the deployed graph pays for the label rows alone
    return PatternModel(pvp, gm, weight)


def _ipet_sets(models: list[PatternModel], unlabeled_logits: list[torch.Tensor], labeled: Sequence[Example],
               unlabeled: Sequence[Example], generation: int, config: PetConfig, rng: random.Random,
               rng_np: np.random.RandomState) -> list[list[Example]]:
    """For each model, unlabeled examples labeled by a random subset of the *other* models (PET's
    `generate_ipet_train_sets`): `len(labeled) * (scale^(g+1) - 1)` of them, split by label like the
    labeled set, drawn without replacement with probability proportional to the merged confidence."""
    count = int(len(labeled) * config.scale_factor ** (generation + 1) - len(labeled))
    per_label = np.bincount([e.label for e in labeled], minlength=unlabeled_logits[0].shape[1])
    wanted = [int(n * count / len(labeled)) for n in per_label]
    sets = []
    for index in range(len(models)):
        others = [i for i in range(len(models)) if i != index]
        chosen = rng.sample(others, k=max(1, round(len(others) * config.models_fraction)))
        merged = merge_logits([unlabeled_logits[i] for i in chosen], [models[i].weight for i in chosen],
                              config.reduction)
        probs = torch.softmax(merged, dim=-1).numpy()
        predicted = probs.argmax(-1)
        new = []
        for label, number in enumerate(wanted):
            candidates = [i for i in range(len(unlabeled)) if predicted[i] == label]
            if not candidates or number == 0:
                continue
            while len(candidates) < number:  # upsample, as PET does
                candidates += candidates[:number - len(candidates)]
            p = probs[candidates].max(-1)
            picked = rng_np.choice(len(candidates), size=number, replace=False, p=p / p.sum())
            new += [dataclasses.replace(unlabeled[candidates[i]], label=label) for i in picked]
        sets.append(new)
    return sets


def train_ensemble(base: RewriteGraph, pvps: Sequence[PVP], labeled: Sequence[Example], unlabeled: Sequence[Example],
                   config: PetConfig,
                   eval_set: Sequence[Example] | None = None) -> tuple[list[list[PatternModel]], torch.Tensor]:
    """PET (one generation) or iPET: returns every generation's models and the last generation's
    merged logits over `unlabeled`."""
    tokenizer = info(base).tokenizer
    max_length = config.pattern_training.max_length
    seed = config.pattern_training.seed
    rng, rng_np = random.Random(seed), np.random.RandomState(seed)
    extras: list[list[Example]] = [[] for _ in pvps]
    generations = []
    for generation in range(config.generations):
        models, unlabeled_logits = [], []
        for index, pvp in enumerate(pvps):
            model = train_pattern_model(base, pvp, labeled, config, extra=extras[index], unlabeled=unlabeled,
                                        seed=seed + 1000 * generation + index)
            if eval_set is not None:
                model.eval_logits = predict_logits(model.graph, patterned(pvp, eval_set, tokenizer, max_length),
                                                   config.eval_batch_size)
                model.eval_accuracy = accuracy(model.eval_logits, eval_set)
            log.debug("generation %d, PVP %s: accuracy on the training set before training %.4f, eval accuracy %s",
                      generation, pvp.name, model.weight,
                      "-" if model.eval_accuracy is None else f"{model.eval_accuracy:.4f}")
            models.append(model)
            unlabeled_logits.append(predict_logits(model.graph, patterned(pvp, unlabeled, tokenizer, max_length),
                                                   config.eval_batch_size))
        generations.append(models)
        if generation + 1 < config.generations:
            extras = _ipet_sets(models, unlabeled_logits, labeled, unlabeled, generation, config, rng, rng_np)
    merged = merge_logits(unlabeled_logits, [m.weight for m in generations[-1]], config.reduction)
    return generations, merged


def ensemble_accuracy(models: Sequence[PatternModel], eval_set: Sequence[Example], config: PetConfig) -> float:
    """Accuracy of the models' merged evaluation logits (the same weights as for the soft labels)."""
    merged = merge_logits([m.eval_logits for m in models], [m.weight for m in models], config.reduction)
    return accuracy(merged, eval_set)


def distill(model_dir: str | Path, unlabeled: Sequence[Example], teacher_logits: torch.Tensor,
            label_names: list[str], config: PetConfig) -> tuple[RewriteGraph, int]:
    """PET's final model: a plain sequence classifier (LoRA + head, no pattern) trained on the unlabeled
    texts with the ensemble's soft labels `softmax(logits / T)` and PET's distillation loss; with the
    optimizer steps it took."""
    torch.manual_seed(config.final_training.seed)  # the new classification head is initialized while loading
    gm = load_pretrained(model_dir, task="seq-cls", num_labels=len(label_names))
    gm.info.config.id2label = dict(enumerate(label_names))
    gm.info.config.label2id = {name: i for i, name in enumerate(label_names)}
    apply(gm, "lora", **config.lora)
    targets = torch.softmax(teacher_logits / config.temperature, dim=-1).tolist()
    soft = [dataclasses.replace(e, label=tuple(t)) for e, t in zip(unlabeled, targets)]
    training = dataclasses.replace(config.final_training, label_names=label_names)
    loss_fn: Callable = lambda outputs, batch: distillation_loss(outputs, batch, config.temperature)  # noqa: E731
    return gm, train(gm, soft, config=training, loss_fn=loss_fn).steps


def run_pet(model_dir: str | Path, pvps: Sequence[PVP], labeled: Sequence[Example], unlabeled: Sequence[Example],
            config: PetConfig, eval_set: Sequence[Example] | None = None) -> PetResult:
    """The whole recipe: PVP models (iPET when `config.generations > 1`), soft labels, distillation."""
    if not unlabeled:
        raise RewriteError("PET needs unlabeled examples to distill the final classifier from")
    base = capture_masked_lm(model_dir)
    check_label_words(pvps, info(base).tokenizer)
    generations, merged = train_ensemble(base, pvps, labeled, unlabeled, config, eval_set)
    ensemble = ensemble_accuracy(generations[-1], eval_set, config) if eval_set is not None else None
    if ensemble is not None:
        log.debug("ensemble of %d PVP models: eval accuracy %.4f", len(pvps), ensemble)
    final, steps = distill(model_dir, unlabeled, merged, pvps[0].label_names, config)
    final_accuracy = accuracy(predict_logits(final, eval_set, config.eval_batch_size), eval_set) if eval_set else None
    if final_accuracy is not None:
        log.debug("distilled classifier: eval accuracy %.4f", final_accuracy)
    return PetResult(generations, ensemble, final, final_accuracy, steps)


def exported_model(result: PetResult, choice: Export) -> tuple[RewriteGraph, str]:
    """The model to deploy, and why: PET's distilled classifier, or the PVP model that scored best on the
    evaluation set (`best-pvp`; `auto` takes it only when it beats the distilled classifier there)."""
    if choice == "distilled" or (choice == "auto" and result.final_accuracy is None):
        return result.final, "the distilled classifier"
    if result.final_accuracy is None:
        raise RewriteError("exporting the best PVP model picks it by accuracy on an evaluation set; give one (--eval)")
    best = max(result.generations[-1], key=lambda m: m.eval_accuracy)
    scores = (f"on the evaluation set: distilled classifier {result.final_accuracy:.4f}, "
              f"best PVP model {best.pvp.name} {best.eval_accuracy:.4f}")
    if choice == "auto" and result.final_accuracy >= best.eval_accuracy:
        return result.final, f"the distilled classifier ({scores})"
    return best.graph, f"PVP model {best.pvp.name}, which serves raw text through its pattern ({scores})"


def read_data(path: str | Path, pvps: Sequence[PVP], fields: Fields, *, labeled: bool,
              limit: int | None = None) -> list[Example]:
    """Rows of a `.tsv`/`.csv`/`.jsonl` file; labels must be the PVPs' labels (names, or ids 0..n-1)."""
    if labeled:
        examples = data.read_examples(path, task=CLASSIFICATION, fields=fields, label_names=pvps[0].label_names)
    else:
        examples = data.read_examples(path, task="masked-lm", fields=fields)  # text only
    return examples[:limit] if limit else examples
