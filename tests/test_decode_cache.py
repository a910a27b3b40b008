"""The cache of a generation run (`rewrite.runtime.cache.open_cache`): held in place on a model lowered onto
GroupQueryAttention, copied on any other (BLOOM: ALiBi), the two giving the same logits on every step (right-padded batches, a
sliding window run past its width, an adapter active through ONNX Runtime's run options); and the prefill asking a
lowered export for each row's last logits only, which equal the full logits there, rows padded on either side."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import transformers

import rewrite
from rewrite import runtime
from rewrite.runtime.adapters import Adapters
from rewrite.runtime.cache import LAST_ONLY, CopiedCache, InPlaceCache, open_cache, positions
from rewrite.runtime.generate import last_logits
from rewrite.runtime.schema import ModelSchema

from test_kv_cache import GQA, assert_same_generation, byte_tokenizer, hf_generate, tiny_lm


def _export(tmp, arch: str, config=None, **options):
    """A tiny model's cached export (lowered where the rules apply), with its tokenizer; the HF model too."""
    model = tiny_lm(arch, config)
    model.save_pretrained(tmp / "hf")
    gm = rewrite.load_pretrained(tmp / "hf")
    if options.get("adapter_slots"):
        rewrite.apply(gm, "lora", rank=4, alpha=8)
    path = tmp / "onnx" / "model.onnx"
    rewrite.export_onnx(gm, path, cache=True, **options)
    byte_tokenizer().save_pretrained(path.parent)
    return path, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A lowered LLaMA with adapter slots."""
    return _export(tmp_path_factory.mktemp("llama"), "llama", transformers.LlamaConfig(**GQA, initializer_range=0.2),
                   adapter_slots=True)


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    """A BLOOM, its attention (ALiBi) not lowered, its rows padded on the left."""
    return _export(tmp_path_factory.mktemp("bloom"), "bloom")


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    """A prompt-tuned LLaMA: its virtual tokens are a cache prefix, so its rows are padded on the left."""
    tmp = tmp_path_factory.mktemp("prompted")
    tiny_lm("llama", transformers.LlamaConfig(**GQA, initializer_range=0.2)).save_pretrained(tmp / "hf")
    gm = rewrite.load_pretrained(tmp / "hf")
    rewrite.apply(gm, "prompt", num_virtual_tokens=3)
    rewrite.export_onnx(gm, tmp / "model.onnx", cache=True)
    return tmp / "model.onnx", None


def _batch(padding: str, prompt: int = 6, steps: int = 12, seed: int = 0):
    """Ids of 3 rows and their mask over prompt and decoding steps, rows 1 and 2 shorter, padded on `padding`."""
    ids = np.random.default_rng(seed).integers(0, 250, (3, prompt + steps))
    mask = np.ones_like(ids)
    for row, pad in ((1, 2), (2, 4)):
        mask[row, slice(prompt - pad, prompt) if padding == "right" else slice(0, pad)] = 0
    return ids, mask


def _steps(cache, ids, mask, prompt: int = 6) -> list[np.ndarray]:
    """Each step's last logits per row: a prefill of `prompt` tokens, then one token per step."""
    position_ids = positions(mask)
    return [last_logits(cache.run(ids[:, start:end], mask[:, :end], position_ids[:, start:end]), mask[:, :end])
            for start, end in [(0, prompt), *((t, t + 1) for t in range(prompt, ids.shape[1]))]]


def _adapter_file(path, tmp) -> str:
    """A random adapter for every slot of the model at `path`, as an ONNX Runtime adapter file."""
    rng, slots = np.random.default_rng(3), ModelSchema.read(path).slots
    values = {s.name: ort.OrtValue.ortvalue_from_numpy(
        (rng.standard_normal([4 if d is None else d for d in s.shape]) * 0.3).astype(np.float32)) for s in slots.slots}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(slots.fingerprint)
    adapter.set_parameters(values)
    adapter.export_adapter(str(tmp / "random.onnx_adapter"))
    return str(tmp / "random.onnx_adapter")


def test_a_lowered_model_decodes_in_place_as_with_a_copied_cache(llama):
    path, _ = llama
    session, layout = runtime.session(path), ModelSchema.read(path).require_cache()
    assert layout.in_place and layout.padding == "right"
    ids, mask = _batch("right")
    in_place = open_cache(session, layout, 3, ids.shape[1])
    assert isinstance(in_place, InPlaceCache)
    for a, b in zip(_steps(in_place, ids, mask), _steps(CopiedCache(session, layout, 3), ids, mask)):
        assert np.abs(a - b).max() <= 1e-5


@pytest.mark.slow
def test_a_sliding_window_decodes_in_place_past_its_width_as_hf_generate(tmp_path):
    config = transformers.MistralConfig(**GQA, sliding_window=4, initializer_range=0.2)
    path, model = _export(tmp_path, "mistral", config)
    assert ModelSchema.read(path).require_cache().in_place
    assert_same_generation(path, hf_generate(model))


def test_adapters_and_unlowered_models_keep_a_copied_cache(llama, bloom, tmp_path):
    """ONNX Runtime binds no adapter input and applies no active adapter file to a bound run."""
    path, _ = llama
    session, layout = runtime.session(path), ModelSchema.read(path).require_cache()
    slot = ModelSchema.read(path).slots.slots[0]
    stacked = {slot.name: np.zeros([4 if d is None else d for d in slot.shape], np.float32)}
    assert type(open_cache(session, layout, 1, 8, stacked)) is CopiedCache
    _, options, _adapter = Adapters(active=_adapter_file(path, tmp_path)).run_inputs(path, 3)  # kept alive
    assert type(open_cache(session, layout, 3, 18, options=options)) is CopiedCache
    ids, mask = _batch("right")
    adapted = _steps(open_cache(session, layout, 3, 18, options=options), ids, mask)[-1]
    assert np.abs(adapted - _steps(open_cache(session, layout, 3, 18), ids, mask)[-1]).max() > 1e-3
    path, _ = bloom
    layout = ModelSchema.read(path).require_cache()
    assert not layout.in_place
    assert type(open_cache(runtime.session(path), layout, 1, 8)) is CopiedCache


@pytest.mark.parametrize("name, padding", [("llama", "right"), ("bloom", "left"),
                                           pytest.param("prompted", "left", marks=pytest.mark.slow)])
def test_a_prefill_computes_each_rows_last_logits_only_when_asked(name, padding, request):
    path, _ = request.getfixturevalue(name)
    session, layout = runtime.session(path), ModelSchema.read(path).require_cache()
    assert layout.padding == padding and LAST_ONLY in {i.name for i in session.get_overridable_initializers()}
    ids, mask = _batch(padding, steps=0)
    full = CopiedCache(session, layout, 3, last_only=False).run(ids, mask, positions(mask))
    last = CopiedCache(session, layout, 3).run(ids, mask, positions(mask))
    assert full.shape == (3, 6, 257) and last.shape == (3, 1, 257)
    assert np.abs(last_logits(full, mask) - last[:, 0]).max() <= 1e-6
    default = runtime.run(session, {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
                          | {n: np.zeros((3, layout.kv_heads, 0, layout.head_dim), np.float32)
                             for n in layout.past_names()})["logits"]
    assert np.array_equal(default, full)


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_generation_through_either_cache_equals_hf_generate(name, request):
    path, model = request.getfixturevalue(name)
    # the slotted LLaMA without an adapter fed is its base model
    assert_same_generation(path, hf_generate(model))
