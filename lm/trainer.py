"""The training loop: init or resume, step, log, validate, checkpoint.

Running the same command again on a run_dir resumes from its newest checkpoint and
continues exactly: batches are a function of (seed, step) and so is dropout.
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
from lm.metrics import flops_per_token, mfu, peak_flops
from lm.observe import Profiler, Progress, TensorBoard, make_sampler, sample_text
from lm.runtime import Runtime, build
from lm.sharding import host_rows, maybe_initialize_distributed
from lm.text_data import TRAIN_STREAM, VAL_STREAM, TextData, random_windows
from lm.tokenizer import make_tokenizer, save_tokenizer

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
    """metrics.jsonl (one JSON object per logged step), TensorBoard events, console lines and
    a progress bar (on a terminal); process 0 only."""

    def __init__(self, run_dir: pathlib.Path, resume_step: int, total_steps: int, tensorboard: bool = True):
        self.path = run_dir / METRICS_FILE
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0
        if self.enabled and self.path.exists():  # drop records a killed run logged past its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = TensorBoard(run_dir, resume_step, tensorboard and self.enabled)
        self.progress = Progress(resume_step, total_steps)
        self.summary = ""

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.tensorboard.scalars(record)
        parts = [f"step {record['step']:>6}/{self.total_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val_loss {:.4f}"), ("lr", "lr {:.2e}"),
                         ("grad_norm", "grad {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
                         ("mfu", "mfu {:.2%}"), ("eta_sec", "eta {:.0f}s")):
            if record.get(key) is not None:
                parts.append(fmt.format(record[key]))
        if "loss" in record:
            self.summary = f"loss {record['loss']:.4f} | {record['tokens_per_sec']:,.0f} tok/s"
        self.progress.line(" | ".join(parts))

    def step(self, done: int) -> None:
        if self.enabled:
            self.progress.update(done, self.summary)

    def close(self) -> None:
        self.progress.close()
        self.tensorboard.close()


def validation_loss(rt: Runtime, params, data: TextData) -> float:
    """Mean loss over eval.batches fixed random validation batches (nanoGPT's estimate)."""
    cfg = rt.cfg
    batch_size = cfg.eval.batch_size or cfg.train.batch_size
    total, weight = 0.0, 0.0
    for i in range(cfg.eval.batches):
        local = random_windows(data.val, cfg.seed, i, VAL_STREAM, batch_size, cfg.train.seq_len,
                               host_rows(batch_size))
        loss_sum, weight_sum = rt.eval_step(params, rt.place_batch(local))
        total, weight = total + float(loss_sum), weight + float(weight_sum)
    return total / weight


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(cfg: Config) -> list[dict]:
    """Trains (or resumes) the run described by `cfg`; returns the records it logged."""
    maybe_initialize_distributed(cfg.parallel)
    run_dir = prepare_run_dir(cfg)
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    data = TextData.load(cfg.data, tokenizer, cfg.train.seq_len)
    if jax.process_index() == 0:
        save_tokenizer(tokenizer, run_dir)
    rt = build(cfg, tokenizer)
    cfg = rt.cfg
    ckpts = Checkpoints(run_dir / CHECKPOINT_DIR, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = ckpts.latest() or 0
    if start:
        state, _ = ckpts.restore_state(start, rt.restore_target)
        state = state.replace(step=rt.place_step(start))
        print(f"resumed from {ckpts.directory}/{start}", flush=True)
    else:
        state = rt.init(jax.random.key(cfg.seed))
    log = MetricsLog(run_dir, start, cfg.train.steps, cfg.log.tensorboard)
    flops_per_tok = flops_per_token(cfg.model, cfg.train.seq_len)
    total_peak, _ = peak_flops(list(rt.mesh.devices.flat), cfg.model.dtype)
    profiler = Profiler(run_dir, cfg.profile.start_step, cfg.profile.steps)
    prompt_P = data.val[:max(1, min(16, cfg.train.seq_len - cfg.log.sample_tokens))]
    sampler = make_sampler(rt.model, len(prompt_P), min(cfg.log.sample_tokens, cfg.train.seq_len - len(prompt_P)))
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
        record.update(tokens_per_sec=rate, mfu=mfu(rate, flops_per_tok, total_peak),
                      eta_sec=(cfg.train.steps - step) * tokens_per_step / rate)
        last_time, last_step, pending = now, step, None
        records.append(record)
        log.write(record)

    for step in range(start, cfg.train.steps):
        local = random_windows(data.train, cfg.seed, step, TRAIN_STREAM, cfg.train.batch_size,
                               cfg.train.seq_len, host_rows(cfg.train.batch_size))
        profiler.before_step(step)
        state, metrics = rt.train_step(state, rt.place_batch(local))
        flush()  # the previous step's metrics, read while this step runs
        done = step + 1
        profiler.after_step(done, state)
        log.step(done)
        if _is_due(done, cfg.log.every, cfg.train.steps) or done == start + 1:
            pending = (done, metrics)
        if cfg.eval.every and _is_due(done, cfg.eval.every, cfg.train.steps):
            flush()
            record = {"step": done, "val_loss": validation_loss(rt, state.params, data)}
            total_peak, _ = peak_flops(list(rt.mesh.devices.flat), cfg.model.dtype, refresh=True)
            records.append(record)
            log.write(record)
            if cfg.log.sample_tokens and cfg.log.tensorboard:
                log.tensorboard.text("sample", sample_text(sampler, state.params, prompt_P, tokenizer), done)
            last_time = time.perf_counter()
        if _is_due(done, cfg.checkpoint.every, cfg.train.steps):
            ckpts.save(state, {"step": done, **meta})
    flush()
    profiler.close()
    log.close()
    ckpts.wait()
    ckpts.close()
    return records
