"""Text in, predictions out, from an exported ONNX model in ONNX Runtime."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx

from rewrite import runtime
from rewrite.runtime.encoding import encode_texts
from rewrite.errors import RewriteError
from rewrite.export.onnx import LABELS_KEY, POSITIONS_KEY, PREPENDED_KEY, TASK_KEY, UNTRAINED_KEY
from rewrite.runtime.adapters import Adapters

log = logging.getLogger(__name__)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _model_props(path: Path) -> dict[str, str]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise RewriteError(f"{str(path)!r} is not an ONNX model ({type(error).__name__}); give the .onnx file "
                           "that `rewrite export` wrote") from error
    if not model.graph.input:
        raise RewriteError(f"{str(path)!r} is not an ONNX model with inputs; give the .onnx file that `rewrite export` wrote")
    return {p.key: p.value for p in model.metadata_props}


def _check_texts(texts: list[str]) -> None:
    """Command-line bytes that are not UTF-8 arrive as lone surrogates; say so rather than fail in the tokenizer."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RewriteError(f"text {text.encode('utf-8', 'replace').decode()!r} is not valid UTF-8; "
                               "pass UTF-8 text") from None


def _limit(props: dict[str, str], tokenizer) -> int | None:
    """The model's position limit: from its metadata, else the tokenizer's."""
    if props.get(POSITIONS_KEY):
        return int(props[POSITIONS_KEY]) - int(props.get(PREPENDED_KEY, 0) or 0)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1_000_000 else None


def _fit(encoded: dict[str, np.ndarray], texts: list[str], limit: int | None, truncate: bool) -> dict[str, np.ndarray]:
    """Cuts inputs to the model's positions (with a warning), or refuses them."""
    length = encoded["input_ids"].shape[1]
    if limit is None or length <= limit:
        return encoded
    longest = int(encoded["attention_mask"].sum(axis=1).argmax())
    if not truncate:
        raise RewriteError(f"text {texts[longest][:40]!r}... is {length} tokens but the model takes at most {limit}; "
                           "shorten it, or drop --no-truncate to cut it")
    log.warning("text %r... is %d tokens; cut to the model's %d positions", texts[longest][:40], length, limit)
    return {name: value[:, :limit] for name, value in encoded.items()}


def _tokenizer(path: Path, tokenizer_dir: str | None):
    from transformers import AutoTokenizer

    directory = Path(tokenizer_dir) if tokenizer_dir else path.parent
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise RewriteError(
            f"no tokenizer in {str(directory)!r} ({error}); pass --tokenizer with the model's directory"
        ) from error


def _top(scores: np.ndarray, names, k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores)[:k]
    return [(names(int(i)), float(scores[i])) for i in order]


def predict(model_path: str | Path, texts: list[str], *, tokenizer_dir: str | None = None, top_k: int = 5,
            truncate: bool = True, adapters: Adapters | None = None):
    """Per text, the top predictions as (label, probability): classes, masked tokens or next tokens.

    Texts longer than the model's positions are cut (with a warning), or refused with `truncate=False`.
    `adapters` fill a slotted model's adapter slots (see `rewrite.export.onnx_adapters`)."""
    path = Path(model_path)
    _check_texts(texts)
    props = _model_props(path)
    task = props.get(TASK_KEY, "")
    adapters = adapters or Adapters()
    untrained = set(filter(None, props.get(UNTRAINED_KEY, "").split(", ")))
    untrained -= adapters.carried_modules(path) if untrained else set()
    if untrained:
        log.warning("%s: the classification head %s was never trained (fresh random weights); its predictions "
                    "mean nothing until `rewrite train`", path, ", ".join(sorted(untrained)))
    tokenizer = _tokenizer(path, tokenizer_dir)
    feeds, options, _loaded = adapters.run_inputs(path, len(texts))
    sess = runtime.session(path)
    encoded = _fit(encode_texts(props, tokenizer, texts, str(path)), texts, _limit(props, tokenizer), truncate)
    outputs = runtime.run(sess, encoded | feeds, options)
    first = next(iter(outputs.values()))
    if task != "seq-cls":  # per-position outputs: drop the positions prompt tuning put before the input's
        first = first[:, int(props.get(PREPENDED_KEY, 0)):]
    token = lambda i: tokenizer.convert_ids_to_tokens(i)  # noqa: E731
    results = []
    for row in range(len(texts)):
        if task == "seq-cls":
            labels = {int(k): v for k, v in json.loads(props.get(LABELS_KEY, "{}")).items()}
            results.append(_top(_softmax(first[row]), lambda i: labels.get(i, str(i)), top_k))
        elif task == "masked-lm":
            masks = np.flatnonzero(encoded["input_ids"][row] == tokenizer.mask_token_id)
            if not len(masks):
                raise RewriteError(f"text {texts[row]!r} has no {tokenizer.mask_token} token to predict")
            results.append(_top(_softmax(first[row, masks[0]]), token, top_k))
        elif task == "causal-lm":
            last = int(encoded["attention_mask"][row].nonzero()[0][-1])
            results.append(_top(_softmax(first[row, last]), token, top_k))
        else:
            pooled = first[row][encoded["attention_mask"][row].astype(bool)].mean(axis=0)
            results.append([("embedding norm", float(np.linalg.norm(pooled)))])
    return results
