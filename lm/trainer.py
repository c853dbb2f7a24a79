"""The training loop: init or resume, step, log, validate, checkpoint.

Running the same command again on a run_dir resumes from its newest checkpoint and
continues exactly: dropout is a function of (seed, step), and the data source either is
too (random windows) or restores its position from the checkpoint (packed documents).
SIGTERM checkpoints the current step and exits 0 (lm.preemption); a NaN/Inf step stops
the run before anything diverged is checkpointed, or is skipped (lm.nonfinite).
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
from lm.cpu_devices import split_cpu
from lm.data import make_data, run_tokenizer
from lm.errors import LMError
from lm.fileio import write_atomic
from lm.metrics import flops_per_token, mfu, peak_flops
from lm.nonfinite import NonfiniteWatch
from lm.observe import Profiler, Progress, TensorBoard, sample_text
from lm.preemption import Preemption
from lm.runtime import Runtime, build
from lm.sharding import maybe_initialize_distributed
from lm.tokenizer import save_tokenizer

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Sections that must not change when resuming: they define the checkpoint's shapes.
FROZEN_KEYS = ("model", "data.tokenizer")


def prepare_run_dir(cfg: Config) -> pathlib.Path:
    """Creates run_dir, or checks that the run already in it matches the config."""
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
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
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
                         ("mfu", "mfu {:.2%}"), ("eta_sec", "eta {:.0f}s"), ("skipped_steps", "skipped {}")):
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


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line a kill cut short (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


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
    split_cpu(cfg)
    maybe_initialize_distributed(cfg.parallel)
    preemption = Preemption(cfg.train.preemption_grace_s)
    try:
        return _train(cfg, preemption)
    finally:
        preemption.close()


def _train(cfg: Config, preemption: Preemption) -> list[dict]:
    # The run's own tokenizer when resuming (or for a model imported with python -m lm.hf import).
    tokenizer = run_tokenizer(cfg, pathlib.Path(cfg.run_dir))
    rt = build(cfg, tokenizer)
    data = make_data(rt.cfg, tokenizer, rt.host_rows)  # before anything is written
    run_dir = prepare_run_dir(cfg)
    ckpts = Checkpoints(run_dir / CHECKPOINT_DIR, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    meta = {"tokenizer": tokenizer.to_json(), "model": config_lib.to_dict(rt.cfg)["model"]}
    try:
        latest, skipped = ckpts.latest(), 0  # step 0 is an imported model's weights
        start = latest or 0
        if latest is not None:
            state, saved = ckpts.restore_state(start, rt.restore_target, expect=meta)
            state, skipped = state.replace(step=rt.place_step(start)), saved.get("skipped_steps", 0)
            data.restore(saved.get("data"))
            print(f"resumed from {ckpts.directory}/{start}", flush=True)
        else:
            state = rt.init(jax.random.key(cfg.seed))
        if jax.process_index() == 0:  # written once the run is known to start (a failed start changes nothing)
            config_lib.save_config(cfg, run_dir / CONFIG_FILE)
            save_tokenizer(tokenizer, run_dir)
            print(rt.describe(), flush=True)
        watch = NonfiniteWatch(cfg.train.skip_nonfinite, skipped)
        return _loop(rt, data, run_dir, ckpts, preemption, state, start, watch, meta)
    finally:
        ckpts.close()  # waits for a checkpoint still being written


def _loop(rt: Runtime, data, run_dir: pathlib.Path, ckpts: Checkpoints, preemption: Preemption,
          state, start: int, watch: NonfiniteWatch, meta: dict) -> list[dict]:
    """Steps from `start` to train.steps, logging, validating and checkpointing on schedule."""
    cfg = rt.cfg
    log = MetricsLog(run_dir, start, cfg.train.steps, cfg.log.tensorboard)
    profiler = Profiler(run_dir, cfg.profile.start_step, cfg.profile.steps)
    try:
        return _steps(rt, data, ckpts, preemption, state, start, watch, meta, log, profiler)
    finally:
        profiler.close()
        log.close()


def _sample_prompt(rt: Runtime, data) -> np.ndarray:
    """The first tokens of the first validation row: the prompt of the text samples."""
    cfg = rt.cfg
    row = next(iter(data.val_batches(cfg.eval.batch_size or cfg.train.batch_size)))["inputs"][0]
    return row[:max(1, min(16, cfg.model.max_seq_len // 2))]


def _steps(rt: Runtime, data, ckpts: Checkpoints, preemption: Preemption, state, start: int,
           watch: NonfiniteWatch, meta: dict, log: MetricsLog, profiler: Profiler) -> list[dict]:
    cfg, tokenizer = rt.cfg, data.tokenizer
    flops_per_tok = flops_per_token(cfg.model, cfg.train.seq_len)
    total_peak, _ = peak_flops(list(rt.mesh.devices.flat), cfg.model.dtype)
    prompt_P = _sample_prompt(rt, data)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    records, pending = [], None
    last_time, last_step, preempted = time.perf_counter(), start, False

    def flush():
        nonlocal pending, last_time, last_step
        if pending is None:
            return
        step, metrics = pending
        watch.check(step)
        record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite"}}
        if cfg.train.skip_nonfinite:
            record["skipped_steps"] = watch.skipped
        now = time.perf_counter()
        rate = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
        record.update(tokens_per_sec=rate, mfu=mfu(rate, flops_per_tok, total_peak),
                      eta_sec=(cfg.train.steps - step) * tokens_per_step / rate)
        last_time, last_step, pending = now, step, None
        records.append(record)
        log.write(record)

    previous = None
    for step in range(start, cfg.train.steps):
        profiler.before_step(step)
        state, metrics = rt.train_step(state, rt.place_batch(data.batch(step)))
        done = step + 1
        watch.add(done, metrics["nonfinite"])
        # The host stays at most one step ahead: it waits for the previous step while this one
        # runs. (A deeper queue gains nothing, and can deadlock XLA:CPU's in-process all-reduce.)
        jax.block_until_ready(previous)
        previous = metrics
        flush()  # the previous step's metrics, read while this step runs
        profiler.after_step(done, state)
        log.step(done)
        if _is_due(done, cfg.log.every, cfg.train.steps) or done == start + 1:
            pending = (done, metrics)
        if cfg.eval.every and _is_due(done, cfg.eval.every, cfg.train.steps):
            flush()
            watch.check(done)
            record = {"step": done, "val_loss": validation_loss(rt, state.params, data)}
            total_peak, _ = peak_flops(list(rt.mesh.devices.flat), cfg.model.dtype, refresh=True)
            records.append(record)
            log.write(record)
            if cfg.log.sample_tokens and cfg.log.tensorboard:
                text = sample_text(state.params, cfg.model, prompt_P, tokenizer, cfg.log.sample_tokens)
                log.tensorboard.text("sample", text, done)
            last_time = time.perf_counter()
        preempted = preemption.reached(done)
        if preempted or _is_due(done, cfg.checkpoint.every, cfg.train.steps):
            watch.check(done)  # never checkpoint a diverged state
            ckpts.save(state, {"step": done, "skipped_steps": watch.skipped, **meta, "data": data.state()})
        if preempted:
            break
    flush()
    watch.check(cfg.train.steps)
    ckpts.wait()
    if preempted:
        print(f"preempted: checkpoint at step {done} written; run the same command to resume.", flush=True)
    return records
