"""lm against the same model in PyTorch on this machine, rounds interleaved: the step, or the whole run.

    pip install torch==2.13.0   # CPU wheel
    python benchmarks/vs_torch.py --config configs/shakespeare_cpu.yaml --rounds 3 --steps 60 --warmup 10
    python benchmarks/vs_torch.py --config configs/shakespeare_cpu.yaml --rounds 3 --whole_run

Step mode: each round runs `python -m lm.bench` (the config and overrides) and then
`benchmarks/torch_reference.py` with the config's shape (layers, width, heads, batch,
sequence, dropout, gradient accumulation, byte vocabulary), each in a fresh process, so both
see the same machine load over time. Prints every round and the median tokens/s of each
side, their ratio, and the median of the per-round ratios (steadier on a VM whose load moves
between rounds).

Whole-run mode (`--whole_run`): each round times `python train.py --config C` (a fresh
run_dir: imports, compiles, every step, validation, checkpoints, to the process's exit)
against `torch_reference.py --whole_run` with the config's steps, learning rate, validation
and checkpoint schedule, and prints the wall seconds of each, their ratio (also per round) and
both final validation losses.

Both modes first print the processor (`lm info`'s line for it): CPU figures hold only for it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

from lm.config import load_config
from lm.tools.info import processor

HERE = pathlib.Path(__file__).resolve().parent


def torch_args(cfg) -> list[str]:
    m, t = cfg.model, cfg.train
    if (m.norm, m.mlp, m.position, m.use_bias, m.tie_embeddings, m.kv_heads) != (
            "layernorm", "gelu", "learned", False, True, m.n_heads):
        sys.exit("error: torch_reference.py models GPT-2-style configs only (layernorm, gelu, learned positions, "
                 "no biases, tied embeddings, multi-head attention).")
    return ["--n_layers", str(m.n_layers), "--d_model", str(m.d_model), "--n_heads", str(m.n_heads),
            "--batch_size", str(t.batch_size), "--seq_len", str(t.seq_len), "--dropout", str(m.dropout),
            "--attention_dropout", str(m.attention_dropout), "--grad_accum", str(t.grad_accum_steps)]


def torch_whole_run_args(cfg) -> list[str]:
    """torch_reference.py --whole_run with the config's shape, seed, schedule, validation and checkpoints."""
    t, e, o = cfg.train, cfg.eval, cfg.optim
    return ["--whole_run", *torch_args(cfg), "--seed", str(cfg.seed), "--steps", str(t.steps), "--lr", str(o.lr),
            "--lr_warmup", str(o.warmup_steps), "--eval_every", str(e.every), "--eval_batches", str(e.batches),
            "--checkpoint_every", str(cfg.checkpoint.every), "--log_every", str(cfg.log.every)]


def run(command: list[str]) -> tuple[str, float]:
    """(stdout, wall seconds) of a fresh process; exits with its stderr if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return done.stdout, time.perf_counter() - start


def last_val_loss(stdout: str) -> float:
    return float(re.findall(r"val_loss (\d+\.\d+)", stdout)[-1])


def step_rounds(args, cfg) -> None:
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    lm_cmd = [sys.executable, "-m", "lm.bench", "--config", args.config, *args.overrides, *timing, "--json"]
    torch_cmd = [sys.executable, str(HERE / "torch_reference.py"), *torch_args(cfg), *timing]
    ours, theirs = [], []
    for i in range(args.rounds):
        lm_result = json.loads(run(lm_cmd)[0].strip().splitlines()[-1])
        torch_result = json.loads(run(torch_cmd)[0].strip().splitlines()[-1])
        ours.append(lm_result["tokens_per_sec"])
        theirs.append(torch_result["tokens_per_sec"])
        print(f"round {i + 1}: lm {ours[-1]:,.0f} tokens/s ({lm_result['n_devices']} device(s), "
              f"MFU {lm_result['mfu']:.1%}) | torch {theirs[-1]:,.0f} tokens/s ({torch_result['threads']} threads)",
              flush=True)
    lm_median, torch_median = statistics.median(ours), statistics.median(theirs)
    print(f"median: lm {lm_median:,.0f} | torch {torch_median:,.0f} | lm / torch = {lm_median / torch_median:.2f} "
          f"(per round: median {statistics.median(a / b for a, b in zip(ours, theirs)):.2f})")


def whole_run_rounds(args, cfg) -> None:
    torch_cmd = [sys.executable, str(HERE / "torch_reference.py"), *torch_whole_run_args(cfg)]
    ours, theirs = [], []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            lm_out, lm_sec = run([sys.executable, "train.py", "--config", args.config, *args.overrides,
                                  f"run_dir={tmp}/run"])
        torch_out, torch_sec = run(torch_cmd)
        ours.append(lm_sec)
        theirs.append(torch_sec)
        print(f"round {i + 1}: lm {lm_sec:.1f} s (val_loss {last_val_loss(lm_out):.4f}) | torch {torch_sec:.1f} s "
              f"(val_loss {last_val_loss(torch_out):.4f})", flush=True)
    lm_median, torch_median = statistics.median(ours), statistics.median(theirs)
    print(f"median wall: lm {lm_median:.1f} s | torch {torch_median:.1f} s | torch / lm = "
          f"{torch_median / lm_median:.2f} (per round: median {statistics.median(b / a for a, b in zip(ours, theirs)):.2f}; "
          "above 1: lm's whole run is faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="step mode: timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="step mode: untimed steps")
    parser.add_argument("--whole_run", action="store_true", help="time whole runs (train.py vs the torch script)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for lm (the torch model follows the shape)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    print(f"processor: {processor()}", flush=True)
    (whole_run_rounds if args.whole_run else step_rounds)(args, cfg)


if __name__ == "__main__":
    main()
