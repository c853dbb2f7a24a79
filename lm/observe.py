"""What a run shows while it trains: TensorBoard events, a progress bar, profiler traces, samples.

TensorBoard events are written with tensorboardX (no TensorFlow). Traces are
`jax.profiler` traces under `run_dir/profile`, viewable in TensorBoard's profile plugin
or in Perfetto (ui.perfetto.dev, the `*.trace.json.gz` file).
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import numpy as np

SCALARS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu")
PROFILE_DIR = "profile"


class TensorBoard:
    """Scalars and text samples as TensorBoard event files in run_dir; process 0 only.

    On resume, events a killed run logged past `resume_step` are hidden (purge_step).
    """

    def __init__(self, run_dir: pathlib.Path, resume_step: int, enabled: bool = True):
        self.writer = None
        if enabled and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir), purge_step=resume_step or None, flush_secs=30)

    def scalars(self, record: dict) -> None:
        if self.writer:
            for key in SCALARS:
                if record.get(key) is not None:
                    self.writer.add_scalar(key, record[key], record["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)  # markdown code block

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A one-line progress bar with ETA on a terminal; nothing extra when output is not one.

    Logged lines are printed either way (the bar is redrawn below them on a terminal).
    """

    def __init__(self, start: int, total: int, stream=None, width: int = 24):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start, self.total, self.width = start, total, width
        self.started = time.perf_counter()
        self.first = None  # (step, time) of the first update: the rate excludes compilation
        self.step, self.bar = start, ""

    def line(self, text: str) -> None:
        if self.tty and self.bar:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        if self.tty and self.bar:
            self.stream.write(self.bar)
        self.stream.flush()

    def update(self, step: int, summary: str = "") -> None:
        self.step = step
        if not self.tty:
            return
        now = time.perf_counter()
        self.first = self.first or (step, now)
        elapsed, (first_step, first_time) = now - self.started, self.first
        rate = (step - first_step) / (now - first_time) if step > first_step else 0.0
        eta = (self.total - step) / rate if rate else 0.0
        filled = int(self.width * (step / max(self.total, 1)))
        self.bar = (f"{step}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] "
                    f"{_duration(elapsed)}<{_duration(eta)} {summary}").rstrip()
        self.stream.write("\r\033[K" + self.bar)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.bar:
            self.stream.write("\n")
            self.stream.flush()


class Profiler:
    """Traces steps [start_step, start_step + steps) with jax.profiler into run_dir/profile."""

    def __init__(self, run_dir: pathlib.Path, start_step: int, steps: int):
        self.directory = run_dir / PROFILE_DIR
        self.start, self.stop = start_step, start_step + steps
        self.active = False

    def before_step(self, step: int) -> None:
        if step == self.start and self.stop > self.start and not self.active:
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after_step(self, done: int, state) -> None:
        if self.active and done >= self.stop:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def sample_text(params, model_cfg, prompt_P: np.ndarray, tokenizer, new_tokens: int) -> str:
    """Decoded prompt + its greedy continuation (lm.generate, with the KV cache)."""
    from lm.generate import generate

    new_tokens = min(new_tokens, model_cfg.max_seq_len - len(prompt_P))
    continuation = generate(params, model_cfg, prompt_P, new_tokens)[0]
    return tokenizer.decode(np.concatenate([prompt_P, continuation]).tolist())
