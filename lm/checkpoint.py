"""Orbax checkpoints of a run: `params`, `opt_state` and a JSON `meta` item per step.

Writes are atomic (Orbax commits a finished step directory by renaming it), so an
interrupted save never leaves a step that restore would read. Restores place arrays on
the current mesh, whatever mesh wrote them. Parameters restore alone for evaluation.
"""

from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp

from lm.errors import LMError
from lm.step import TrainState

ITEMS = ("params", "opt_state", "meta")


class Checkpoints:
    """The checkpoints directory of one run."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        """Starts writing `state` at step meta['step'] (asynchronously unless disabled)."""
        self._manager.save(int(meta["step"]), force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta)))

    def _restore(self, step: int, **items):
        if step not in self.steps():
            available = ", ".join(map(str, self.steps())) or "none"
            raise LMError(f"no checkpoint at step {step} in {self.directory} (available: {available}); "
                          "pass one of those steps.")
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise LMError(f"checkpoint {self.directory}/{step} does not fit this model or is damaged ({reason}); "
                          "use the config it was trained with, or a new run_dir.") from None

    def restore_state(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restores params and optimizer state onto the shardings carried by `target`."""
        restored = self._restore(step, params=ocp.args.StandardRestore(target.params),
                                 opt_state=ocp.args.StandardRestore(target.opt_state))
        state = TrainState(step=restored.meta["step"], params=restored.params, opt_state=restored.opt_state)
        return state, restored.meta

    def restore_params(self, step: int, target) -> tuple[Any, dict[str, Any]]:
        restored = self._restore(step, params=ocp.args.StandardRestore(target))
        return restored.params, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
