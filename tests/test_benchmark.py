"""The training benchmark's pieces (what benchmarks/gpu.sh runs on a GPU) work on CPU on a tiny LLaMA."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "train_throughput.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ours_and_peft_measure_the_same_batch(tmp_path):
    bench = _module()
    directory = bench.model_dir("tiny-llama", tmp_path)
    spec = bench.MODELS["tiny-llama"]
    ours = bench.run_rewrite(directory, spec, "eager", steps=1, warmup=1)
    none = bench.run_rewrite(directory, spec, "eager", steps=1, warmup=1, implementation="rewrite=none")
    theirs = bench.run_peft(directory, spec, "eager", steps=1, warmup=1)
    for result in (ours, none, theirs):
        assert result["step_s"] > 0 and result["peak_bytes"] > 0
    assert bench.speed_passes("rewrite=chunked_loss+rows") == ["chunked_loss", "rows"]
    assert bench.speed_passes("rewrite=none") == [] and bench.speed_passes("rewrite") is None
    without = bench.speed_passes("rewrite=-fused_lora")
    assert "fused_lora" not in without and "chunked_loss" in without


def test_the_gpu_model_is_llama_shaped_and_about_a_billion_parameters():
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_module().MODELS["llama-1b"]["config"]))
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.2e9


@pytest.mark.slow
def test_the_driver_prints_a_table():
    done = subprocess.run([sys.executable, str(BENCHMARK), "--models", "tiny-llama", "--modes", "eager",
                           "--steps", "1", "--warmup", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny-llama" in done.stdout and "ours" in done.stdout


@pytest.mark.slow
def test_the_serving_benchmark_reports_every_arm(tmp_path):
    import json

    script = BENCHMARK.parent / "serve_throughput.py"
    done = subprocess.run([sys.executable, str(script), "--models", "tiny", "--concurrency", "2", "--requests", "2",
                           "--max-tokens", "4", "--prompt-tokens", "8", "--threads", "1", "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = json.loads((tmp_path / "out.json").read_text())
    arms = ["library 1 adapter", "library 8 adapters", "mixed 1 adapter c=2", "mixed 8 adapters c=2", "folded c=2"]
    assert list(result["arms"]) == arms
    for arm in result["arms"].values():
        assert arm["requests"] == 2 and 2 <= arm["tokens"] <= 8 and arm["tokens_per_s"] > 0
        assert 0 < arm["ttft_p50"] <= arm["latency_p50"] and len(arm["texts"]) == 2
    assert set(result["ratios"]) == {"1 adapter c=2 / library", "8 adapters c=2 / library", "8 adapters c=2 / folded"}
    assert result["agreement"] == {arm: 2 for arm in arms[2:]}  # greedy: the server answers as the library does
    for process in ("serve_mixed", "serve_folded", "cli_run"):
        assert result[process]["cold_start_s"] > 0 and result[process]["peak_rss_bytes"] > 0
    assert result["serve_mixed"]["peak_rss_bytes"] >= result["serve_mixed"]["rss_bytes"]
    assert "| mixed 8 adapters | 2 |" in done.stdout


@pytest.mark.slow
def test_the_quantized_load_benchmark_measures_every_load_and_plans_7b(tmp_path):
    import json

    script = BENCHMARK.parent / "quantized_load.py"
    done = subprocess.run([sys.executable, str(script), "--model", "tiny", "--kinds", "float,int4",
                           "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert list(result["loads"]) == ["float", "int4"] and result["float_weights_bytes"] > 0
    assert all(row["peak_bytes"] >= row["baseline_bytes"] > 0 for row in result["loads"].values())
    plan = result["plans_7b"]["int4"]
    assert plan["modules"] == 224 and plan["quantized_bytes"] < plan["quantized_float_bytes"] / 5
    assert plan["predicted_peak_bytes"] == plan["model_quantized_bytes"] + plan["largest_float_bytes"]
    assert "| int4 | 224 |" in done.stdout


@pytest.mark.slow
def test_the_fsdp_memory_benchmark_measures_every_world_size(tmp_path):
    script = BENCHMARK.parent / "fsdp_memory.py"
    done = subprocess.run([sys.executable, str(script), "--model", "tiny-llama", "--worlds", "1,2", "--steps", "2",
                           "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 1 |" in done.stdout and "| 2 |" in done.stdout
    results = json.loads((tmp_path / "out.json").read_text())
    assert [len(results[w]) for w in ("1", "2")] == [1, 2]
    assert all(r["peak_bytes"] > 0 and r["tokens_per_s"] > 0 for ranks in results.values() for r in ranks)


@pytest.mark.slow
def test_the_genai_decode_benchmark_times_every_arm(tmp_path):
    """Against GenAI's builder where onnxruntime-genai is installed in this Python, else our arms alone."""
    script = BENCHMARK.parent / "genai_decode.py"
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    command = [sys.executable, str(script), "--model", "tiny", "--prompt", "8", "--new", "4", "--repeats", "1",
               "--rounds", "2", "--batches", "1,2", "--json", str(tmp_path / "out.json")]
    done = subprocess.run(command + (["--genai-python", sys.executable] if genai else []), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out.json").read_text())
    references = {"GenAI fp32", "GenAI int4"} if genai else set()
    arms = ({"ours fp32", "ours fp32 unfused", "ours int4", "ours int4, 4 KiB pages"}
            | references | ({"GenAI int4, huge pages"} if genai else set()))
    assert set(results) == arms
    assert results["ours fp32"]["nodes"] < results["ours fp32 unfused"]["nodes"]
    assert all(0 < results[arm]["kernels"] <= results[arm]["nodes"] for arm in arms)
    assert all(results[arm][str(b)]["step_s"] > 0 for arm in arms for b in (1, 2))
    if genai:
        assert all(results[arm][str(b)]["step_ratio"] > 0 for arm in arms - references for b in (1, 2))
