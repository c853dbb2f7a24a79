"""A run directory: the name of every file in it, its creation and resume check, atomic writes.

    run_dir/config.yaml      the resolved config (config.yaml of an import or a resume)
    run_dir/tokenizer.json   which tokenizer, plus tokenizer.model / hf_tokenizer.* beside it
    run_dir/checkpoints/     Orbax steps (lm.training.checkpoint)
    run_dir/metrics.jsonl    one JSON object per logged step
    run_dir/profile/         jax.profiler traces

run_dir is a local directory or a bucket path (gs://BUCKET/PATH, lm.storage). Small files are
replaced atomically: a process killed mid-write leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import pathlib

import yaml

from lm import config as config_lib
from lm import storage
from lm.config import Config
from lm.errors import LMError

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
PROFILE_DIR = "profile"
# Config keys a resume must not change: they define the checkpoint's shapes and ids (and its optimizer state).
FROZEN_KEYS = ("model", "data.tokenizer", "optim.name")
# Model keys that change how the model runs, not its parameters: a resume may change them (a run
# started with model.dtype=float32 continues under the default auto; dropout may be raised).
RUN_ONLY_MODEL_KEYS = ("dtype", "attention", "splash_block_q", "splash_block_kv", "remat", "dropout",
                       "attention_dropout")


def save_config(cfg: Config, run_dir: str | pathlib.Path) -> None:
    storage.write_atomic(storage.path(run_dir, "run_dir") / CONFIG_FILE,
                         yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))


def read_config(run_dir: str | pathlib.Path) -> Config:
    """The config a run directory was trained (or imported) with."""
    path = storage.path(run_dir, "run_dir") / CONFIG_FILE
    if not path.is_file():
        raise LMError(f"'{run_dir}' is not a run directory (no {CONFIG_FILE}); pass the run_dir train.py wrote.")
    return config_lib.load_config(path)


def prepare(cfg: Config) -> pathlib.Path:
    """Creates cfg.run_dir, or checks that the run already in it can continue under `cfg`."""
    run_dir = storage.path(cfg.run_dir, "run_dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise LMError(f"run_dir '{run_dir}' is a file; pass a directory path with run_dir=PATH.")
    storage.make_dir(run_dir, "run_dir")
    if (run_dir / CONFIG_FILE).exists() and (run_dir / CHECKPOINT_DIR).exists():
        check_resumable(read_config(run_dir), cfg, run_dir)
    return run_dir


def check_resumable(old: Config, new: Config, run_dir: pathlib.Path) -> None:
    """Refuses a config that changes a FROZEN_KEYS value of the run in run_dir, or its mixture's source names
    (each source's position is saved under its name; weights may change)."""
    old_flat, new_flat = config_lib.flatten(config_lib.to_dict(old)), config_lib.flatten(config_lib.to_dict(new))
    for key in old_flat:
        if key.startswith(FROZEN_KEYS) and key.removeprefix("model.") not in RUN_ONLY_MODEL_KEYS \
                and old_flat[key] != new_flat[key]:
            raise LMError(f"run_dir '{run_dir}' holds a run with {key}={old_flat[key]!r} but this config has "
                          f"{new_flat[key]!r}; use the run's config or a new run_dir.")
    if "mixture" in (old.data.source, new.data.source) and old.data.source_names != new.data.source_names:
        raise LMError(f"run_dir '{run_dir}' holds a run on the data.mixture sources {_names(old)} but this config "
                      f"names {_names(new)}; a resume continues each source where it stopped, so use the run's "
                      "source names or a new run_dir.")


def restorable(meta: dict) -> dict:
    """What a checkpoint's meta (its tokenizer and model) must match to be restored: all but RUN_ONLY_MODEL_KEYS."""
    return {**meta, "model": {k: v for k, v in meta["model"].items() if k not in RUN_ONLY_MODEL_KEYS}}


def _names(cfg: Config) -> str:
    return ", ".join(cfg.data.source_names) or f"none (data.source={cfg.data.source})"


def check_own_config(config_file: str | pathlib.Path, cfg: Config) -> None:
    """Refuses a run's own config.yaml (one beside a tokenizer.json or checkpoints/) whose run_dir is another
    directory: a copied run keeps its original's run_dir, and training would continue the original."""
    path = pathlib.Path(config_file)
    home = path.parent
    if path.name != CONFIG_FILE or not ((home / TOKENIZER_FILE).is_file() or (home / CHECKPOINT_DIR).is_dir()):
        return
    if home.resolve() == pathlib.Path(cfg.run_dir).expanduser().resolve():
        return
    raise LMError(f"'{path}' is the config of the run in '{home}' but names run_dir '{cfg.run_dir}' (a copied run "
                  f"keeps its original's), so training would continue that run instead; pass run_dir={home} to "
                  f"train the run in '{home}', or run_dir={cfg.run_dir} to continue the other one.")
