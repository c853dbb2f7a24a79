"""The training loop: init or resume, step, log, validate, checkpoint.

Running the same command again on a run_dir resumes from its newest checkpoint and
continues exactly: dropout is a function of (seed, step), and the data source either is
too (random windows) or restores its position from the checkpoint (packed documents).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import numpy as np

from lm import config as config_lib
from lm.checkpoint import Checkpoints
from lm.config import Config
from lm.errors import LMError
from lm.runtime import Runtime, build
from lm.data import make_data, run_tokenizer
from lm.sharding import maybe_initialize_distributed

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Sections that must not change when resuming: they define the checkpoint's shapes.
FROZEN_KEYS = ("model", "data.tokenizer")


def prepare_run_dir(cfg: Config) -> pathlib.Path:
    """Creates run_dir (or checks an existing run matches the config) and writes config.yaml."""
    run_dir = pathlib.Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LMError(f"run_dir '{run_dir}' is a file; pass a directory path with run_dir=PATH.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LMError(f"cannot create run_dir '{run_dir}' ({e.strerror}); choose a writable run_dir.") from None
    if not os.access(run_dir, os.W_OK):
        raise LMError(f"run_dir '{run_dir}' is not writable; choose a writable run_dir.")
    saved = run_dir / CONFIG_FILE
    if saved.exists() and (run_dir / CHECKPOINT_DIR).exists():
        _check_resumable(config_lib.load_config(saved), cfg, run_dir)
    if jax.process_index() == 0:
        config_lib.save_config(cfg, saved)
    return run_dir


def _check_resumable(old: Config, new: Config, run_dir: pathlib.Path) -> None:
    old_flat, new_flat = config_lib.flatten(config_lib.to_dict(old)), config_lib.flatten(config_lib.to_dict(new))
    for key in old_flat:
        if key.startswith(FROZEN_KEYS) and old_flat[key] != new_flat[key]:
            raise LMError(f"run_dir '{run_dir}' holds a run with {key}={old_flat[key]!r} but this config has "
                          f"{new_flat[key]!r}; use the run's config or a new run_dir.")


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) plus console lines; process 0 only."""

    def __init__(self, run_dir: pathlib.Path, resume_step: int, total_steps: int):
        self.path = run_dir / METRICS_FILE
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0
        if self.enabled and self.path.exists():  # drop records a killed run logged past its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {record['step']:>6}/{self.total_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val_loss {:.4f}"), ("lr", "lr {:.2e}"),
                         ("grad_norm", "grad {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
                         ("eta_sec", "eta {:.0f}s")):
            if key in record:
                parts.append(fmt.format(record[key]))
        print(" | ".join(parts), flush=True)


def validation_loss(rt: Runtime, params, data) -> float:
    """Mean loss over eval.batches fixed validation batches (nanoGPT's estimate)."""
    total, weight = 0.0, 0.0
    for local in data.val_batches(rt.cfg.eval.batch_size or rt.cfg.train.batch_size):
        loss_sum, weight_sum = rt.eval_step(params, rt.place_batch(local))
        total, weight = total + float(loss_sum), weight + float(weight_sum)
    return total / weight


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(cfg: Config) -> list[dict]:
    """Trains (or resumes) the run described by `cfg`; returns the records it logged."""
    maybe_initialize_distributed(cfg.parallel)
    run_dir = prepare_run_dir(cfg)
    tokenizer = run_tokenizer(cfg, run_dir)
    data = make_data(cfg, tokenizer)
    rt = build(cfg, tokenizer)
    cfg = rt.cfg
    ckpts = Checkpoints(run_dir / CHECKPOINT_DIR, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = ckpts.latest() or 0
    if start:
        state, saved = ckpts.restore_state(start, rt.restore_target)
        state = state.replace(step=rt.place_step(start))
        data.restore(saved.get("data"))
        print(f"resumed from {ckpts.directory}/{start}", flush=True)
    else:
        state = rt.init(jax.random.key(cfg.seed))
    log = MetricsLog(run_dir, start, cfg.train.steps)
    meta = {"tokenizer": tokenizer.to_json(), "model": config_lib.to_dict(cfg)["model"]}
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    records, pending = [], None
    last_time, last_step = time.perf_counter(), start

    def flush():
        nonlocal pending, last_time, last_step
        if pending is None:
            return
        step, metrics = pending
        record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        now = time.perf_counter()
        rate = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
        record.update(tokens_per_sec=rate, eta_sec=(cfg.train.steps - step) * tokens_per_step / rate)
        last_time, last_step, pending = now, step, None
        records.append(record)
        log.write(record)

    for step in range(start, cfg.train.steps):
        state, metrics = rt.train_step(state, rt.place_batch(data.batch(step)))
        flush()  # the previous step's metrics, read while this step runs
        done = step + 1
        if _is_due(done, cfg.log.every, cfg.train.steps) or done == start + 1:
            pending = (done, metrics)
        if cfg.eval.every and _is_due(done, cfg.eval.every, cfg.train.steps):
            flush()
            record = {"step": done, "val_loss": validation_loss(rt, state.params, data)}
            records.append(record)
            log.write(record)
            last_time = time.perf_counter()
        if _is_due(done, cfg.checkpoint.every, cfg.train.steps):
            ckpts.save(state, {"step": done, **meta, "data": data.state()})
    flush()
    ckpts.wait()
    ckpts.close()
    return records
