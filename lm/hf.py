"""Hugging Face interop: import Llama / GPT-2 checkpoints as runs, export runs back.

    python -m lm.hf import HF_DIR RUN_DIR [--tokenizer FILE|byte] [key=value ...]
    python -m lm.hf export RUN_DIR HF_DIR [--step N]

Weights are read and written as safetensors only (pickled `.bin` files are refused:
loading them can execute code). In a notebook, `model, params = lm.hf.load(HF_DIR)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from lm import config as config_lib
from lm import hf_tokenizer, hf_weights
from lm.checkpoint import Checkpoints
from lm.config import ModelConfig
from lm.errors import LMError
from lm.model import Transformer
from lm.step import TrainState
from lm.tokenizer import ByteTokenizer, save_tokenizer
from lm.trainer import CHECKPOINT_DIR, CONFIG_FILE, prepare_run_dir

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"


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


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for arch, model_type in ((LLAMA, "llama"), (GPT2, "gpt2")):
        if arch in archs or (not archs and hf.get("model_type") == model_type):
            return arch
    raise LMError(f"config.json describes {archs or hf.get('model_type')!r}; lm imports only {LLAMA} and {GPT2}.")


def _unsupported(what: str) -> LMError:
    return LMError(f"this checkpoint uses {what}, which lm's model does not implement; it cannot be imported exactly.")


def model_config(hf: dict) -> ModelConfig:
    """Our ModelConfig for an HF config.json (checked: anything we would compute differently is refused)."""
    arch = _architecture(hf)
    if arch == GPT2:
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _unsupported(f"activation_function={hf['activation_function']!r} (lm's MLP uses the tanh GELU)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise _unsupported("non-standard attention scaling")
        d = hf["n_embd"]
        return ModelConfig(vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], d_model=d, n_heads=hf["n_head"],
                           d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], norm="layernorm",
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", position="learned",
                           tie_embeddings=hf.get("tie_word_embeddings", True), use_bias=True,
                           init_std=hf.get("initializer_range", 0.02))
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act={hf['hidden_act']!r} (lm's SwiGLU uses silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _unsupported(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise _unsupported("attention_bias != mlp_bias (lm has one model.use_bias)")
    d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", d // n_heads) != d // n_heads:
        raise _unsupported(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads")
    return ModelConfig(vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=d, n_heads=n_heads,
                       n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
                       norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", position="rope",
                       rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                       tie_embeddings=hf.get("tie_word_embeddings", False), use_bias=bool(hf.get("attention_bias")),
                       init_std=hf.get("initializer_range", 0.02))


def read_config(hf_dir: str | pathlib.Path) -> ModelConfig:
    """Our ModelConfig for an HF model directory's config.json."""
    hf_dir = pathlib.Path(hf_dir)
    if not hf_dir.is_dir():
        raise LMError(f"'{hf_dir}' is not a directory; pass a Hugging Face model directory.")
    hf = _read_json(hf_dir / "config.json")
    try:
        return model_config(hf)
    except KeyError as e:
        raise LMError(f"'{hf_dir}/config.json' lacks the key {e}; it is not a complete {_architecture(hf)} config.") from None


def read_params(hf_dir: str | pathlib.Path, cfg: ModelConfig) -> dict:
    """The checkpoint's weights as our numpy parameter tree for `cfg` (from read_config, maybe re-typed)."""
    tensors = read_tensors(pathlib.Path(hf_dir))
    if cfg.mlp == "gelu":
        params = hf_weights.gpt2_to_params(hf_weights.Tensors(tensors, "transformer."), cfg)
    else:
        params = hf_weights.llama_to_params(hf_weights.Tensors(tensors), cfg)
    dtype = jnp.dtype(cfg.param_dtype)
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    return hf_weights.stack_blocks(params, cfg.n_layers) if cfg.scan_layers else params


def load(hf_dir: str | pathlib.Path, **model_overrides) -> tuple[Transformer, dict]:
    """(model, params) with model.apply({"params": params}, tokens_BxT) -> logits [B, T, vocab].

    `model_overrides` may change how the model runs (dtype, param_dtype, attention, scan_layers).
    """
    cfg = dataclasses.replace(read_config(hf_dir), **model_overrides)
    return Transformer(cfg), jax.tree.map(jnp.asarray, read_params(hf_dir, cfg))


# Model keys an import may override: they change how the model runs, not its weights.
RUNTIME_KEYS = ("dtype", "param_dtype", "attention", "remat", "scan_layers", "dropout")


def import_run(hf_dir: str | pathlib.Path, run_dir: str | pathlib.Path, overrides: list[str] = (),
               tokenizer: str | None = None) -> pathlib.Path:
    """Writes a run directory (config.yaml, tokenizer, checkpoint at step 0) that train.py and eval.py use."""
    from lm.runtime import build

    hf_dir, run_dir = pathlib.Path(hf_dir), pathlib.Path(run_dir)
    model_cfg = read_config(hf_dir)
    if (run_dir / CHECKPOINT_DIR).exists():
        raise LMError(f"run_dir '{run_dir}' already holds checkpoints; import into a new directory.")
    flat = config_lib.flatten({"model": dataclasses.asdict(model_cfg)})
    flat.update({"run_dir": str(run_dir), "data.tokenizer": "byte" if tokenizer == "byte" else "hf",
                 "train.seq_len": min(model_cfg.max_seq_len, 1024)})
    flat.update(config_lib.parse_overrides(list(overrides)))
    cfg = config_lib.from_flat(flat)
    changed = [k for k, v in dataclasses.asdict(cfg.model).items() if v != getattr(model_cfg, k)]
    if set(changed) - set(RUNTIME_KEYS):
        raise LMError(f"overrides change the imported model's architecture ({', '.join(changed)}); "
                      f"only model.{', model.'.join(RUNTIME_KEYS)} may change.")

    source = tokenizer or hf_tokenizer.find_source(hf_dir)
    if source is None:
        raise LMError(f"'{hf_dir}' has no tokenizer.json or tokenizer.model; pass --tokenizer FILE (the model's "
                      "tokenizer.json or SentencePiece .model), or --tokenizer byte if it was trained on lm's byte ids.")
    tok = ByteTokenizer() if source == "byte" else hf_tokenizer.HFTokenizer(source)
    if tok.vocab_size > model_cfg.vocab_size:
        raise LMError(f"the tokenizer has {tok.vocab_size} ids but the model only {model_cfg.vocab_size}; "
                      "pass the tokenizer the model was trained with.")
    params = read_params(hf_dir, cfg.model)

    run_dir = prepare_run_dir(cfg)
    if source != "byte":
        tok = hf_tokenizer.install(tok, run_dir)
    save_tokenizer(tok, run_dir)
    rt = build(cfg, tok)
    params = jax.device_put(params, rt.state_sharding.params)
    opt_state = jax.jit(rt.tx.init, out_shardings=rt.state_sharding.opt_state)(params)
    ckpts = Checkpoints(run_dir / CHECKPOINT_DIR, keep=cfg.checkpoint.keep, async_save=False)
    meta = {"step": 0, "tokenizer": tok.to_json(), "model": config_lib.to_dict(rt.cfg)["model"],
            "imported_from": str(hf_dir.absolute())}
    ckpts.save(TrainState(step=rt.place_step(0), params=params, opt_state=opt_state), meta)
    ckpts.wait()
    ckpts.close()
    config_lib.save_config(cfg, run_dir / CONFIG_FILE)
    return run_dir


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for our model, or an LMError when HF has no equivalent architecture."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "torch_dtype": cfg.param_dtype}
    if (cfg.norm, cfg.mlp, cfg.position) == ("rmsnorm", "swiglu", "rope"):
        return {"architectures": [LLAMA], "model_type": "llama", "hidden_size": cfg.d_model,
                "intermediate_size": cfg.ff_dim, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
                "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, **common}
    if (cfg.norm, cfg.mlp, cfg.position, cfg.use_bias) == ("layernorm", "gelu", "learned", True) \
            and cfg.kv_heads == cfg.n_heads:
        return {"architectures": [GPT2], "model_type": "gpt2", "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.ff_dim, "n_positions": cfg.max_seq_len,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new", **common}
    raise LMError(f"model.norm={cfg.norm}, mlp={cfg.mlp}, position={cfg.position}, use_bias={cfg.use_bias}, "
                  f"n_kv_heads={cfg.n_kv_heads} has no Hugging Face equivalent; export supports Llama "
                  "(rmsnorm, swiglu, rope) and GPT-2 (layernorm, gelu, learned, use_bias=true, no GQA).")


def export_run(run_dir: str | pathlib.Path, hf_dir: str | pathlib.Path, step: int | None = None) -> pathlib.Path:
    """Writes config.json + model.safetensors (+ the run's tokenizer file) that transformers loads."""
    from safetensors.numpy import save_file

    from lm.restore import restore_run

    run_dir, hf_dir = pathlib.Path(run_dir), pathlib.Path(hf_dir)
    if (hf_dir / "config.json").exists() or (hf_dir / "model.safetensors").exists():
        raise LMError(f"'{hf_dir}' already holds a model; export into a new or empty directory.")
    run = restore_run(run_dir, step, batch_size=1)
    cfg = run.cfg.model
    config = hf_config(cfg)  # refuse before writing anything
    params = jax.tree.map(np.asarray, jax.device_get(run.params))
    if cfg.scan_layers:
        params = hf_weights.unstack_blocks(params, cfg.n_layers)
    to_hf = hf_weights.params_to_llama if config["model_type"] == "llama" else hf_weights.params_to_gpt2
    tensors = {k: np.ascontiguousarray(v) for k, v in to_hf(params, cfg).items()}
    hf_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if isinstance(run.tokenizer, hf_tokenizer.HFTokenizer):
        shutil.copyfile(run.tokenizer.path, hf_dir / f"tokenizer{run.tokenizer.path.suffix}")
    return hf_dir


def main(argv: list[str] | None = None) -> None:
    from lm.cli import _run

    parser = argparse.ArgumentParser(prog="python -m lm.hf", description="Hugging Face Llama / GPT-2 import and export.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF model directory -> run directory")
    imp.add_argument("hf_dir")
    imp.add_argument("run_dir")
    imp.add_argument("--tokenizer", help="tokenizer.json / .model to use when HF_DIR has none, or 'byte'")
    imp.add_argument("overrides", nargs="*", help="config overrides for the run, e.g. data.text_file=F train.seq_len=256")
    exp = sub.add_parser("export", help="run directory -> HF model directory")
    exp.add_argument("run_dir")
    exp.add_argument("hf_dir")
    exp.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    args = parser.parse_args(argv)

    def run():
        if args.command == "import":
            out = import_run(args.hf_dir, args.run_dir, args.overrides, args.tokenizer)
            print(f"imported {args.hf_dir} into {out}; evaluate with python eval.py --run_dir {out}")
        else:
            out = export_run(args.run_dir, args.hf_dir, args.step)
            print(f"exported {args.run_dir} to {out} (config.json, model.safetensors)")

    _run(run, args.debug)


if __name__ == "__main__":
    main()
