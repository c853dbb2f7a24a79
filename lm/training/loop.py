"""The training loop: init or resume, step, log, validate, checkpoint.

Running the same command again on a run_dir resumes from its newest checkpoint and
continues exactly: dropout is a function of (seed, step), and the data source either is
too (random windows) or restores its position from the checkpoint (packed documents, and
every source of a mixture with the tokens drawn from each so far).
SIGTERM checkpoints the current step and exits 0, Ctrl-C does too and then raises
lm.errors.Interrupted; a NaN/Inf step stops the run before anything diverged is
checkpointed, or is skipped (lm.training.guards). With checkpoint.keep_best
every validation that beats the best so far is checkpointed too, and that step is kept.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import jax
import numpy as np

from lm import config as config_lib
from lm import rundir, storage
from lm.config import Config
from lm.data import make_data, run_tokenizer
from lm.data.tokenizers import save_tokenizer
from lm.errors import Interrupted, LMError
from lm.model.decode import Sampling, generate
from lm.observe.flops import flops_per_token, mfu, peak_flops
from lm.observe.log import MetricsLog
from lm.observe.profiler import Profiler
from lm.parallel.cpu import split_cpu
from lm.parallel.mesh import maybe_initialize_distributed
from lm.training.checkpoint import Checkpoints
from lm.training.guards import NonfiniteWatch, Preemption
from lm.training.optim import make_optimizer, warmup_warning
from lm.training.runtime import Runtime, build


def train(cfg: Config) -> list[dict]:
    """Trains (or resumes) the run described by `cfg`; returns the records it logged."""
    run_path = storage.path(cfg.run_dir, "run_dir")  # a bucket's package and access, checked first
    # -- Devices: split the CPU into one device per core, join the other hosts (before JAX starts).
    split_cpu(cfg)
    maybe_initialize_distributed(cfg.parallel)

    # -- A resume the run in run_dir cannot make is refused before anything is built.
    existing = _saved_run(cfg, run_path)
    if existing and existing[1] == cfg.train.steps:
        print(f"run_dir '{cfg.run_dir}' is already at step {existing[1]} = train.steps: nothing to train; "
              f"raise train.steps to continue it.", flush=True)
        return []

    with contextlib.ExitStack() as cleanup:  # closed in reverse: profiler, log, checkpoints, preemption
        preemption = cleanup.enter_context(contextlib.closing(Preemption(cfg.train.preemption_grace_s)))

        # -- Build: the run's own tokenizer when resuming (or for an imported model), the
        #    compiled steps and the data, all before anything is written.
        tokenizer = run_tokenizer(cfg, run_path)
        rt = build(cfg, tokenizer)
        data = make_data(rt.cfg, tokenizer, rt.host_rows)
        if preemption.interrupted:
            raise Interrupted("interrupted before training started; nothing was written.")
        run_dir = rundir.prepare(cfg)
        ckpts = cleanup.enter_context(contextlib.closing(Checkpoints(
            run_dir / rundir.CHECKPOINT_DIR, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
            keep_best=cfg.checkpoint.keep_best)))
        meta = {"tokenizer": tokenizer.to_json(), "model": config_lib.to_dict(rt.cfg)["model"]}

        # -- Resume from the newest checkpoint (step 0 is an imported model's weights), or init.
        start, saved = ckpts.latest(), {}
        if start is not None:
            state, saved = ckpts.restore_state(start, rt.restore_target, expect=rundir.restorable(meta))
            state = state.replace(step=rt.place_step(start))
            data.restore(saved.get("data"))
            print(f"resumed from {ckpts.directory}/{start}", flush=True)
            if existing:
                _note_schedule_change(existing[0], cfg, start)
        else:
            start, state = 0, rt.init(jax.random.key(cfg.seed))
        if jax.process_index() == 0:  # written once the run is known to start (a failed start changes nothing)
            rundir.save_config(cfg, run_dir)
            save_tokenizer(tokenizer, run_dir)
            print(rt.describe(), flush=True)
            if warning := warmup_warning(cfg.optim, cfg.train.steps):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        watch = NonfiniteWatch(cfg.train.skip_nonfinite, saved.get("skipped_steps", 0), cfg.train.max_consecutive_skips,
                               saved.get("consecutive_skips", 0))
        log = cleanup.enter_context(contextlib.closing(MetricsLog(run_dir, start, cfg.train.steps,
                                                                  cfg.log.tensorboard)))
        profiler = cleanup.enter_context(contextlib.closing(Profiler(run_dir, cfg.profile.start_step,
                                                                     cfg.profile.steps)))

        # -- Throughput bookkeeping: model FLOPs per token against the devices' peak.
        flops_per_tok = flops_per_token(rt.cfg.model, cfg.train.seq_len)
        total_peak, _ = peak_flops(list(rt.mesh.devices.flat), rt.model_cfg.dtype)
        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        samples = bool(cfg.eval.every and cfg.log.sample_tokens and cfg.log.tensorboard)
        prompt_P = _sample_prompt(rt, data) if samples else None
        records, pending, previous = [], None, None
        last_time, last_step, preempted, done = time.perf_counter(), start, False, start
        best_val_loss = (ckpts.best() or (None, math.inf))[1]  # the kept checkpoints' lowest

        def flush():
            """Logs the pending step's metrics (read from the device only now)."""
            nonlocal pending, last_time, last_step
            if pending is None:
                return
            step, metrics, tokens_by_source = pending
            watch.check(step)
            record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite"}}
            if tokens_by_source:
                record["tokens_by_source"] = tokens_by_source
            if cfg.train.skip_nonfinite:
                record["skipped_steps"] = watch.skipped
            now = time.perf_counter()
            rate = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
            record.update(tokens_per_sec=rate, mfu=mfu(rate, flops_per_tok, total_peak),
                          eta_sec=(cfg.train.steps - step) * tokens_per_step / rate)  # compiling excluded
            last_time, last_step, pending = now, step, None
            records.append(record)
            log.write(record)

        # -- The loop. The host stays at most one step ahead: it reads step n-1's metrics while
        #    step n runs. (A deeper queue gains nothing, and can deadlock XLA:CPU's in-process all-reduce.)
        for step in range(start, cfg.train.steps):
            profiler.before_step(step)
            state, metrics = rt.train_step(state, rt.place_batch(data.batch(step)))
            if step == start:  # the first call compiled the step (and returned once it ran on): time from here
                last_time = time.perf_counter()
            done = step + 1
            watch.add(done, metrics["nonfinite"])
            jax.block_until_ready(previous)
            previous = metrics
            flush()
            profiler.after_step(done, state)
            log.step(done)
            if _is_due(done, cfg.log.every, cfg.train.steps) or done == start + 1:
                pending = (done, metrics, dict(data.tokens_by_source))

            # -- Validation: nanoGPT's estimate over eval.batches fixed batches (of each source of a
            #    mixture), and a text sample.
            val_loss = None
            if cfg.eval.every and _is_due(done, cfg.eval.every, cfg.train.steps):
                flush()
                watch.check(done)
                params = rt.eval_params(state.params, state.opt_state)  # schedule-free: its average
                val_loss, by_source = validation_loss(rt, params, data)
                record = {"step": done, "val_loss": val_loss}
                if data.source_names:
                    record.update(val_loss_by_source=by_source, tokens_by_source=dict(data.tokens_by_source))
                records.append(record)
                log.write(record)
                if samples:
                    log.tensorboard.text("sample", sample_text(rt, params, prompt_P, tokenizer), done)
                last_time = time.perf_counter()

            # -- Checkpoint on schedule, at a new best validation loss (checkpoint.keep_best), and on
            #    preemption (then stop).
            improved = val_loss is not None and val_loss < best_val_loss
            best_val_loss = val_loss if improved else best_val_loss
            preempted = preemption.reached(done)
            if preempted or _is_due(done, cfg.checkpoint.every, cfg.train.steps) or (
                    improved and cfg.checkpoint.keep_best):
                flush()  # the step's record is logged before its checkpoint
                watch.check(done)  # never checkpoint a diverged state
                ckpts.save(state, {"step": done, "skipped_steps": watch.skipped, "consecutive_skips": watch.consecutive,
                                   **meta, "data": data.state()},
                           val_loss=val_loss)
                log.sync()  # metrics.jsonl in a bucket is uploaded whole (lm.storage.Lines)
            if preempted:
                break
        flush()
        watch.check(cfg.train.steps)
        ckpts.wait()
        if preempted:
            message = f"checkpoint at step {done} written; run the same command to resume."
            if preemption.interrupted:
                raise Interrupted(f"interrupted: {message}")
            print(f"preempted: {message}", flush=True)
        return records


def _saved_run(cfg: Config, run_dir) -> tuple[Config, int] | None:
    """(config, newest checkpoint step) of the run already in `run_dir` (cfg.run_dir as a path), or None;
    refuses a config that run cannot continue under (rundir.check_resumable) and a train.steps below its step."""
    if not ((run_dir / rundir.CONFIG_FILE).is_file() and (run_dir / rundir.CHECKPOINT_DIR).is_dir()):
        return None
    old = rundir.read_config(run_dir)
    rundir.check_resumable(old, cfg, run_dir)
    ckpts = Checkpoints(run_dir / rundir.CHECKPOINT_DIR, read_only=True)
    try:
        step = ckpts.latest()
    finally:
        ckpts.close()
    if step is None:
        return None
    if step > cfg.train.steps:
        raise LMError(f"run_dir '{run_dir}' is at step {step}, past train.steps={cfg.train.steps}; raise "
                      f"train.steps above {step} to continue it, or pass a new run_dir to start over.")
    return old, step


def _note_schedule_change(old: Config, new: Config, step: int) -> None:
    """One line when the resumed config's learning rate for step+1 differs from the run's own schedule
    (e.g. a finished run extended with a higher train.steps: the cosine decay restretches)."""
    was, now = (float(make_optimizer(c.optim, c.train.steps)[1](step)) for c in (old, new))
    if abs(now - was) <= 1e-6 * max(abs(was), abs(now)):
        return
    hint = ""
    if old.train.steps != new.train.steps and not new.optim.decay_steps:
        hint = (f" (train.steps {old.train.steps} -> {new.train.steps}; optim.decay_steps=0 follows train.steps: "
                f"set optim.decay_steps={old.optim.decay_steps or old.train.steps} to keep the run's schedule)")
    print(f"note: the learning rate of step {step + 1} is {now:.3g} under this config, {was:.3g} under the run's "
          f"config.yaml{hint}.", flush=True)


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def validation_loss(rt: Runtime, params, data) -> tuple[float, dict[str, float]]:
    """Mean loss over eval.batches fixed validation batches (nanoGPT's estimate), and that of each mixture
    source's own batches (the first is then their token-weighted mean)."""
    batch_size = rt.cfg.eval.batch_size or rt.cfg.train.batch_size
    sums = {}
    for name in data.source_names or (None,):
        total, weight = 0.0, 0.0
        for local in data.val_batches(batch_size, name):
            loss_sum, weight_sum = rt.eval_step(params, rt.place_batch(local))
            total, weight = total + float(loss_sum), weight + float(weight_sum)
        sums[name] = (total, weight)
    overall = sum(total for total, _ in sums.values()) / sum(weight for _, weight in sums.values())
    return overall, {name: total / weight for name, (total, weight) in sums.items() if name is not None}


def _sample_prompt(rt: Runtime, data) -> np.ndarray:
    """The first tokens of the first validation row: the prompt of the text samples."""
    cfg = rt.cfg
    row = next(iter(data.val_batches(cfg.eval.batch_size or cfg.train.batch_size)))["inputs"][0]
    return row[:max(1, min(16, cfg.model.max_seq_len // 2))]


def sample_text(rt: Runtime, params, prompt_P: np.ndarray, tokenizer) -> str:
    """Decoded prompt + its greedy continuation of log.sample_tokens tokens (with the KV cache)."""
    continuation = generate(params, rt.model_cfg, prompt_P, rt.cfg.log.sample_tokens, Sampling(temperature=0.0))[0]
    return tokenizer.decode(np.concatenate([prompt_P, continuation]).tolist())
