"""A run directory: the name of every file in it, its creation and resume check, atomic writes.

    run_dir/config.yaml      the resolved config (config.yaml of an import or a resume)
    run_dir/tokenizer.json   which tokenizer, plus tokenizer.model / hf_tokenizer.* beside it
    run_dir/checkpoints/     Orbax steps (lm.training.checkpoint)
    run_dir/metrics.jsonl    one JSON object per logged step
    run_dir/profile/         jax.profiler traces

Small files are replaced atomically: a process killed mid-write leaves the old file or the
new one, never half of one.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import yaml

from lm import config as config_lib
from lm.config import Config
from lm.errors import LMError

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
PROFILE_DIR = "profile"
# Config keys a resume must not change: they define the checkpoint's shapes and ids (and its optimizer state).
FROZEN_KEYS = ("model", "data.tokenizer", "optim.name")


def write_atomic(path: str | pathlib.Path, text: str) -> None:
    """Writes `text` (UTF-8) to a temporary file beside `path`, syncs it, and renames it over `path`."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def save_config(cfg: Config, run_dir: str | pathlib.Path) -> None:
    write_atomic(pathlib.Path(run_dir) / CONFIG_FILE, yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))


def read_config(run_dir: str | pathlib.Path) -> Config:
    """The config a run directory was trained (or imported) with."""
    path = pathlib.Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise LMError(f"'{run_dir}' is not a run directory (no {CONFIG_FILE}); pass the run_dir train.py wrote.")
    return config_lib.load_config(path)


def prepare(cfg: Config) -> pathlib.Path:
    """Creates cfg.run_dir, or checks that the run already in it can continue under `cfg`."""
    run_dir = pathlib.Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LMError(f"run_dir '{run_dir}' is a file; pass a directory path with run_dir=PATH.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LMError(f"cannot create run_dir '{run_dir}' ({e.strerror}); choose a writable run_dir.") from None
    if not os.access(run_dir, os.W_OK):
        raise LMError(f"run_dir '{run_dir}' is not writable; choose a writable run_dir.")
    if (run_dir / CONFIG_FILE).exists() and (run_dir / CHECKPOINT_DIR).exists():
        check_resumable(read_config(run_dir), cfg, run_dir)
    return run_dir


def check_resumable(old: Config, new: Config, run_dir: pathlib.Path) -> None:
    """Refuses a config that changes a FROZEN_KEYS value of the run in run_dir, or its mixture's source names
    (each source's position is saved under its name; weights may change)."""
    old_flat, new_flat = config_lib.flatten(config_lib.to_dict(old)), config_lib.flatten(config_lib.to_dict(new))
    for key in old_flat:
        if key.startswith(FROZEN_KEYS) and old_flat[key] != new_flat[key]:
            raise LMError(f"run_dir '{run_dir}' holds a run with {key}={old_flat[key]!r} but this config has "
                          f"{new_flat[key]!r}; use the run's config or a new run_dir.")
    if "mixture" in (old.data.source, new.data.source) and old.data.source_names != new.data.source_names:
        raise LMError(f"run_dir '{run_dir}' holds a run on the data.mixture sources {_names(old)} but this config "
                      f"names {_names(new)}; a resume continues each source where it stopped, so use the run's "
                      "source names or a new run_dir.")


def _names(cfg: Config) -> str:
    return ", ".join(cfg.data.source_names) or f"none (data.source={cfg.data.source})"
