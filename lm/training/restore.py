"""Reopens a run directory for inference: its config, tokenizer, a Runtime and one checkpoint's params.

`restore_run(run_dir)` is also `lm.restore_run`: the way into a trained (or imported) run from Python.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax

from lm import config as config_lib
from lm import rundir
from lm.data.tokenizers import Tokenizer, load_tokenizer
from lm.errors import LMError
from lm.parallel.cpu import split_cpu
from lm.training.checkpoint import Checkpoints
from lm.training.optim import evaluated_apart
from lm.training.runtime import Runtime, build


@dataclasses.dataclass
class RestoredRun:
    """A run's checkpoint, restored: what evaluation, generation and export work from."""

    cfg: config_lib.Config  # with model.vocab_size resolved
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


def open_run(run_dir: str | pathlib.Path, step: int | None = None, batch_size: int | None = None) -> OpenRun:
    """Reads `run_dir`'s config, tokenizer and checkpoint list; picks `step` (default newest).

    The config is laid out data-parallel over all local devices, with the batch (default
    eval.batch_size or train.batch_size) rounded up so every device gets a share.
    """
    run_dir = pathlib.Path(run_dir)
    cfg = rundir.read_config(run_dir)
    batch_size = batch_size or cfg.eval.batch_size or cfg.train.batch_size
    cfg = config_lib.replace(cfg, **{"parallel.mode": "mesh", "parallel.data": -1, "parallel.fsdp": 1,
                                     "parallel.tensor": 1, "train.batch_size": batch_size,
                                     "eval.batch_size": batch_size, "train.grad_accum_steps": 1})
    split_cpu(cfg)
    tokenizer = load_tokenizer(run_dir)
    ckpts = Checkpoints(run_dir / rundir.CHECKPOINT_DIR, read_only=True)
    step = ckpts.latest() if step is None else step
    if step is None:
        raise LMError(f"'{run_dir}' has no checkpoints yet; train it first (python train.py ... run_dir={run_dir}).")
    ways = jax.device_count()
    batch_size = -(-batch_size // ways) * ways
    cfg = config_lib.replace(cfg, **{"train.batch_size": batch_size, "eval.batch_size": batch_size})
    return OpenRun(cfg, tokenizer, ckpts, int(step))


def load_params(run: OpenRun) -> RestoredRun:
    """Builds the runtime and restores the chosen step's parameters to evaluate, checking model and tokenizer."""
    rt = build(run.cfg, run.tokenizer)
    expect = {"tokenizer": run.tokenizer.to_json(), "model": config_lib.to_dict(rt.cfg)["model"]}
    try:
        if evaluated_apart(rt.cfg.optim):  # schedule-free: its average, from params and optimizer state
            state, _ = run.checkpoints.restore_state(run.step, rt.restore_target, expect=expect)
            params = rt.eval_params(state.params, state.opt_state)
        else:
            params, _ = run.checkpoints.restore_params(run.step, rt.restore_target.params, expect=expect)
    finally:
        run.checkpoints.close()
    return RestoredRun(rt.cfg, run.tokenizer, rt, params, run.step)


def restore_run(run_dir: str | pathlib.Path, step: int | None = None, batch_size: int | None = None) -> RestoredRun:
    """Restores `run_dir`'s checkpoint at `step` (default newest) onto all local devices, data-parallel."""
    return load_params(open_run(run_dir, step, batch_size))
