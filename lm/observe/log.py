"""What a run logs while it trains: metrics.jsonl, TensorBoard events, console lines, a progress bar.

TensorBoard events are written with tensorboardX (no TensorFlow); a mixture's per-source
values (`val_loss_by_source`, `tokens_by_source` in metrics.jsonl) become the scalars
`val_loss/NAME` and `tokens/NAME`.

In a gs:// run_dir, metrics.jsonl is uploaded whole (objects cannot be appended to) with each
checkpoint and at most every 30 s between them, so a killed run loses only records past its last
checkpoint, which a resume drops anyway; tensorboardX writes events there itself (through
google-cloud-storage), re-uploading the event file at each flush.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

import jax

from lm import jsonsafe
from lm.rundir import METRICS_FILE
from lm.storage import Lines, write_atomic

SCALARS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu")
BY_SOURCE = {"val_loss_by_source": "val_loss", "tokens_by_source": "tokens"}  # {name: value} -> tag/name


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch, when it is
    installed, only to accept torch tensors (seconds of start-up); lm logs Python floats."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoard:
    """Scalars and text samples as TensorBoard event files in run_dir; process 0 only.

    On resume, events a killed run logged past `resume_step` are hidden (purge_step).
    """

    def __init__(self, run_dir: pathlib.Path, resume_step: int, enabled: bool = True):
        self.writer = None
        if enabled and jax.process_index() == 0:
            self.writer = _summary_writer()(str(run_dir), purge_step=resume_step or None, flush_secs=30)
            # tensorboardX warns "NaN or Inf found in input tensor." for every such scalar it logs (and
            # logs it); the run's own divergence message says what happened, once.
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

    def scalars(self, record: dict) -> None:
        if self.writer:
            for key in SCALARS:
                if record.get(key) is not None:
                    self.writer.add_scalar(key, record[key], record["step"])
            for key, tag in BY_SOURCE.items():
                for name, value in record.get(key, {}).items():
                    self.writer.add_scalar(f"{tag}/{name}", value, record["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)  # markdown code block

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

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
        self.lines = Lines(self.path) if self.enabled else None
        self.tensorboard = TensorBoard(run_dir, resume_step, tensorboard and self.enabled)
        self.progress = Progress(resume_step, total_steps)
        self.summary = ""

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.lines.write(jsonsafe.dumps(record) + "\n")
        self.tensorboard.scalars(record)
        parts = [f"step {record['step']:>6}/{self.total_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val_loss {:.4f}"), ("lr", "lr {:.2e}"),
                         ("grad_norm", "grad {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
                         ("mfu", "mfu {:.2%}"), ("eta_sec", "eta {:.0f}s"), ("skipped_steps", "skipped {}")):
            if record.get(key) is not None:
                parts.append(fmt.format(record[key]))
        if record.get("val_loss_by_source"):
            parts.insert(2, " ".join(f"{name} {loss:.4f}" for name, loss in record["val_loss_by_source"].items()))
        if "loss" in record:
            self.summary = f"loss {record['loss']:.4f} | {record['tokens_per_sec']:,.0f} tok/s"
        self.progress.line(" | ".join(parts))

    def step(self, done: int) -> None:
        if self.enabled:
            self.progress.update(done, self.summary)

    def sync(self) -> None:
        """Saves what is logged so far (called with each checkpoint): uploads metrics.jsonl when it is in
        a bucket, flushes TensorBoard's events."""
        if self.enabled:
            self.lines.sync()
            self.tensorboard.flush()

    def close(self) -> None:
        self.sync()
        self.progress.close()
        self.tensorboard.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line a kill cut short (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
