#!/usr/bin/env bash
# lm on one GPU beside PyTorch, in one call of about 8 minutes on one H200 (benchmarks/gpu_bench.py):
# lm bench of GPT-2 124M at batch 32 and the PyTorch reference of the same model (torch.compile,
# bf16 autocast, fused AdamW), gpt2_124m and llama_1b as configured, A/B variants (loss tiling,
# unrolled layers, remat, XLA flag sets) as the time budget allows, then the shakespeare_char
# recipe end to end (train.py, eval.py --json). Needs jax (CUDA), flax, optax, orbax-checkpoint,
# torch with triton, nothing else (no TFDS, grain or tensorboardX; random tokens for the benchmarks).
#   bash benchmarks/gpu.sh [STAGE ...]          all stages, or only those named
#   LM_GPU_BENCH_DRY=1 bash benchmarks/gpu.sh   the CPU dry run: tiny shapes, 1-2 steps (tests/test_gpu_bench.py)
# One JSON line per stage to ${OUT:-.}/gpu_bench.jsonl as it ends; the table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/gpu_bench.py "$@"
