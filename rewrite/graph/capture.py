"""Capture: any `nn.Module` or a local Hugging Face directory -> RewriteGraph, through `torch.export`."""
from __future__ import annotations

import glob
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import fx, nn

from rewrite.errors import RewriteError
from rewrite.graph.synthetic_inputs import DEFAULT_INPUT_NAMES, example_inputs
from rewrite.graph import quantized
from rewrite.graph.ir import RewriteGraph, wrap
from rewrite.graph.materialize import Checkpoint, Loader, empty_model, on_cpu, own_mappings
from rewrite.graph.modes import in_mode
from rewrite.graph.params import non_finite
from rewrite.graph.pipeline import Pass, Pipeline
from rewrite.graph.query import GraphQuery
from rewrite.quiet import quiet

log = logging.getLogger(__name__)

CAPTURE_TASKS = ("auto", "causal-lm", "masked-lm", "seq-cls", "feature-extraction")
_ARCH_SUFFIX_TO_TASK = {
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
    "ForMaskedLM": "masked-lm",
    "ForSequenceClassification": "seq-cls",
}

_TOKENIZER_FILES = ("tokenizer*.json", "vocab.*", "merges.txt", "*.model")


def _dynamic_shapes(inputs: dict[str, Any]) -> dict[str, Any]:
    """Batch and sequence dims of every tensor input are dynamic; export infers their ranges."""
    auto = torch.export.Dim.AUTO
    shapes: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            small = [d for d in range(min(value.dim(), 2)) if value.shape[d] < 2]
            if small:
                raise RewriteError(
                    f"example input {name!r} has shape {tuple(value.shape)}: batch and sequence sizes "
                    "must be at least 2 for them to stay dynamic in the captured graph"
                )
            shapes[name] = {d: auto for d in range(min(value.dim(), 2))}
        else:
            shapes[name] = None
    return shapes


def _no_cache(model: nn.Module) -> None:
    """No KV cache in the captured graph; T5's encoder and decoder stacks hold configs of their own."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False


def drop_guards(gm: fx.GraphModule) -> None:
    """The unlifted module's `_guards_fn` call only re-checks input shapes; it cannot be serialized."""
    for node in gm.graph.find_nodes(op="call_module", target="_guards_fn"):
        gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


@quiet
def capture(
    model: nn.Module,
    example_inputs: dict[str, Any],
    *,
    dynamic: bool = True,
    info: dict[str, Any] | None = None,
) -> RewriteGraph:
    """Captures `model(**example_inputs)` as an unlifted GraphModule (non-strict `torch.export`).

    The result keeps the model's mode (`eval()` unless the model was training) and switches with
    `gm.train()` / `gm.eval()` like the module did.
    """
    return _capture(model, example_inputs, dynamic, info, checked=set())


def _capture(model: nn.Module, example_inputs: dict[str, Any], dynamic: bool, info: dict[str, Any] | None,
             checked: set[str]) -> RewriteGraph:
    """`capture`, the parameters named in `checked` already known finite."""
    config = getattr(model, "config", None)
    _refuse_non_finite(model, (info or {}).get("source"), checked)
    _no_cache(model)
    dynamic_shapes = _dynamic_shapes(example_inputs) if dynamic else None
    with in_mode(model, True) as was_training:  # so dropout probabilities are recorded (rewrite.modes)
        exported = torch.export.export(model, (), dict(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
    unlifted = exported.module()
    drop_guards(unlifted)
    base_info = {"history": [], "input_names": list(example_inputs), "task": _task_of_class(type(model).__name__),
                 "config": config, "model_class": type(model).__name__}
    base_info.update(info or {})
    _drop_full_slices(unlifted.graph)
    return wrap(unlifted, unlifted.graph, base_info, was_training)


def _refuse_non_finite(model: nn.Module, source: str | None, checked: set[str]) -> None:
    """A graph captured from NaN or infinite weights computes NaN wherever they reach: refused, named."""
    bad = non_finite((name, p) for name, p in model.named_parameters() if name not in checked)
    if bad:
        raise _non_finite_error(model, source, bad)


def _non_finite_error(model: nn.Module, source: str | None, name: str) -> RewriteError:
    origin = f"in {source!r}" if source else f"of {type(model).__name__}"
    return RewriteError(f"weight {name} {origin} holds NaN or infinite values; the checkpoint is corrupt, "
                        "and a graph of it would compute NaN")


def _drop_full_slices(graph: fx.Graph) -> None:
    """`x[:, ...]`-style slices that keep a whole axis (start 0, end past it, step 1) are `x` itself: HF's
    pooler and mask code leave a few per graph, and they hide the reads behind them."""
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.slice.Tensor)):
        source, _, start, end, step = [*node.args, *(None, 0, None, None, 1)[len(node.args):]]
        if start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and end >= sys.maxsize)):
            node.replace_all_uses_with(source)
            graph.erase_node(node)


def _task_of_class(class_name: str) -> str:
    """`BertForSequenceClassification` -> seq-cls; models without a known head are feature extractors."""
    for suffix, name in _ARCH_SUFFIX_TO_TASK.items():
        if class_name.endswith(suffix):
            return name
    return "feature-extraction"


def _task_for(config, task: str) -> str:
    if task not in CAPTURE_TASKS:
        raise RewriteError(f"task {task!r} is not known; use one of {', '.join(CAPTURE_TASKS)}")
    if task != "auto":
        return task
    architectures = getattr(config, "architectures", None) or [""]
    return _task_of_class(architectures[0])


def _auto_class(task: str):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }[task]


def _refuse_custom_code(path: Path) -> None:
    """A config with `auto_map` names Python files in the directory: we never import them."""
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        try:
            data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RewriteError(f"{str(file)!r} is not readable JSON ({error})") from error
        if isinstance(data, dict) and data.get("auto_map"):
            raise RewriteError(
                f"model directory {str(path)!r} needs custom code ({name} has auto_map), which rewrite does not run; "
                "use a model whose architecture transformers ships, or remove auto_map if it is one")


def _config_problem(path: Path) -> str:
    """Why transformers refused config.json, in our words (its own message lists every model type it knows)."""
    import transformers

    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(model_type, str):
        return "it names no model_type"
    if model_type not in transformers.CONFIG_MAPPING:
        return f"model type {model_type!r} is not one that transformers {transformers.__version__} ships"
    return f"its settings are not ones transformers accepts for a {model_type} model"


def _refuse_missing_head(config, task: str, path: Path) -> None:
    """transformers has no `task` class for every architecture (and its refusal lists every config class)."""
    def covers(candidate: str) -> bool:
        return type(config) in _auto_class(candidate)._model_mapping

    if not covers(task):
        fits = [candidate for candidate in CAPTURE_TASKS if candidate != "auto" and covers(candidate)]
        raise RewriteError(f"model directory {str(path)!r} holds a {config.model_type} model, which transformers has "
                           f"no {task} class for; capture it with --task {' or '.join(fits) or 'feature-extraction'}")


def _load_config(path: Path, num_labels: int | None):
    from transformers import AutoConfig

    if not path.is_dir():
        raise RewriteError(f"model directory {str(path)!r} does not exist; pass a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise RewriteError(
            f"model directory {str(path)!r} has no config.json; a Hugging Face model directory needs "
            "config.json, weights (*.safetensors) and tokenizer files"
        )
    _refuse_custom_code(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:  # transformers' own text is the cause, shown with -v
        raise RewriteError(f"config.json in {str(path)!r} could not be read: {_config_problem(path)}; use a model "
                           "directory that transformers' from_pretrained loads") from error
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise RewriteError(f"num_labels {num_labels!r} is not allowed; a classifier needs at least 2 classes")
        config.num_labels = num_labels
    return config


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any(next(path.glob(pattern), None) for pattern in _TOKENIZER_FILES):
        log.warning("no tokenizer files in %s; text commands will not work with this graph", path)
        return None  # AutoTokenizer would build an empty one from config.json alone
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        log.warning("no tokenizer in %s (%s); text commands will not work with this graph", path, error)
        return None


def _fresh_modules(loading: dict[str, Any]) -> list[str]:
    """Modules whose weights the checkpoint lacked (a new classifier head): random until trained."""
    return sorted({key.rpartition(".")[0] for key in loading.get("missing_keys", [])})


def input_names(model: nn.Module, tokenizer=None) -> list[str]:
    """The text inputs to capture with: the tokenizer's, else token ids, a mask, and token types where the
    model has a token-type embedding, always restricted to what the model's forward takes (DistilBERT
    takes no `token_type_ids`)."""
    if tokenizer is not None:
        wanted = list(tokenizer.model_input_names)
    else:
        types = getattr(model.config, "type_vocab_size", 0) or 0
        wanted = [*DEFAULT_INPUT_NAMES, *(["token_type_ids"] if types > 1 else [])]
    accepted = inspect.signature(model.forward).parameters
    return [name for name in wanted if name in accepted]


@quiet
def load_pretrained(
    path: str | Path,
    task: str = "auto",
    *,
    meta: bool = False,
    num_labels: int | None = None,
    quantize: str | dict[str, Any] | Pass | None = None,
) -> RewriteGraph:
    """Captures a local Hugging Face directory, fully offline.

    `gm.meta["rewrite"]` holds `config`, `tokenizer`, `task` and `source`. With `meta=True` the model
    is built from its config on the meta device (no weights read), for planning rewrites of big models.
    `quantize` (a dtype, `"int4"`, `"int8"` or `"nf4"`, or the quantize pass's options, `{"dtype": "nf4",
    "block_size": 128}`) quantizes while loading: the pass runs on the meta graph, then each tensor is read from the
    safetensors files alone, so the float model is never held; the graph equals loading then quantizing.
    """
    path = Path(path)
    config = _load_config(path, num_labels)
    if getattr(config, "is_encoder_decoder", False):
        raise RewriteError(f"capturing {config.model_type} from {str(path)!r} is not supported: it is an encoder-decoder "
                           "model and load_pretrained has no seq2seq task with decoder inputs; build the model and call "
                           "rewrite.capture(model, inputs) with decoder_input_ids")
    task = _task_for(config, task)
    tokenizer = _load_tokenizer(path)
    auto_class = _auto_class(task)
    _refuse_missing_head(config, task, path)
    config.use_cache = False
    built: dict[str, torch.Tensor] = {}
    if quantize is not None and meta:
        raise RewriteError("quantize reads the weights, which meta=True never does; load with one of them")
    if quantize is not None:
        model, built = empty_model(auto_class, config)
    elif meta:
        with torch.device("meta"):
            model = auto_class.from_config(config)
    else:
        try:
            model, loading = auto_class.from_pretrained(path, config=config, local_files_only=True,
                                                        trust_remote_code=False, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as error:
            raise RewriteError(f"weights in {str(path)!r} could not be loaded: {error}") from error
    model.eval()
    checked = set() if meta or quantize is not None else own_mappings(
        model, path, model.base_model_prefix, lambda name: _non_finite_error(model, str(path), name))
    on_meta = meta or quantize is not None
    inputs = example_inputs(input_names(model, tokenizer), config.vocab_size, device="meta" if on_meta else "cpu")
    info = {"source": str(path), "task": task, "config": config, "tokenizer": tokenizer, "meta_device": meta,
            "untrained": [] if on_meta else _fresh_modules(loading)}
    gm = _capture(model, inputs, True, info, checked)
    if quantize is not None:
        _quantize_while_loading(gm, path, quantize, built, model.base_model_prefix)
    return gm


def _quantize_while_loading(gm: RewriteGraph, path: Path, spec, built: dict[str, torch.Tensor], prefix: str) -> None:
    """Runs the quantizing pass `spec` on the meta graph `gm`, then reads its tensors from `path` one at a time."""
    checkpoint = Checkpoint(path)
    loader = Loader(gm, checkpoint, prefix, built, GraphQuery(gm).projections)
    pipeline = Pipeline([quantized.weight_quantizer(spec)])
    pipeline.run(gm)
    if not any(quantized.is_quantized(node) for node in gm.graph.nodes):
        raise RewriteError(f"pass {pipeline.passes[0].name!r} quantized no projection of {str(path)!r}; quantizing "
                           "while loading takes a pass that quantizes weights")
    loader.load()
    on_cpu(gm)


def config_shapes(config, task: str | None) -> dict[str, tuple[int, ...]]:
    """The shape the Hugging Face `config` gives each base tensor of a `task` model (built on the meta
    device, nothing allocated); empty without a config of a class transformers ships."""
    if config is None or task not in CAPTURE_TASKS[1:]:
        return {}
    try:
        with torch.device("meta"):
            model = _auto_class(task).from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError):  # a config no auto class builds
        return {}
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def saved_tensor_names(source: str | None) -> set[str] | None:
    """Tensor names saved in a model directory's safetensors files (None when they cannot be listed)."""
    if not source or not Path(source).is_dir():
        return None
    files = sorted(glob.glob(str(Path(source) / "*.safetensors")))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with safetensors.safe_open(file, framework="pt") as handle:
            keys.update(handle.keys())
    return keys
