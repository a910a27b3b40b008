"""Test helpers shared by several test files: capture a model, build the PEFT twin, copy LoRA weights."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import rewrite
from rewrite.graph.synthetic_inputs import example_inputs

INPUTS = ["input_ids", "attention_mask"]
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}


def capture_tiny(model, vocab: int = 128):
    return rewrite.capture(copy.deepcopy(model), example_inputs(INPUTS, vocab, batch=2, seq=8))


def fresh_inputs(vocab: int = 128, batch: int = 3, seq: int = 11, seed: int = 5):
    """Another shape than the capture's, with a padded row."""
    return example_inputs(INPUTS, vocab, batch=batch, seq=seq, seed=seed, pad=True)


def randomize_lora(gm, seed: int = 1) -> None:
    """B is zero after init; give A and B random values so the branch changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def randomize_trainable(module, seed: int, scale: float = 0.5, around_current: bool = False) -> None:
    """Trained-looking values for every trainable tensor (LoRA's B starts at zero; IA3's vectors at one, which
    `around_current` keeps as the centre)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(param + noise if around_current else noise)


def peft_twin(model, gm, task: str, **config):
    """A PEFT model over a copy of `model` carrying `gm`'s LoRA (and trainable head) weights."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type=TASK_TYPES.get(task), **config))
    return copy_lora(gm, peft_model).eval()


def copy_lora(gm, peft_model):
    """`peft_model` with `gm`'s LoRA weights copied into its default adapter."""
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                params["base_model.model." + name.replace(".weight", ".default.weight")].copy_(param)
    return peft_model


def assert_folds_to(gm, merged, base) -> None:
    """Folds `gm`: its logits equal the reference `merged` model's, and it is node for node `base` again (the
    branch and its tensors gone)."""
    rewrite.apply(gm, "fold")
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm, inputs), logits(merged, inputs), atol=1e-5, rtol=0)
    ops = lambda g: [(n.op, str(n.target)) for n in g.graph.nodes if n.op != "get_attr"]  # noqa: E731
    assert ops(gm) == ops(base)
    assert not [n for n, _ in gm.named_parameters() if "lora_" in n]


def logits(module, inputs):
    with torch.no_grad():
        return module(**inputs).logits


GOOD = ["good", "great", "fine", "nice", "happy"]
BAD = ["bad", "awful", "sad", "poor", "ugly"]
FILLER = ["the", "movie", "was", "a", "day", "really", "very", "it"]


def sentiment_rows(count: int, seed: int) -> list[dict]:
    """A learnable task: the label is whether the one sentiment word is positive."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(0, 3))] + [rng.choice(GOOD if label else BAD)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def lora_graph(model_dir, roles=("q", "v")):
    gm = rewrite.load_pretrained(model_dir, task="seq-cls", num_labels=2)
    torch.manual_seed(0)
    rewrite.apply(gm, "lora", rank=4, alpha=8, roles=list(roles))
    return gm


def checkpoint_tensors(directory) -> dict:
    """A checkpoint's shards whole, however many ranks wrote them: {"model": {name: weight}, "optim": {...}}."""
    import tempfile
    from pathlib import Path

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(directory, Path(tmp) / "whole.pt")
        return torch.load(Path(tmp) / "whole.pt", weights_only=True)


def first_moments(output_dir, step: int) -> list[torch.Tensor]:
    """AdamW's first moment after step 1 is 0.1 x the gradient: the step's gradient, read from its checkpoint."""
    state = checkpoint_tensors(output_dir / "checkpoints" / f"step-{step:08d}")["optim"]["state"]
    return [s["exp_avg"] for _, s in sorted(state.items())]


def run_cli(*args, cwd=None, env=None, timeout=300):
    """The `rewrite` command in a subprocess, stdin closed (nothing may prompt)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "from rewrite.cli.main import main; main()", *map(str, args)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, cwd=cwd, env=env)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps from file `path`."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges
