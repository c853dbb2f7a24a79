"""What each modern change buys on the CPU recipe: each alone on shakespeare_cpu, and all together.

    python benchmarks/ablation.py                       # every variant, seeds 1 and 2, runs under /tmp/lm_ablation
    python benchmarks/ablation.py --only base muon all --seeds 1 --root /tmp/abl

Each variant is `train.py --config configs/shakespeare_cpu.yaml seed=S eval.every=200 OVERRIDES` (all and
all_untied: configs/shakespeare_modern.yaml), then `eval.py --json` on the whole validation split. It prints one
markdown row per variant: parameters, eval.py loss per seed and their mean, the change against the
base, and the first in-training validation step at or below --target. Runs are resumable: a finished
run_dir is only evaluated again.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # parameters() imports this checkout's lm, as train.py and eval.py run it
BASE, MODERN = "configs/shakespeare_cpu.yaml", "configs/shakespeare_modern.yaml"
# name: (config, overrides). lion and schedule_free reset shakespeare_cpu's optim.b2 (0.99, AdamW's) to its
# default, and take the rates that did best in 1000-step runs (docs/benchmarks.md).
VARIANTS = {
    "base": (BASE, []),
    "rope": (BASE, ["model.position=rope"]),
    "rmsnorm": (BASE, ["model.norm=rmsnorm"]),
    "swiglu": (BASE, ["model.mlp=swiglu", "model.d_ff=344"]),
    "qk_norm": (BASE, ["model.qk_norm=head"]),
    "untied": (BASE, ["model.tie_embeddings=false"]),
    "muon": (BASE, ["optim.name=muon"]),
    "lion": (BASE, ["optim.name=lion", "optim.b2=0.95", "optim.lr=1e-3", "optim.weight_decay=0.3"]),
    "schedule_free": (BASE, ["optim.name=schedule_free_adamw", "optim.b2=0.95", "optim.lr=1e-2"]),
    "all": (MODERN, []),
    "all_untied": (MODERN, ["model.tie_embeddings=false"]),
}


def run(name: str, seed: int, root: pathlib.Path) -> dict:
    """Trains (or resumes) one variant and seed, then scores its whole validation split."""
    config, overrides = VARIANTS[name]
    run_dir = root / f"{name}_s{seed}"
    subprocess.run([sys.executable, "train.py", "--config", config, f"run_dir={run_dir}", f"seed={seed}",
                    "eval.every=200", "log.tensorboard=false", *overrides], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    scored = subprocess.run([sys.executable, "eval.py", "--run_dir", str(run_dir), "--json"], cwd=ROOT, check=True,
                            capture_output=True, text=True)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    described = [r for r in metrics if "val_loss" in r]
    return {"loss": json.loads(scored.stdout.splitlines()[-1])["loss"], "val": described}


def parameters(name: str) -> int:
    """The variant's parameter count (the model built on byte tokens, nothing trained)."""
    import jax

    from lm.config import load_config
    from lm.model.transformer import Transformer
    from lm.training.step import init_params

    config, overrides = VARIANTS[name]
    cfg = load_config(ROOT / config, [*overrides, "model.vocab_size=259"])
    shapes = jax.eval_shape(lambda: init_params(Transformer(cfg.model), jax.random.key(0), cfg.train.seq_len))
    return sum(x.size for x in jax.tree.leaves(shapes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path("/tmp/lm_ablation"))
    parser.add_argument("--target", type=float, default=1.78, help="in-training val_loss to reach")
    args = parser.parse_args()
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"| variant | overrides | parameters | {seeds} | mean | vs base | val <= {args.target} at step |")
    print("| --- | --- | --- |" + " --- |" * len(args.seeds) + " --- | --- | --- |")
    base_mean = None
    for name in args.only:
        results = [run(name, seed, args.root) for seed in args.seeds]
        losses = [r["loss"] for r in results]
        mean = sum(losses) / len(losses)
        base_mean = mean if name == "base" else base_mean
        versus = "" if base_mean is None or name == "base" else f"{mean - base_mean:+.3f}"
        reached = [next((r["step"] for r in res["val"] if r["val_loss"] <= args.target), None) for res in results]
        config, overrides = VARIANTS[name]
        what = " ".join([f"`{config}`"] * (config != BASE) + [f"`{o}`" for o in overrides]) or "(none)"
        print(f"| {name} | {what} | {parameters(name):,} | " + " | ".join(f"{x:.4f}" for x in losses)
              + f" | {mean:.4f} | {versus} | {', '.join(str(s or '-') for s in reached)} |", flush=True)


if __name__ == "__main__":
    main()
