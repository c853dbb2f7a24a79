"""Regularisation parity on a CPU: lm and the PyTorch reference (nanoGPT's four dropout sites)
overfit the same small text, a few seeds each, runs interleaved; their validation curves should
agree within the seeds' spread at every evaluation.

    pip install torch==2.13.0   # CPU wheel
    python benchmarks/dropout_parity.py [--seeds 3] [--chars 5000] [key=value ...]

The recipe is configs/shakespeare_cpu.yaml's model and optimizer (4 layers, d_model 128, seq_len
64, batch 12, lr 3e-3) with nanoGPT's dropout 0.2 at its four sites (embeddings, both residual
branches: model.dropout; attention probabilities: model.attention_dropout), 1000 steps with
validation every 100 (20 batches), on the first --chars characters of the packaged
tinyshakespeare (90/10 split): 0.8M parameters for 4,500 training tokens, so validation loss
bottoms out within the first few hundred steps and then climbs as the model memorises.
Overrides change the lm side, and the torch side follows (benchmarks/vs_torch.py). For each
seed, in turn: `train.py`, `torch_reference.py --whole_run` with the same seed, shape,
schedule and text (one thread: on a loaded 2-core machine two PyTorch threads wait on each
other), and `train.py` with model.attention_dropout=0 (lm without attention dropout, the
control). Prints per validation step each side's mean and range over the seeds, whether lm's
and torch's means differ by no more than the larger of their ranges ("agree"), and each
side's mean training loss (dropout on) over the last fifth of the run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import tempfile

from vs_torch import HERE, run, torch_whole_run_args

from lm.config import load_config
from lm.data import packaged
from lm.tools.info import processor

CONFIG = "configs/shakespeare_cpu.yaml"
RECIPE = ["model.dropout=0.2", "model.attention_dropout=0.2", "train.steps=1000", "eval.every=100",
          "eval.batches=20", "checkpoint.every=1000", "log.every=20", "log.tensorboard=false",
          "log.sample_tokens=0"]


def lm_curves(run_dir: pathlib.Path) -> tuple[dict[int, float], dict[int, float]]:
    """({step: val_loss}, {step: training loss}) of a train.py run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["val_loss"] for r in records if "val_loss" in r},
            {r["step"]: r["loss"] for r in records if "loss" in r})


def torch_curves(stdout: str) -> tuple[dict[int, float], dict[int, float]]:
    """The same two curves from torch_reference.py's printed lines."""
    def curve(name: str) -> dict[int, float]:
        return {int(step): float(v) for step, v in re.findall(rf"step\s+(\d+)/\d+ \| {name} (\d+\.\d+)", stdout)}
    return curve("val_loss"), curve("loss")


def late_mean(losses: dict[int, float], steps: int) -> float:
    """Mean training loss over the last fifth of the steps."""
    return statistics.mean(v for step, v in losses.items() if step > 0.8 * steps)


def summary(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per side (1, 2, ...)")
    parser.add_argument("--chars", type=int, default=5_000, help="characters of tinyshakespeare to train on")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe (lm; torch follows)")
    args = parser.parse_args()
    print(f"processor: {processor()}", flush=True)
    sides = {"lm": [], "torch": [], "lm, attention_dropout=0": []}
    with tempfile.TemporaryDirectory() as tmp:
        text = pathlib.Path(tmp) / "slice.txt"
        text.write_text(packaged.path("builtin:tinyshakespeare").read_text(encoding="utf-8")[:args.chars],
                        encoding="utf-8")
        recipe = RECIPE + [f"data.text_file={text}", *args.overrides]
        for seed in range(1, args.seeds + 1):
            for side, extra in (("lm", []), ("torch", None),
                                ("lm, attention_dropout=0", ["model.attention_dropout=0"])):
                overrides = recipe + [f"seed={seed}", f"run_dir={tmp}/run{list(sides).index(side)}_{seed}"]
                cfg = load_config(HERE.parent / CONFIG, overrides + (extra or []))
                if extra is None:
                    out, seconds = run([sys.executable, str(HERE / "torch_reference.py"), *torch_whole_run_args(cfg),
                                        "--text_file", str(text), "--threads", "1"])
                    curves = torch_curves(out)
                else:
                    _, seconds = run([sys.executable, "train.py", "--config", CONFIG, *overrides, *extra])
                    curves = lm_curves(pathlib.Path(cfg.run_dir))
                sides[side].append(curves)
                print(f"seed {seed} {side}: {seconds:.0f} s, val_loss at the end {curves[0][max(curves[0])]:.4f}",
                      flush=True)
    steps = sorted(sides["lm"][0][0])
    names = list(sides)
    print(f"\nvalidation loss, mean (range) over {args.seeds} seed(s):")
    print("| step | " + " | ".join(names) + " | lm and torch agree |")
    print("|---" * (len(names) + 2) + "|")
    for step in steps:
        vals = {name: [curves[0][step] for curves in sides[name]] for name in names}
        gap = abs(statistics.mean(vals["lm"]) - statistics.mean(vals["torch"]))
        spread = max(max(v) - min(v) for v in (vals["lm"], vals["torch"]))
        print(f"| {step} | " + " | ".join(summary(vals[name]) for name in names) +
              f" | {'yes' if gap <= spread else 'no'} (gap {gap:.4f}, spread {spread:.4f}) |")
    total = max(steps)
    print("| training loss, dropout on, last fifth | " + " | ".join(
        summary([late_mean(curves[1], total) for curves in sides[name]]) for name in names) + " | |")


if __name__ == "__main__":
    main()
