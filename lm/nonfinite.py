"""Divergence checks without extra host syncs: each step's NaN/Inf flag is read later,
at points where the loop already waits for the device (logging, validation, checkpoints).
"""

from __future__ import annotations

import jax

from lm.errors import LMError


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
