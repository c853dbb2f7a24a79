"""What guards a run: preemption (SIGTERM) and divergence (NaN/Inf steps).

Preemption: on SIGTERM, stop at a step all hosts agree on, checkpoint it and exit 0.
Single process: a SIGTERM handler sets a flag the loop reads after each step.
Several processes: JAX's preemption sync point (jax.distributed starts a service that
catches SIGTERM on any host and agrees on the step at which every host stops).
A watchdog ends the process, with a message, if it has not finished within
train.preemption_grace_s of the notice; the newest complete checkpoint stays valid.

Divergence, without extra host syncs: each step's NaN/Inf flag is read later, at points
where the loop already waits for the device (logging, validation, checkpoints).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

from lm.errors import LMError


class Preemption:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self._noticed = threading.Event()
        self._finished = threading.Event()
        self._previous = None
        self._multihost = jax.process_count() > 1
        if not self._multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._noticed.set())
        threading.Thread(target=self._watchdog, daemon=True, name="preemption-watchdog").start()

    def _watchdog(self) -> None:
        self._noticed.wait()
        if self._finished.wait(self.grace_s):
            return
        print(f"error: preempted, and the checkpoint was not complete within train.preemption_grace_s="
              f"{self.grace_s:g}s; the run will resume from its newest complete checkpoint "
              "(raise train.preemption_grace_s if the scheduler allows more time).", file=sys.stderr, flush=True)
        os._exit(3)

    def reached(self, step: int) -> bool:
        """True at the step where training should checkpoint and stop (the same step on every host)."""
        if self._multihost:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self._noticed.set()
            except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
                return False
        return self._noticed.is_set()

    def close(self) -> None:
        """Ends the watchdog and gives SIGTERM back to its previous handler."""
        self._finished.set()
        self._noticed.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class NonfiniteWatch:
    """Collects train_step's `nonfinite` flags; `check(step)` reads those up to `step`.

    Without `skip`, the first flagged step stops the run with an LMError naming it, and
    callers check before every checkpoint so a diverged state is never saved. With
    `skip`, the step's update was already dropped inside train_step; here it is counted.
    """

    def __init__(self, skip: bool, skipped: int = 0):
        self.skip = skip
        self.skipped = skipped
        self._flags: list[tuple[int, jax.Array]] = []

    def add(self, step: int, flag: jax.Array) -> None:
        self._flags.append((step, flag))

    def check(self, upto: int) -> None:
        ready = [(s, f) for s, f in self._flags if s <= upto]
        self._flags = [(s, f) for s, f in self._flags if s > upto]
        if not ready:
            return
        for step, flag in zip([s for s, _ in ready], jax.device_get([f for _, f in ready])):
            if not flag:
                continue
            if not self.skip:
                raise LMError(f"training diverged at step {step}: the loss or gradients are NaN or Inf, and "
                              "nothing from that step on was checkpointed; resume from the newest checkpoint "
                              "with a lower optim.lr, or set train.skip_nonfinite=true to skip such steps.")
            self.skipped += 1
