#!/usr/bin/env bash
# Training speed on one large GPU: rewrite.train vs PEFT + Hugging Face, a LLaMA-shaped 1.1B model
# (TinyLlama's shape, random weights from its config), LoRA r=8 on q,v, bf16 autocast, batch 8 x seq 1024.
# Prints tokens/s and peak memory for both. About 3 minutes on one H100/H200-class GPU (eager);
# MODES=eager,compile adds the compiled pair (a few minutes more). On a machine with two GPUs or more it then
# measures FSDP per block on 2 GPUs against one (benchmarks/fsdp_memory.py).
#
#   benchmarks/gpu.sh                 # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA GPU'; print(torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q -x tests/test_speed.py -k "head_loss" -p no:cacheprovider
"$PYTHON" benchmarks/train_throughput.py --models llama-1b --modes "${MODES:-eager}" --steps 10 --warmup 3 --repeats 1
# With two GPUs or more: per-GPU peak memory of FSDP per block on 2 ranks against one GPU, same global batch.
if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    "$PYTHON" benchmarks/fsdp_memory.py --device cuda --worlds 1,2 --global-batch 8 --seq 1024 --steps 5
fi
