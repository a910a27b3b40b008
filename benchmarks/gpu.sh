#!/usr/bin/env bash
# Training speed on one large GPU: rewrite.train vs PEFT + Hugging Face, a LLaMA-shaped 1.1B model
# (TinyLlama's shape, random weights from its config), LoRA r=8 on q,v, bf16 autocast, batch 8 x seq 1024.
# Prints tokens/s and peak memory for both. About 3 minutes on one H100/H200-class GPU (eager);
# MODES=eager,compile adds the compiled pair (a few minutes more).
#
#   benchmarks/gpu.sh                 # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA GPU'; print(torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q -x tests/test_speed.py -k "head_loss" -p no:cacheprovider
exec "$PYTHON" benchmarks/train_throughput.py --models llama-1b --modes "${MODES:-eager}" --steps 10 --warmup 3 --repeats 1
