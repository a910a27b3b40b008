"""Text in, predictions out, from an exported ONNX model in ONNX Runtime."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from rewrite import runtime
from rewrite.errors import RewriteError
from rewrite.export import LABELS_KEY, PREPENDED_KEY, TASK_KEY
from rewrite.onnx_adapters import Adapters
from rewrite.pipeline import registered


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _model_props(path: Path) -> dict[str, str]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as error:
        raise RewriteError(f"{str(path)!r} is not an ONNX model ({error}); pass a file written by `rewrite export`") from error
    return {p.key: p.value for p in model.metadata_props}


def _tokenizer(path: Path, tokenizer_dir: str | None):
    from transformers import AutoTokenizer

    directory = Path(tokenizer_dir) if tokenizer_dir else path.parent
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise RewriteError(
            f"no tokenizer in {str(directory)!r} ({error}); pass --tokenizer with the model's directory"
        ) from error


def _top(scores: np.ndarray, names, k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores)[:k]
    return [(names(int(i)), float(scores[i])) for i in order]


def _encode(texts: list[str], tokenizer, props: dict[str, str]) -> dict[str, np.ndarray]:
    """The model's inputs for `texts`: as a pass whose metadata the model carries encodes them (a
    template), else tokenized as they are."""
    for cls in registered():
        inputs = cls.serving_inputs(props, tokenizer, texts)
        if inputs is not None:
            return inputs
    return {k: v.astype(np.int64) for k, v in tokenizer(texts, padding=True, return_tensors="np").items()}


def predict(model_path: str | Path, texts: list[str], *, tokenizer_dir: str | None = None, top_k: int = 5,
            adapters: Adapters | None = None):
    """Per text, the top predictions as (label, probability): classes, masked tokens or next tokens.
    `adapters` fill a slotted model's adapter slots (see `rewrite.onnx_adapters`)."""
    path = Path(model_path)
    props = _model_props(path)
    task = props.get(TASK_KEY, "")
    tokenizer = _tokenizer(path, tokenizer_dir)
    feeds, options, _loaded = (adapters or Adapters()).run_inputs(path, len(texts))
    sess = runtime.session(path)
    encoded = _encode(texts, tokenizer, props)
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
