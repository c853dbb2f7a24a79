"""Hugging Face checkpoints in and out: read one as (model, params), import it as a run, export a run.

Weights are read and written as safetensors only (pickled `.bin` files are refused:
loading them can execute code).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from lm import config as config_lib
from lm import rundir, storage
from lm.config import ModelConfig
from lm.data.tokenizers import ByteTokenizer, hf as hf_tokenizer, save_tokenizer
from lm.errors import LMError
from lm.hf import families, tokenizer_files, weights as hf_weights
from lm.model.transformer import Transformer
from lm.training.checkpoint import Checkpoints
from lm.training.runtime import build, platform_kernels, platform_model
from lm.training.step import TrainState


def _local_dir(hf_dir: str | pathlib.Path, command: str) -> pathlib.Path:
    """A Hugging Face directory, which safetensors reads and writes on a local disk only."""
    if storage.is_remote(hf_dir):
        raise LMError(f"{command} reads and writes Hugging Face directories on a local disk, not '{hf_dir}'; "
                      "copy it with gcloud storage cp -r.")
    return pathlib.Path(hf_dir)


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LMError(f"'{path}' is missing; pass a Hugging Face model directory (config.json + *.safetensors).") from None
    except (ValueError, UnicodeDecodeError):
        raise LMError(f"'{path}' is not valid JSON; download the model directory again.") from None


def read_tensors(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors import SafetensorError, safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in hf_dir.glob("*.bin"))
        hint = (f" It has {', '.join(pickled[:3])}: pickle files, which lm never loads because that can run code; "
                "convert them to safetensors first." if pickled else "")
        raise LMError(f"'{hf_dir}' has no *.safetensors weights.{hint}")
    tensors = {}
    for name in files:
        try:
            with safe_open(str(hf_dir / name), framework="numpy") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (FileNotFoundError, SafetensorError, OSError) as e:
            raise LMError(f"cannot read weights '{hf_dir / name}' ({str(e)[:120]}); download the model again.") from None
    return tensors


def read_config(hf_dir: str | pathlib.Path) -> ModelConfig:
    """Our ModelConfig for an HF model directory's config.json."""
    hf_dir = pathlib.Path(hf_dir)
    if not hf_dir.is_dir():
        raise LMError(f"'{hf_dir}' is not a directory; pass a Hugging Face model directory.")
    hf = _read_json(hf_dir / "config.json")
    try:
        return families.model_config(hf)
    except KeyError as e:
        raise LMError(f"'{hf_dir}/config.json' lacks the key {e}; it is not a complete {families.architecture(hf)} config.") from None


def read_params(hf_dir: str | pathlib.Path, cfg: ModelConfig) -> dict:
    """The checkpoint's weights as our numpy parameter tree for `cfg` (from read_config, maybe re-typed)."""
    tensors = read_tensors(pathlib.Path(hf_dir))
    if cfg.position == "learned":  # GPT-2
        params = hf_weights.gpt2_to_params(hf_weights.Tensors(tensors, "transformer."), cfg)
    else:
        params = hf_weights.llama_to_params(hf_weights.Tensors(tensors), cfg)
    dtype = jnp.dtype(cfg.param_dtype)
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    return hf_weights.stack_blocks(params, cfg.n_layers) if cfg.scan_layers else params


def read_eos_ids(hf_dir: pathlib.Path, hf: dict, tok: hf_tokenizer.HFTokenizer, vocab_size: int) -> tuple[int, ...]:
    """The model's end-of-sequence ids: generation_config.json's eos_token_id (an int or a list), else
    config.json's, else the EOS token the tokenizer files name; () when none says."""
    generation = hf_dir / "generation_config.json"
    for source in ((_read_json(generation) if generation.is_file() else {}), hf):
        value = source.get("eos_token_id")
        if value is not None:
            ids = [value] if isinstance(value, int) else value
            break
    else:
        ids = list(tok.declared_eos_ids())
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise LMError(f"'{hf_dir}' gives eos_token_id {ids!r}, not ids below the model's vocabulary of {vocab_size}; "
                      "fix generation_config.json / config.json.")
    return tuple(dict.fromkeys(ids))


def load(hf_dir: str | pathlib.Path, **model_overrides) -> tuple[Transformer, dict]:
    """(model, params) with model.apply({"params": params}, tokens_BxT) -> logits [B, T, vocab].

    `model_overrides` may change how the model runs (dtype, param_dtype, attention, scan_layers).
    """
    platform = jax.default_backend()
    cfg = platform_model(dataclasses.replace(read_config(hf_dir), **model_overrides), platform)
    model = Transformer(cfg, kernels=platform_kernels(cfg, platform))
    return model, jax.tree.map(jnp.asarray, read_params(hf_dir, cfg))


def import_run(hf_dir: str | pathlib.Path, run_dir: str | pathlib.Path, overrides: list[str] = (),
               tokenizer: str | None = None) -> pathlib.Path:
    """Writes a run directory (config.yaml, tokenizer, checkpoint at step 0) that train.py and eval.py use."""
    hf_dir, run_dir = _local_dir(hf_dir, "lm hf import"), storage.path(run_dir, "run_dir")
    model_cfg = read_config(hf_dir)
    hf = _read_json(hf_dir / "config.json")
    if (run_dir / rundir.CHECKPOINT_DIR).exists():
        raise LMError(f"run_dir '{run_dir}' already holds checkpoints; import into a new directory.")
    flat = config_lib.flatten({"model": dataclasses.asdict(model_cfg)})
    flat.update({"run_dir": str(run_dir), "data.tokenizer": "byte" if tokenizer == "byte" else "hf",
                 "train.seq_len": min(model_cfg.max_seq_len, 1024)})
    flat.update(config_lib.parse_overrides(list(overrides)))
    cfg = config_lib.from_flat(flat)
    changed = [k for k, v in dataclasses.asdict(cfg.model).items() if v != getattr(model_cfg, k)]
    if set(changed) - set(families.RUNTIME_KEYS):
        raise LMError(f"overrides change the imported model's architecture ({', '.join(changed)}); "
                      f"only model.{', model.'.join(families.RUNTIME_KEYS)} may change.")

    source = tokenizer or hf_tokenizer.find_source(hf_dir)
    if source is None:
        raise LMError(f"'{hf_dir}' has no tokenizer.json or tokenizer.model; pass --tokenizer FILE (the model's "
                      "tokenizer.json or SentencePiece .model), or --tokenizer byte if it was trained on lm's byte ids.")
    tok = ByteTokenizer() if source == "byte" else hf_tokenizer.HFTokenizer(source)
    if tok.vocab_size > model_cfg.vocab_size:
        raise LMError(f"the tokenizer has {tok.vocab_size} ids but the model only {model_cfg.vocab_size}; "
                      "pass the tokenizer the model was trained with.")
    if source != "byte":
        tok.eos_ids = read_eos_ids(hf_dir, hf, tok, model_cfg.vocab_size)
    params = read_params(hf_dir, cfg.model)

    run_dir = rundir.prepare(cfg)
    if source != "byte":
        tok = hf_tokenizer.install(tok, run_dir)
    save_tokenizer(tok, run_dir)
    rt = build(cfg, tok)
    params = jax.device_put(params, rt.state_sharding.params)
    opt_state = jax.jit(rt.tx.init, out_shardings=rt.state_sharding.opt_state)(params)
    ckpts = Checkpoints(run_dir / rundir.CHECKPOINT_DIR, keep=cfg.checkpoint.keep, async_save=False)
    meta = {"step": 0, "tokenizer": tok.to_json(), "model": config_lib.to_dict(rt.cfg)["model"],
            "imported_from": str(hf_dir.absolute())}
    ckpts.save(TrainState(step=rt.place_step(0), params=params, opt_state=opt_state), meta)
    ckpts.wait()
    ckpts.close()
    rundir.save_config(cfg, run_dir)
    return run_dir


def export_run(run_dir: str | pathlib.Path, hf_dir: str | pathlib.Path, step: int | str | None = None) -> pathlib.Path:
    """Writes config.json + model.safetensors and the run's tokenizer
    (lm.hf.tokenizer_files) that transformers loads, from the
    checkpoint at `step` (default newest; "best": the lowest validation loss kept)."""
    from safetensors.numpy import save_file

    from lm.training.restore import restore_run

    hf_dir = _local_dir(hf_dir, "lm hf export")
    if (hf_dir / "config.json").exists() or (hf_dir / "model.safetensors").exists():
        raise LMError(f"'{hf_dir}' already holds a model; export into a new or empty directory.")
    run = restore_run(run_dir, step, batch_size=1)
    cfg = run.cfg.model
    config = families.hf_config(cfg)  # refuse before writing anything
    config.update(tokenizer_files.special_ids(run.tokenizer))
    eos_ids = list(run.tokenizer.eos_ids)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    params = jax.tree.map(np.asarray, jax.device_get(run.params))
    if cfg.scan_layers:
        params = hf_weights.unstack_blocks(params, cfg.n_layers)
    to_hf = hf_weights.params_to_gpt2 if config["model_type"] == "gpt2" else hf_weights.params_to_llama
    tensors = {k: np.ascontiguousarray(v) for k, v in to_hf(params, cfg).items()}
    hf_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_files.write_tokenizer(run.tokenizer, hf_dir)  # first: a failure here leaves no model to refuse
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(hf_dir / "model.safetensors", storage.new_file_mode())  # safetensors writes 0600
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return hf_dir
