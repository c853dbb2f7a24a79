"""lm against the same model in PyTorch on this machine: tokens/s of each, rounds interleaved.

    pip install torch==2.13.0   # CPU wheel
    python benchmarks/vs_torch.py --config configs/shakespeare_cpu.yaml --rounds 3 --steps 60 --warmup 10

Each round runs `python -m lm.bench` (the config and overrides) and then
`benchmarks/torch_reference.py` with the config's shape (layers, width, heads, batch,
sequence, dropout, gradient accumulation, byte vocabulary), each in a fresh process, so both see the same machine
load over time. Prints every round and the median tokens/s of each side, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

from lm.config import load_config

HERE = pathlib.Path(__file__).resolve().parent


def torch_args(cfg) -> list[str]:
    m, t = cfg.model, cfg.train
    if (m.norm, m.mlp, m.position, m.use_bias, m.tie_embeddings, m.kv_heads) != (
            "layernorm", "gelu", "learned", False, True, m.n_heads):
        sys.exit("error: torch_reference.py models GPT-2-style configs only (layernorm, gelu, learned positions, "
                 "no biases, tied embeddings, multi-head attention).")
    return ["--n_layers", str(m.n_layers), "--d_model", str(m.d_model), "--n_heads", str(m.n_heads),
            "--batch_size", str(t.batch_size), "--seq_len", str(t.seq_len), "--dropout", str(m.dropout),
            "--grad_accum", str(t.grad_accum_steps)]


def last_json(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for lm (the torch model follows the shape)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    lm_cmd = [sys.executable, "-m", "lm.bench", "--config", args.config, *args.overrides, *timing, "--json"]
    torch_cmd = [sys.executable, str(HERE / "torch_reference.py"), *torch_args(cfg), *timing]
    ours, theirs = [], []
    for i in range(args.rounds):
        lm_result, torch_result = last_json(lm_cmd), last_json(torch_cmd)
        ours.append(lm_result["tokens_per_sec"])
        theirs.append(torch_result["tokens_per_sec"])
        print(f"round {i + 1}: lm {ours[-1]:,.0f} tokens/s ({lm_result['n_devices']} device(s), "
              f"MFU {lm_result['mfu']:.1%}) | torch {theirs[-1]:,.0f} tokens/s ({torch_result['threads']} threads)",
              flush=True)
    lm_median, torch_median = statistics.median(ours), statistics.median(theirs)
    print(f"median: lm {lm_median:,.0f} | torch {torch_median:,.0f} | lm / torch = {lm_median / torch_median:.2f}")


if __name__ == "__main__":
    main()
