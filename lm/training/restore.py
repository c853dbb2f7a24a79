"""Reopens a run directory for inference: its config, tokenizer, a Runtime and one checkpoint's params.

`restore_run(run_dir)` is also `lm.restore_run`: the way into a trained (or imported) run from Python.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax

from lm import config as config_lib
from lm import rundir, storage
from lm.data.tokenizers import Tokenizer, load_tokenizer
from lm.errors import LMError
from lm.parallel.cpu import split_cpu
from lm.training.checkpoint import Checkpoints
from lm.training.optim import evaluated_apart
from lm.training.runtime import Runtime, build


@dataclasses.dataclass
class RestoredRun:
    """A run's checkpoint, restored: what evaluation, generation and export work from."""

    cfg: config_lib.Config  # with model.vocab_size resolved, and model.dtype as the model runs it (Runtime.model_cfg)
    tokenizer: Tokenizer
    runtime: Runtime
    params: Any
    step: int


@dataclasses.dataclass
class OpenRun:
    """A run directory read but not yet built: its config (laid out for inference), tokenizer, checkpoints."""

    cfg: config_lib.Config
    tokenizer: Tokenizer
    checkpoints: Checkpoints
    step: int


BEST = "best"  # the step argument that picks the kept checkpoint with the lowest validation loss


def best_step(ckpts: Checkpoints, run_dir: str | pathlib.Path) -> tuple[int, float]:
    """(step, validation loss) of the run's best kept checkpoint (checkpoint.keep_best), or an LMError."""
    best = ckpts.best()
    if best is None:
        raise LMError(f"'{run_dir}' keeps no checkpoint saved at a validation step, so it has no best; train it "
                      "with checkpoint.keep_best=true (and eval.every > 0), or pass --step N.")
    return best


def best_checkpoint(run_dir: str | pathlib.Path) -> tuple[int, float]:
    """`best_step` of the run in `run_dir`, read without building anything."""
    run_dir = storage.path(run_dir, "run_dir")  # a local directory or gs://
    rundir.read_config(run_dir)  # refuses a directory that holds no run
    ckpts = Checkpoints(run_dir / rundir.CHECKPOINT_DIR, read_only=True)
    try:
        return best_step(ckpts, run_dir)
    finally:
        ckpts.close()


def open_run(run_dir: str | pathlib.Path, step: int | str | None = None, batch_size: int | None = None) -> OpenRun:
    """Reads `run_dir`'s config, tokenizer and checkpoint list; picks `step` (default newest; BEST: the
    kept checkpoint with the lowest validation loss).

    The config is laid out data-parallel over all local devices, with the batch (default
    eval.batch_size or train.batch_size) rounded up so every device gets a share (so the CPU
    devices an earlier run in this process split serve any batch).
    """
    run_dir = storage.path(run_dir, "run_dir")
    cfg = rundir.read_config(run_dir)
    batch_size = batch_size or cfg.eval.batch_size or cfg.train.batch_size
    cfg = config_lib.replace(cfg, **{"parallel.mode": "mesh", "parallel.data": -1, "parallel.fsdp": 1,
                                     "parallel.tensor": 1, "train.batch_size": batch_size,
                                     "eval.batch_size": batch_size, "train.grad_accum_steps": 1})
    split_cpu(cfg, any_running=True)
    tokenizer = load_tokenizer(run_dir)
    ckpts = Checkpoints(run_dir / rundir.CHECKPOINT_DIR, read_only=True)
    if step == BEST:
        step = best_step(ckpts, run_dir)[0]
    elif step is None:
        step = ckpts.latest()
    if step is None:
        raise LMError(f"'{run_dir}' has no checkpoints yet; train it first (python train.py ... run_dir={run_dir}).")
    ways = jax.device_count()
    batch_size = -(-batch_size // ways) * ways
    cfg = config_lib.replace(cfg, **{"train.batch_size": batch_size, "eval.batch_size": batch_size})
    return OpenRun(cfg, tokenizer, ckpts, int(step))


def load_params(run: OpenRun) -> RestoredRun:
    """Builds the runtime and restores the chosen step's parameters to evaluate, checking model and tokenizer."""
    rt = build(run.cfg, run.tokenizer)
    expect = rundir.restorable({"tokenizer": run.tokenizer.to_json(), "model": config_lib.to_dict(rt.cfg)["model"]})
    try:
        if evaluated_apart(rt.cfg.optim):  # schedule-free: its average, from params and optimizer state
            state, _ = run.checkpoints.restore_state(run.step, rt.restore_target, expect=expect)
            params = rt.eval_params(state.params, state.opt_state)
        else:
            params, _ = run.checkpoints.restore_params(run.step, rt.restore_target.params, expect=expect)
    finally:
        run.checkpoints.close()
    return RestoredRun(dataclasses.replace(rt.cfg, model=rt.model_cfg), run.tokenizer, rt, params, run.step)


def restore_run(run_dir: str | pathlib.Path, step: int | str | None = None,
                batch_size: int | None = None) -> RestoredRun:
    """Restores `run_dir`'s checkpoint at `step` (default newest; BEST: see `open_run`) onto all local
    devices, data-parallel."""
    return load_params(open_run(run_dir, step, batch_size))
