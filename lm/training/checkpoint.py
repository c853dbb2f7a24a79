"""Orbax checkpoints of a run: `params`, `opt_state` and a JSON `meta` item per step.

The newest `keep` steps are kept; with `keep_best` also the one with the lowest validation
loss, which Orbax records beside a step saved with one (its `metrics`) and ranks (BestN).

Writes are atomic (Orbax commits a finished step directory by renaming it, or in a gs://
bucket, where nothing renames, by writing its commit_success.txt last), so an interrupted
save never leaves a step that restore would read; its leftovers are removed when the run
restarts. Meta records fingerprints of params and opt_state, checked on restore, and any
failure to read a step is one LMError. Restores place arrays on the current mesh, whatever
mesh wrote them. Parameters restore alone for evaluation.

Fingerprints: Orbax notices missing or truncated files, but a flipped byte inside a chunk
restores silently as a different number. The fingerprint of a tree is a SHA-256 over one
uint32 per leaf: the sum, modulo 2**32, of each element's bits times an odd weight that
depends on its position. Any change to a single element changes it, integer sums do not
depend on reduction order, and it runs as one jitted reduction on whatever mesh holds the arrays.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pathlib
import re
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lm import storage
from lm.errors import LMError
from lm.training.step import TrainState

ITEMS = ("params", "opt_state", "meta")
VAL_LOSS = "val_loss"  # the metric a checkpoint saved at a validation step records
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_sum(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    weights = (jnp.arange(x.size, dtype=jnp.uint32) * 2 + 1).reshape(x.shape)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_leaf_sums = jax.jit(lambda tree: [_leaf_sum(x) for x in jax.tree.leaves(tree)])


def fingerprint(tree) -> str:
    """A hex digest that changes when any element, shape or tree path of `tree` changes."""
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    shapes = [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree)]
    sums = np.asarray(jax.device_get(_leaf_sums(tree)), dtype=np.uint32)
    return hashlib.sha256(repr((paths, shapes)).encode() + sums.tobytes()).hexdigest()


def _val_loss(metrics: dict) -> float:
    """A step's rank: its validation loss, or +inf for one saved without (it never ranks best)."""
    return metrics.get(VAL_LOSS, math.inf)


class Checkpoints:
    """The checkpoints directory of one run."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False, keep_best: bool = False):
        self.directory = storage.absolute(storage.path(directory, "run_dir"))  # local, or a bucket (tensorstore)
        policy = None  # read-only: nothing is deleted
        if not read_only:
            policy = ocp.checkpoint_managers.LatestN(keep)
        if keep_best and not read_only:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, ocp.checkpoint_managers.BestN(
                get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=_val_loss, best_mode="min", create=not read_only,
            read_only=read_only, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # Orbax warns "Given directory is read only" on every read-only open
        try:
            self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        finally:
            absl_logger.setLevel(level)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def best(self) -> tuple[int, float] | None:
        """(step, validation loss) of the kept step with the lowest validation loss; None when no kept
        step was saved with one."""
        step = self._manager.best_step()
        metrics = self._manager.metrics(step) if step is not None else None
        if not metrics or VAL_LOSS not in metrics:
            return None
        return int(step), float(metrics[VAL_LOSS])

    def save(self, state: TrainState, meta: dict[str, Any], val_loss: float | None = None) -> None:
        """Starts writing `state` at step meta['step'] (asynchronously unless disabled), with the
        step's validation loss when it has one."""
        meta = {**meta, "fingerprints": {"params": fingerprint(state.params),
                                         "opt_state": fingerprint(state.opt_state)}}
        self._manager.save(int(meta["step"]), force=True, metrics={} if val_loss is None else {VAL_LOSS: val_loss},
                           args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                                   opt_state=ocp.args.StandardSave(state.opt_state),
                                                   meta=ocp.args.JsonSave(meta)))

    def _restore(self, step: int, expect: dict[str, Any] | None = None, **items):
        """Restores `items` of `step` after checking meta against `expect`, then their fingerprints."""
        if step not in self.steps():
            available = ", ".join(map(str, self.steps())) or "none"
            raise LMError(f"no checkpoint at step {step} in {self.directory} (available: {available}); "
                          "pass one of those steps.")
        where = f"checkpoint {self.directory}/{step}"
        meta = self._read(step, meta=ocp.args.JsonRestore()).meta
        if not isinstance(meta, dict):
            raise LMError(f"{where} is damaged (its meta item is not a JSON object); delete that step "
                          "directory to use an earlier checkpoint.")
        for key, value in (expect or {}).items():
            if key in meta and _differs(meta[key], value):
                raise LMError(f"{where} was written with a different {key} ({_difference(meta[key], value)}); "
                              "use the config it was trained with, or a new run_dir.")
        restored = self._read(step, meta=ocp.args.JsonRestore(), **items)
        for name in items:
            recorded = meta.get("fingerprints", {}).get(name)
            if recorded is not None and fingerprint(getattr(restored, name)) != recorded:
                raise LMError(f"{where} is damaged: its {name} do not match the checksum recorded when it was "
                              f"written; delete that step directory to use an earlier checkpoint.")
        return restored

    def _read(self, step: int, **items):
        _silence_stray_read_errors()
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax and TensorStore raise many types; all mean "cannot read this step".
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            reason = " ".join(first_line.split(". See full")[0].split())[:160]
            raise LMError(f"checkpoint {self.directory}/{step} does not fit this model or is damaged ({reason}); "
                          "use the config it was trained with, or delete that step directory to use an "
                          "earlier checkpoint.") from e

    def restore_state(self, step: int, target: TrainState, expect: dict[str, Any] | None = None
                      ) -> tuple[TrainState, dict[str, Any]]:
        """Restores params and optimizer state onto the shardings carried by `target`.

        `expect` (e.g. {"model": ..., "tokenizer": ...}) must match what the checkpoint's meta recorded.
        """
        restored = self._restore(step, expect, params=ocp.args.StandardRestore(target.params),
                                 opt_state=ocp.args.StandardRestore(target.opt_state))
        state = TrainState(step=restored.meta["step"], params=restored.params, opt_state=restored.opt_state)
        return state, restored.meta

    def restore_params(self, step: int, target, expect: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        restored = self._restore(step, expect, params=ocp.args.StandardRestore(target))
        return restored.params, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _differs(recorded: Any, current: Any) -> bool:
    """Whether two meta values disagree; dicts are compared on the keys both have."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return any(recorded[k] != current[k] for k in set(recorded) & set(current))
    return recorded != current


def _difference(recorded: Any, current: Any) -> str:
    """'d_model 64 there, 32 here' for dicts; the two values otherwise."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        keys = [k for k in sorted(set(recorded) & set(current)) if recorded[k] != current[k]]
        return ", ".join(f"{k} {recorded[k]!r} there, {current[k]!r} here" for k in keys[:3])
    return f"{recorded!r} there, {current!r} here"


_STRAY_READ_ERRORS = ("Event loop is closed", "Encountered error while reading array index",
                      "in OCDBT database")  # tensorstore's read errors of the same broken checkpoint
_STRAY_READ_COROUTINE = "coroutine '_read_array_index_and_device_put' was never awaited"  # Orbax's, at exit


def _is_stray(text: str) -> bool:
    return any(marker in text for marker in _STRAY_READ_ERRORS)


def _silence_stray_read_errors() -> None:
    """When a restore fails, its other reads still in flight fail too, on Orbax's (soon closed)
    event loop, and print tracebacks as "unraisable" exceptions or asyncio "never retrieved"
    log records, or a read never started warns at exit; drop those (only those) so the
    one-line error stays alone. Installed once."""
    previous = sys.unraisablehook
    if getattr(previous, "lm_filter", False):
        return

    def hook(unraisable):
        if not _is_stray(str(unraisable.exc_value)):
            previous(unraisable)

    def keep(record: logging.LogRecord) -> bool:
        return not _is_stray(record.getMessage() + str(record.exc_info[1] if record.exc_info else ""))

    hook.lm_filter = True
    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", message=re.escape(_STRAY_READ_COROUTINE), category=RuntimeWarning)
    logging.getLogger("asyncio").addFilter(keep)
