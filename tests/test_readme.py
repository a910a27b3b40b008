"""The README's shell examples run as a new user runs them: every ```bash block, top to bottom, as one
script in one fresh directory, each command as written, on the real MiniLM. Only what is the user's own
is supplied: the data files the examples name and a causal LM for `llama-dir`. Installing and the test
suite itself are not repeated here. The README's first command, `rewrite demo`, runs end to end on the real
MiniLM checkpoint and the shipped SST-2 data (minutes on 2 cores), so its report is checked from this one run."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from rewrite.recipes.demo import REPORT_NAME

from helpers import sentiment_rows

README = Path(__file__).parent.parent / "README.md"
REPOSITORY_FILES = ("experiments/pet_sst2_pvps.yaml",)  # what the examples read from the checkout

# Lines no test repeats, by their start, with why.
NEVER = {
    "pip install": "installing is done",
    "python -m pytest": "the test suite itself",
}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def script(text: str, *, llama: Path) -> str:
    """The README's bash blocks as one script: the user's model substituted, skipped lines left out, and
    each command echoed to stderr first, so a failure names the README line."""
    lines = ["set -euo pipefail"]
    for block in bash_blocks(text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():  # a continued line is one command
            if not line.strip() or line.startswith(tuple(NEVER)):
                continue
            line = re.sub(r"\bllama-dir\b", str(llama), line)
            lines += [f"echo {shlex.quote('README: ' + line)} >&2", line]
    return "\n".join(lines) + "\n"


def write_user_files(directory: Path) -> None:
    """The data files the examples name, small: labeled text (JSONL, and SST-2-style TSV with a
    `sentence` column), plain text for the language model, label words; and the checkout's files they read."""
    def jsonl(name: str, rows: list[dict], keys: tuple[str, ...]) -> None:
        (directory / name).write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))

    def tsv(name: str, rows: list[dict]) -> None:
        (directory / name).write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))

    jsonl("train.jsonl", sentiment_rows(64, 0), ("text", "label"))
    jsonl("dev.jsonl", sentiment_rows(32, 1), ("text", "label"))
    jsonl("texts.jsonl", sentiment_rows(32, 2), ("text",))
    tsv("train.tsv", sentiment_rows(16, 3))
    tsv("unlabeled.tsv", sentiment_rows(40, 4))
    tsv("dev.tsv", sentiment_rows(16, 5))
    for name in REPOSITORY_FILES:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(README.parent / name, directory / name)
    (directory / "labels.yaml").write_text("{negative: [bad, terrible], positive: [good, great]}\n")


def run_readme(directory: Path, *, llama: Path, timeout: int) -> None:
    write_user_files(directory)
    done = subprocess.run(["bash", "-c", script(README.read_text(), llama=llama)],
                          cwd=directory, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    ran = [line for line in done.stderr.splitlines() if line.startswith("README: ")]
    assert done.returncode == 0, f"{ran[-1] if ran else 'README'} failed:\n{done.stderr[-3000:]}"


def test_script_keeps_every_example_and_substitutes_only_user_inputs():
    full = script(README.read_text(), llama=Path("/lm"))
    assert "rewrite demo" in full and "torchrun" in full and "llama-dir" not in full and "pip install" not in full


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, prompt_lm_dir) -> Path:
    """The README's shell examples, run once as a new user runs them; the directory they ran in."""
    directory = tmp_path_factory.mktemp("readme")
    run_readme(directory, llama=prompt_lm_dir, timeout=3600)
    return directory


@pytest.mark.slow
def test_readme_examples_run_as_written(readme_run):
    assert (readme_run / "rewrite-demo" / "model.onnx").is_file()


@pytest.mark.slow
def test_demo_reaches_080_and_onnx_runtime_reproduces_torch(readme_run):
    directory = readme_run / "rewrite-demo"
    report = json.loads((directory / REPORT_NAME).read_text())

    assert report["accuracy_before"] < 0.6
    assert report["accuracy_after"] >= 0.80
    assert report["onnx_agreement"] == 1.0
    assert report["accuracy_onnx"] == report["accuracy_after"]
    assert {p.name for p in directory.iterdir()} >= {"model.onnx", "model.pt2", "adapter", "checkpoints",
                                                     "metrics.jsonl", REPORT_NAME}
