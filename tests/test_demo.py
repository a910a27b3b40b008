"""`rewrite demo` end to end on the real MiniLM checkpoint and the shipped SST-2 data, as the README's first
command runs it (minutes on 2 cores: the README's run is shared, so the demo trains once per test session)."""
from __future__ import annotations

import json

import pytest

from rewrite.recipes.demo import REPORT_NAME


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
