"""What guards a run: preemption (SIGTERM), Ctrl-C (SIGINT) and divergence (NaN/Inf steps).

Preemption: on SIGTERM, stop at a step all hosts agree on, checkpoint it and exit 0.
Single process: a SIGTERM handler sets a flag the loop reads after each step.
Several processes: JAX's preemption sync point (jax.distributed starts a service that
catches SIGTERM on any host and agrees on the step at which every host stops).
A watchdog ends the process, with a message, if it has not finished within
train.preemption_grace_s of the notice; the newest complete checkpoint stays valid.

Ctrl-C (single process): the same flag, so the step, a validation or a checkpoint write under
way finishes, the step reached is checkpointed, and the trainer raises lm.errors.Interrupted
(the CLI: one line, exit 130); before training starts, it stops once the run is built, having
written nothing. A second Ctrl-C ends the process at once (exit 130); the newest complete
checkpoint stays valid. (A KeyboardInterrupt would land anywhere, even in a callback that
swallows it.)

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
        self.interrupted = False  # Ctrl-C (SIGINT) was the notice
        self._noticed = threading.Event()
        self._terminated = threading.Event()  # SIGTERM: the scheduler's grace period runs
        self._finished = threading.Event()
        self._previous = {}
        self._multihost = jax.process_count() > 1
        if not self._multihost and threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        threading.Thread(target=self._watchdog, daemon=True, name="preemption-watchdog").start()

    def _terminate(self, signum, frame) -> None:
        self._terminated.set()
        self._noticed.set()

    def _interrupt(self, signum, frame) -> None:
        if self.interrupted:  # the second Ctrl-C
            os.write(2, b"error: interrupted again: stopped at once; the run resumes from its newest complete "
                        b"checkpoint when you run the same command.\n")
            os._exit(130)
        self.interrupted = True
        self._noticed.set()
        os.write(2, b"interrupt: stopping at the next safe point, after this step and a checkpoint of it "
                    b"(Ctrl-C again stops at once)\n")  # os.write: safe inside a signal handler

    def _watchdog(self) -> None:
        self._terminated.wait()
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
                    self._terminated.set()
                    self._noticed.set()
            except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
                return False
        return self._noticed.is_set()

    def close(self) -> None:
        """Ends the watchdog and gives SIGTERM and SIGINT back to their previous handlers."""
        self._finished.set()
        self._terminated.set()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class NonfiniteWatch:
    """Collects train_step's `nonfinite` flags; `check(step)` reads those up to `step`.

    Without `skip`, the first flagged step stops the run with an LMError naming it, and
    callers check before every checkpoint so a diverged state is never saved. With
    `skip`, the step's update was already dropped inside train_step; here it is counted,
    and `max_consecutive` flagged steps in a row (0: no limit) stop the run the same way.
    """

    def __init__(self, skip: bool, skipped: int = 0, max_consecutive: int = 0, consecutive: int = 0):
        self.skip = skip
        self.skipped = skipped
        self.max_consecutive = max_consecutive
        self.consecutive = consecutive  # flagged steps in a row, up to the last step read (a checkpoint's, resumed)
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
                self.consecutive = 0
                continue
            if not self.skip:
                raise LMError(f"training diverged at step {step}: the loss or gradients are NaN or Inf, and "
                              "nothing from that step on was checkpointed; resume from the newest checkpoint "
                              "with a lower optim.lr, or set train.skip_nonfinite=true to skip such steps.")
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive == self.max_consecutive:
                raise LMError(f"training diverged: steps {step - self.consecutive + 1}-{step} all had NaN or Inf "
                              f"loss or gradients and were skipped (train.max_consecutive_skips="
                              f"{self.max_consecutive}); resume from the newest checkpoint with a lower optim.lr, or raise "
                              "train.max_consecutive_skips.")
