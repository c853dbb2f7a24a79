"""jax.profiler traces of chosen steps, under run_dir/profile.

Open them in TensorBoard's profile plugin or in Perfetto (ui.perfetto.dev, the
`*.trace.json.gz` file). jax.profiler writes its Perfetto trace with local file calls, so a
gs:// run_dir's trace goes to a temporary directory, uploaded when the trace stops.
"""

from __future__ import annotations

import pathlib

import jax

from lm import storage
from lm.rundir import PROFILE_DIR


class Profiler:
    """Traces steps [start_step, start_step + steps) with jax.profiler into run_dir/profile."""

    def __init__(self, run_dir: pathlib.Path, start_step: int, steps: int):
        self.directory = run_dir / PROFILE_DIR
        self.start, self.stop = start_step, start_step + steps
        self.active = False
        self.done = start_step

    def before_step(self, step: int) -> None:
        if step == self.start and self.stop > self.start and not self.active:
            self.scratch = storage.scratch_dir(self.directory)
            jax.profiler.start_trace(str(self.scratch), create_perfetto_trace=True)
            self.active = True

    def after_step(self, done: int, state) -> None:
        self.done = done
        if self.active and done >= self.stop:
            jax.block_until_ready(state)
            self.close()

    def written(self, done: int) -> str:
        """Where the trace of steps start+1..done went, and how to open it."""
        traces = sorted(self.directory.glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
        perfetto = f"; Perfetto: open {traces[-1]} at ui.perfetto.dev" if traces else ""
        return (f"profile: steps {self.start + 1}-{done} traced into {self.directory} (TensorBoard: "
                f"tensorboard --logdir {self.directory}, Profile tab{perfetto})")

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            storage.upload_dir(self.scratch, self.directory)
            self.active = False
            print(self.written(self.done), flush=True)
