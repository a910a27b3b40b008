"""Adapter arithmetic on PEFT LoRA adapter directories: PEFT's `add_weighted_adapter`, without a model.

`merge_adapters` reads two or more LoRA adapters (ours or PEFT's), combines them module by module as
`LoraModel.add_weighted_adapter` (peft 0.21) does on a model holding them, and writes what PEFT's
`save_pretrained` writes for the result: the same tensors and adapters[0]'s config with
`r = lora_alpha =` the new rank (scale 1), the union of the targets and no rank or alpha patterns.
- factor methods (linear, ties, dare_linear, dare_ties, magnitude_prune) combine the A's and the B's
  separately, weighting A by sign(w s)·sqrt(|w s|) and B by sqrt(|w s|) (s: the adapter's scale): the cross
  terms make this an approximation, as PEFT says; every adapter needs the same rank.
- cat stacks the branches (exact; the rank is the sum of the ranks).
- svd and the `*_svd` methods combine each module's delta s·BA and keep its top `svd_rank` singular
  directions (exact when the rank allows).
DARE draws its masks from torch's generator in PEFT's order, after replaying what PEFT's injection of the
new adapter draws first, so the same seed gives PEFT's masks. PEFT's order is the model's module order;
the files do not hold it, so modules are taken by path (layer numbers numerically, names alphabetically),
which is the model's order whenever the targeted names sort as they are defined (q_proj, v_proj; query,
value; c_attn, c_proj): it only decides which random mask each module gets.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch

from rewrite.adapters.low_rank import A_SUFFIXES, B_SUFFIXES
from rewrite.adapters.peft_files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_files
from rewrite.adapters.targets import check_regex, pattern_value
from rewrite.atomic import atomic_dir_files, check_output_dir
from rewrite.errors import RewriteError

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = (*FACTOR_METHODS, "cat", "svd", *(f"{m}_svd" for m in FACTOR_METHODS[1:]))
PRUNED = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random", "dare_ties": "random"}
SIGN_METHODS = ("total", "frequency")
_TIES = ("ties", "dare_ties")
_FACTOR_KEYS = {suffix: (factor, lookup) for factor, suffixes in (("a", A_SUFFIXES), ("b", B_SUFFIXES))
                for suffix, lookup in zip(suffixes, (False, True))}
_UNMERGEABLE = {  # config key -> why an adapter that sets it cannot be merged from its files
    "use_dora": "DoRA's magnitudes need the base model's weights",
    "lora_bias": "PEFT does not merge LoRA biases",
    "modules_to_save": "PEFT gives the merged adapter the base model's copy of those modules, which adapter files "
                       "do not hold",
    "target_parameters": "PEFT's add_weighted_adapter refuses parameter targets",
    "trainable_token_indices": "PEFT's add_weighted_adapter does not merge trainable tokens",
}
_BASE_LAYER = ".base_layer.weight"  # PEFT's save_embedding_layers: the targeted embedding's own weight
_SELECTION = ("layers_to_transform", "layers_pattern", "exclude_modules")  # copied from adapters[0] by PEFT


@dataclass
class Branch:
    """One module's LoRA branch in one adapter: A `[r, in]`, B `[out, r]`, and its scale."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool
    fan_in_fan_out: bool  # the adapter's config says so

    def delta(self, transposed: bool) -> torch.Tensor:
        """PEFT's get_delta_weight: s·BA, `[in, out]` if `transposed` (half types computed in float32, as on CPU)."""
        delta = self.b.float() @ self.a.float()
        return ((delta.T if transposed else delta) * self.scale).to(self.a.dtype)


@dataclass
class Source:
    """One adapter directory as a merge reads it."""

    directory: str
    config: dict[str, Any]
    branches: dict[str, Branch]  # by module path
    base_layers: dict[str, torch.Tensor]  # base weights PEFT saves beside an embedding branch, by key

    @property
    def rank(self) -> int:
        """PEFT's rank of the adapter: `r`, or the largest rank its rank_pattern gives."""
        return max([self.config["r"], *(self.config.get("rank_pattern") or {}).values()])


def _module_order(path: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.split(".")]


def _split_key(directory: str, key: str) -> tuple[str, str, bool]:
    for suffix, (factor, embedding) in _FACTOR_KEYS.items():
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], factor, embedding
    raise RewriteError(f"adapter {directory!r} holds {key}, which is not a LoRA factor; merging takes adapters of "
                       "LoRA A and B tensors only")


def _check_plain_lora(directory: str, config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise RewriteError(f"adapter {directory!r} is a {config.get('peft_type')} adapter; merging takes LoRA adapters")
    for key, why in _UNMERGEABLE.items():
        if config.get(key):
            raise RewriteError(f"adapter {directory!r} sets {key} ({config[key]!r}), which a merge cannot take: {why}")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise RewriteError(f"adapter {directory!r} has init_lora_weights {init!r}, which changes the base weights; "
                           "convert it to a plain LoRA adapter first (PEFT's path_initial_model_for_weight_conversion)")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise RewriteError(f"{str(Path(directory) / CONFIG_NAME)!r} lacks {missing[0]}, which a LoRA adapter config needs")
    ranks = [config["r"], *_pattern(directory, config, "rank_pattern").values()]
    alphas = [config["lora_alpha"], *_pattern(directory, config, "alpha_pattern").values()]
    if not all(type(r) is int and r > 0 for r in ranks) or not all(
            type(a) in (int, float) and math.isfinite(a) for a in alphas):
        raise RewriteError(f"adapter {directory!r} gives ranks {ranks} and alphas {alphas}; a LoRA config needs "
                           "positive whole ranks and finite alphas")
    if not isinstance(config["target_modules"], (str, list)):
        raise RewriteError(f"adapter {directory!r} gives target_modules {config['target_modules']!r}; PEFT writes a "
                           "regex or a list of module names")


def _pattern(directory: str, config: dict[str, Any], key: str) -> dict[str, Any]:
    """A rank or alpha pattern: a JSON object whose keys are regexes (PEFT's pattern lookup)."""
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        raise RewriteError(f"adapter {directory!r} gives {key} {pattern!r}; PEFT writes a JSON object of "
                           "module names or regexes")
    for name in pattern:
        check_regex(name, f"adapter {directory!r} {key}")
    return pattern


def _branch(directory: str, config: dict[str, Any], path: str, factors: dict[str, Any]) -> Branch:
    """The module's branch, after checking its tensors against each other and the config's rank."""
    if set(factors) != {"a", "b", "embedding"}:
        missing = (B_SUFFIXES if "a" in factors else A_SUFFIXES)[0].split(".")[1]  # lora_B, lora_A
        raise RewriteError(f"adapter {directory!r} has no {missing} for {path}; each LoRA module needs A and B")
    a, b = factors["a"], factors["b"]
    rank = pattern_value(path, _pattern(directory, config, "rank_pattern"), config["r"])
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise RewriteError(f"adapter {directory!r} holds A {tuple(a.shape)} and B {tuple(b.shape)} for {path}, "
                           f"which do not make a rank-{rank} branch as its config says")
    alpha = pattern_value(path, _pattern(directory, config, "alpha_pattern"), config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return Branch(a, b, scale, factors["embedding"], bool(config.get("fan_in_fan_out")))


def read_source(directory: str | Path) -> Source:
    """A LoRA adapter directory as branches by module path, refused unless a merge of files can take it."""
    directory = str(directory)
    config, weights = read_adapter_files(Path(directory))
    _check_plain_lora(directory, config)
    factors: dict[str, dict[str, Any]] = {}
    base_layers = {key: tensor for key, tensor in weights.items() if key.endswith(_BASE_LAYER)}
    for key, tensor in weights.items():
        if key not in base_layers:
            path, factor, embedding = _split_key(directory, key)
            factors.setdefault(path, {"embedding": embedding})[factor] = tensor
    if not factors:
        raise RewriteError(f"adapter {directory!r} holds no LoRA tensors; there is nothing to merge")
    branches = {path: _branch(directory, config, path, parts) for path, parts in factors.items()}
    return Source(directory, config, branches, base_layers)


def _prune(tensor: torch.Tensor, density: float, how: str, generator) -> torch.Tensor:
    """PEFT's `prune`: at density 1 nothing (and nothing drawn); else the largest magnitudes, or DARE's random
    mask rescaled by 1/density."""
    if density >= 1:
        return tensor
    if how == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    return tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator) / density


def combine(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
            majority_sign: str, generator=None) -> torch.Tensor:
    """PEFT's merge_utils on one list (the A's, the B's, or the deltas): prune each tensor, then the weighted sum
    or, for TIES, the majority sign (of the unweighted pruned tensors) and the mean over those that agree with it."""
    if method in PRUNED:
        tensors = [_prune(t, density, PRUNED[method], generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if method not in _TIES:
        return weighted.sum(dim=0)
    magnitude = stacked.sum(dim=0) if majority_sign == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


@dataclass
class MergeSpec:
    """What every module's merge needs: the checked options and the merged adapter's rank."""

    method: str
    rank: int
    density: float | None
    majority_sign: str
    svd_clamp: float | None
    generator: torch.Generator | None


def _factor_merge(spec: MergeSpec, parts: list[tuple[Branch, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = [w * branch.scale for branch, w in parts]
    weights_a = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in scaled])
    weights_b = torch.tensor([math.sqrt(abs(v)) for v in scaled])
    args = (spec.density, spec.majority_sign, spec.generator)
    a = combine(spec.method, [branch.a for branch, _ in parts], weights_a, *args)
    b = combine(spec.method, [branch.b for branch, _ in parts], weights_b, *args)
    dtype = parts[0][0].a.dtype
    return a.to(dtype), b.to(dtype)


def _cat_merge(spec: MergeSpec, parts: list[tuple[Branch, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The branches side by side, each A carrying its weight and scale, in the first rows of rank-`rank` zeros."""
    a = torch.cat([branch.a * w * branch.scale for branch, w in parts], dim=0)
    b = torch.cat([branch.b for branch, _ in parts], dim=1)
    new_a, new_b = a.new_zeros(spec.rank, a.shape[1]), b.new_zeros(b.shape[0], spec.rank)
    new_a[: a.shape[0]], new_b[:, : b.shape[1]] = a, b
    return new_a, new_b


def _svd_merge(spec: MergeSpec, parts: list[tuple[Branch, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined delta's top singular directions: B = U_r diag(S_r), A = Vh_r (clamped at a quantile). The
    deltas are pruned in PEFT's layout, `[in, out]` for an Embedding or a Conv1D (which PEFT marks fan_in_fan_out
    in the config of the adapter that first wraps it)."""
    method = "linear" if spec.method == "svd" else spec.method.removesuffix("_svd")
    transposed = any(branch.embedding or branch.fan_in_fan_out for branch, _ in parts)
    weights = torch.tensor([w for _, w in parts])
    delta = combine(method, [branch.delta(transposed) for branch, _ in parts], weights, spec.density,
                    spec.majority_sign, spec.generator)
    if transposed:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    b, a = u[:, : spec.rank] @ torch.diag(s[: spec.rank]), vh[: spec.rank, :]
    if spec.svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), spec.svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


def _replay_injection(branch: Branch, rank: int, init: Any, generator) -> None:
    """Draws from `generator` what PEFT's injection of the merged adapter draws before DARE's masks: for a
    Linear, nn.Linear's init of A `[r, in]` and B `[out, r]` then A's kaiming (or gaussian) init; for an
    Embedding, randn A and B then B's normal init."""
    out_features, in_features = branch.b.shape[0], branch.a.shape[1]
    if branch.embedding:
        torch.randn(rank, in_features, generator=generator)
        torch.randn(out_features, rank, generator=generator)
        if init is not False:
            torch.empty(out_features, rank).normal_(generator=generator)
        return
    torch.empty(rank, in_features).uniform_(generator=generator)
    torch.empty(out_features, rank).uniform_(generator=generator)
    if init is True:
        torch.empty(rank, in_features).uniform_(generator=generator)
    elif init == "gaussian":
        torch.empty(rank, in_features).normal_(generator=generator)


def _check_options(method: str, sources: Sequence, weights: Sequence[float], density: float | None,
                   majority_sign: str, svd_rank: int | None, svd_clamp: float | None) -> None:
    if method not in METHODS:
        raise RewriteError(f"merge method {method!r} is not known; use one of {', '.join(METHODS)}")
    if len(sources) < 2:
        raise RewriteError(f"a merge takes at least two adapters, not {len(sources)}")
    if len(weights) != len(sources):
        raise RewriteError(f"{len(weights)} weights for {len(sources)} adapters; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise RewriteError(f"merge weights {list(weights)} are not all finite numbers")
    pruned = method.removesuffix("_svd") in PRUNED
    if pruned and (density is None or not 0 < density <= 1):
        raise RewriteError(f"merge method {method} needs a density in (0, 1] (the share of values kept), "
                           f"not {density}")
    if majority_sign not in SIGN_METHODS:
        raise RewriteError(f"majority sign method {majority_sign!r} is not known; use total or frequency")
    if svd_rank is not None and svd_rank < 1:
        raise RewriteError(f"svd rank {svd_rank} is not a positive number")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise RewriteError(f"svd clamp {svd_clamp} is not a quantile in [0, 1]")


def _new_rank(method: str, sources: list[Source], svd_rank: int | None) -> int:
    """PEFT's rank of the merged adapter; factor methods need one rank in every module of every adapter."""
    ranks = [source.rank for source in sources]
    if method == "cat":
        return sum(ranks)
    if method.endswith("svd"):
        return svd_rank or max(ranks)
    for source in sources:
        for path, branch in source.branches.items():
            if branch.a.shape[0] != ranks[0]:
                raise RewriteError(f"adapter {source.directory!r} has rank {branch.a.shape[0]} at {path} and "
                                   f"{sources[0].directory!r} rank {ranks[0]}; {method} merges factor by factor, "
                                   "so every module needs the same rank (cat and svd take any ranks)")
    return ranks[0]


def _union_targets(sources: list[Source]) -> str | list[str]:
    """PEFT's union of target_modules: a set union of lists, or the regexes joined as `(a)|(b)`."""
    targets = [source.config["target_modules"] for source in sources]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, list) for t in targets):
        return sorted(set().union(*targets))
    raise RewriteError(f"adapters {sources[0].directory!r} and {sources[1].directory!r} give target_modules as a "
                       "regex in one and a list in the other, which PEFT does not merge; save them with the same kind")


def _check_same_model(sources: list[Source]) -> None:
    for source in sources[1:]:
        for key in _SELECTION:
            if source.config.get(key) != sources[0].config.get(key):
                raise RewriteError(f"adapters {sources[0].directory!r} and {source.directory!r} differ in {key}, "
                                   "which the merged adapter takes from the first; merge adapters that agree on it")
    base_layers: dict[str, torch.Tensor] = {}
    for source in sources:
        for key, tensor in source.base_layers.items():
            if not torch.equal(base_layers.setdefault(key, tensor), tensor):
                raise RewriteError(f"adapter {source.directory!r} holds another {key} than the adapter before it; "
                                   "the adapters were made for different base models")
    shapes: dict[str, tuple] = {}
    for source in sources:
        for path, branch in source.branches.items():
            shape = (branch.b.shape[0], branch.a.shape[1], branch.embedding, branch.a.dtype)
            first = shapes.setdefault(path, shape)
            if shape != first:
                raise RewriteError(f"adapter {source.directory!r} has {path} as (out, in, embedding, dtype) {shape[:3]}"
                                   f" {shape[3]}, another adapter {first[:3]} {first[3]}; the adapters were made for "
                                   "different base models")


def _merge_module(spec: MergeSpec, path: str, parts: list[tuple[Branch, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.method == "cat":
        return _cat_merge(spec, parts)
    if spec.method.endswith("svd"):
        smallest = min(parts[0][0].a.shape[1], parts[0][0].b.shape[0])
        if spec.rank > smallest:
            raise RewriteError(f"svd rank {spec.rank} is more than {path}, with {smallest} rows or columns, allows; "
                               f"give an svd rank of {smallest} or less")
        return _svd_merge(spec, parts)
    return _factor_merge(spec, parts)


def merged_tensors(method: str, sources: list[Source], weights: Sequence[float], *, density: float | None,
                   majority_sign: str, svd_rank: int | None, svd_clamp: float | None,
                   seed: int | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The merged adapter's config and tensors (PEFT keys), from options `_check_options` passed. DARE draws
    from torch's global generator as PEFT does, or from a generator seeded with `seed` (the same stream as
    `torch.manual_seed(seed)`)."""
    _check_same_model(sources)
    rank = _new_rank(method, sources, svd_rank)
    config = {**sources[0].config, "r": rank, "lora_alpha": rank, "target_modules": _union_targets(sources),
              "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    spec = MergeSpec(method, rank, density, majority_sign, svd_clamp, generator)
    paths = sorted({path for source in sources for path in source.branches}, key=_module_order)
    modules = {path: [(s.branches[path], w) for s, w in zip(sources, weights) if path in s.branches] for path in paths}
    if method.startswith("dare"):
        for parts in modules.values():
            _replay_injection(parts[0][0], rank, config.get("init_lora_weights", True), generator)
    tensors = {key: tensor for source in sources for key, tensor in source.base_layers.items()}
    for path, parts in modules.items():
        a, b = _merge_module(spec, path, parts)
        kind = 1 if parts[0][0].embedding else 0
        tensors[f"{PREFIX}{path}{A_SUFFIXES[kind]}"] = a.contiguous()
        tensors[f"{PREFIX}{path}{B_SUFFIXES[kind]}"] = b.contiguous()
    return config, tensors


def merge_adapters(directories: Sequence[str | Path], weights: Sequence[float], output: str | Path, *,
                   method: str = "svd", density: float | None = None, majority_sign: str = "total",
                   svd_rank: int | None = None, svd_clamp: float | None = None, seed: int | None = None,
                   overwrite: bool = False) -> Path:
    """Writes to `output` the LoRA adapter PEFT's `add_weighted_adapter(adapters, weights, combination_type=method,
    ...)` makes from the adapter `directories`, in PEFT's format (`PeftModel.from_pretrained` and
    `rewrite.load_adapter` load it); nothing is written if any input is refused."""
    output = check_output_dir(output, overwrite=overwrite)
    _check_options(method, directories, weights, density, majority_sign, svd_rank, svd_clamp)
    sources = [read_source(directory) for directory in directories]
    config, tensors = merged_tensors(method, sources, weights, density=density, majority_sign=majority_sign,
                                     svd_rank=svd_rank, svd_clamp=svd_clamp, seed=seed)
    with atomic_dir_files(output) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        safetensors.torch.save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return output
