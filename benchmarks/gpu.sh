#!/usr/bin/env bash
# The GPU figures of the README's Results table, in one run: cuDNN's attention against XLA's at the
# configs' shapes (benchmarks/attention_check.py: bf16 error and speed), then lm.bench on each
# config given (default: gpt2_124m and llama_1b, bf16 with cuDNN attention as configured), plus
# the first with XLA's attention for comparison. Needs only jax, flax, optax and orbax (no TFDS,
# grain or corpus: without data.text_file the benchmark times random tokens, said so in its output).
#   bash benchmarks/gpu.sh [CONFIG ...]
# Prints each table and appends one JSON line per run to ${OUT:-.}/gpu_bench.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
results="${OUT:-.}/gpu_bench.jsonl"
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
  configs=(configs/gpt2_124m.yaml configs/llama_1b.yaml)
fi
python -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

run() {  # CONFIG [key=value ...]
  local json
  if ! json=$(python -m lm.bench --config "$@" --steps 10 --warmup 2 --max_seconds 90 --json | tail -n 1); then
    echo "== FAILED: $*"  # keep going: the other runs still use the device time
    return 0
  fi
  echo "$json" >> "$results"
  python - "$json" "$@" <<'EOF'
import json, sys
from lm.tools.bench import format_table
print("==", " ".join(sys.argv[2:]))
print(format_table(json.loads(sys.argv[1])))
EOF
}

python benchmarks/attention_check.py "${configs[@]}" | tee -a "$results" || echo "== FAILED: attention_check"
for config in "${configs[@]}"; do
  run "$config"
done
run "${configs[0]}" model.attention=xla
