"""`rewrite demo` end to end on the real MiniLM checkpoint and the shipped SST-2 data (minutes on 2 cores)."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from rewrite.recipes.demo import run_demo

@pytest.mark.slow
def test_demo_reaches_080_and_onnx_runtime_reproduces_torch(tmp_path):
    report = run_demo(tmp_path / "demo", console=Console(file=io.StringIO()))

    assert report.accuracy_before < 0.6
    assert report.accuracy_after >= 0.80
    assert report.onnx_agreement == 1.0
    assert report.accuracy_onnx == report.accuracy_after
    assert {p.name for p in (tmp_path / "demo").iterdir()} >= {"model.onnx", "model.pt2", "adapter", "checkpoints",
                                                               "metrics.jsonl"}
