"""Typed experiment config: YAML file + dotted `key=value` overrides, validated up front.

Every section is a frozen dataclass. `load_config(path, overrides)` reads the YAML with
`yaml.safe_load`, applies overrides such as `model.d_model=256`, checks every key and
type, and rejects impossible combinations before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import typing
from typing import Any

import yaml

from lm.errors import LMError

REMAT_POLICIES = (
    "none",
    "block",
    "save_qkv",  # save each block's query/key/value projections; recompute attention and the MLP
    "save_qkv_attn",  # also the attention output: only norms and the MLP are recomputed
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: n_heads (multi-head); 1: multi-query; else grouped-query
    d_ff: int = 0  # 0: 4 * d_model
    max_seq_len: int = 1024
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    position: str = "learned"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    use_bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    splash_block_q: int = 512  # model.attention=splash: query rows per kernel tile (a multiple of 128)
    splash_block_kv: int = 512  # and key columns per tile; both shrink to divide the sequence
    remat: str = "none"
    scan_layers: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


@dataclasses.dataclass(frozen=True)
class DataConfig:
    text_file: str = ""  # local path, or an http(s)/file URL fetched once into cache_dir
    sha256: str = ""  # expected SHA-256 of a fetched text_file (checked when set)
    cache_dir: str = "~/.cache/lm"
    val_fraction: float = 0.1
    tokenizer: str = "byte"
    vocab_size: int = 4096  # sentencepiece: vocabulary to train
    spm_algorithm: str = "bpe"
    tokenizer_model: str = ""  # sentencepiece: an existing .model file instead of training one
    source: str = "text_file"  # text_file: random windows of one file; tfds: packed documents (grain)
    files: str = ""  # tfds source, own corpus: comma-separated paths or globs of .txt / .jsonl files
    doc_separator: str = ""  # cut text files into documents at this string ("\n" = newline); "": whole file
    text_key: str = "text"  # the text field of JSONL lines and of named datasets
    tfds_name: str = ""  # a named TFDS dataset (prepared as array_record), e.g. tiny_shakespeare
    tfds_data_dir: str = ""  # "": cache_dir/tfds
    train_split: str = "train"
    eval_split: str = "validation"
    workers: int = 0  # grain worker processes (0: in the training process)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio after cosine decay
    warmup_steps: int = 100
    decay_steps: int = 0  # 0: train.steps
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables global-norm clipping


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global, in sequences
    seq_len: int = 128
    grad_accum_steps: int = 1
    loss_chunk_tokens: int = -1  # tokens per device in one chunk of the cross-entropy; -1: auto, 0: whole
    skip_nonfinite: bool = False  # drop updates whose loss or gradients are NaN/Inf (else stop the run)
    preemption_grace_s: float = 30.0  # after SIGTERM: finish the step, checkpoint, exit within this time


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 250  # 0 disables in-training validation
    batches: int = 20  # random validation batches per in-training estimate
    batch_size: int = 0  # 0: train.batch_size


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10
    tensorboard: bool = True  # event files in run_dir (tensorboardX)
    sample_tokens: int = 64  # greedy continuation logged to TensorBoard at eval steps; 0: none


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    start_step: int = 0  # first traced step
    steps: int = 0  # steps traced into run_dir/profile; 0: no trace


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    mode: str = "mesh"
    data: int = -1  # -1: all devices not used by fsdp and tensor
    fsdp: int = 1
    tensor: int = 1
    cpu_devices: int = 0  # JAX devices a CPU host is split into; 0: one per core (lm.parallel.cpu)
    cpu_chunk_tokens: int = 1024  # CPU: tokens per device in one pass of a step (lm.parallel.cpu); 0: one pass
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    profile: ProfileConfig = ProfileConfig()
    parallel: ParallelConfig = ParallelConfig()


CHOICES = {
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "swiglu"),
    "model.position": ("learned", "sinusoidal", "rope"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ("xla", "cudnn", "splash", "auto"),
    "model.remat": REMAT_POLICIES,
    "data.tokenizer": ("byte", "sentencepiece", "hf"),
    "data.spm_algorithm": ("bpe", "unigram"),
    "data.source": ("text_file", "tfds"),
    "parallel.mode": ("mesh", "pmap"),
}


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: type) -> Any:
    """Returns `value` as type `tp`, or raises LMError naming `key`."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    article = "an" if tp is int else "a"
    raise LMError(f"config key '{key}' must be {article} {tp.__name__}, got {value!r}; fix its value.")


def _unknown_key(key: str, known: list[str]) -> LMError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(known))}."
    return LMError(f"unknown config key '{key}'.{hint}")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of `cls`, e.g. 'model.d_model'."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


def _build(cls: type, flat: dict[str, Any], prefix: str = "") -> Any:
    kwargs = {}
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        if _is_section(tp):
            kwargs[name] = _build(tp, flat, f"{key}.")
        elif key in flat:
            kwargs[name] = _coerce(key, flat[key], tp)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parses ['model.d_model=256', ...] into {'model.d_model': 256, ...}."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LMError(f"override '{item}' is not of the form key=value (e.g. train.steps=100).")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


def from_flat(flat: dict[str, Any]) -> Config:
    """Builds and validates a Config from dotted keys; unknown keys are errors."""
    known = all_keys()
    for key in flat:
        if key not in known:
            raise _unknown_key(key, known)
    config = _build(Config, flat)
    validate(config)
    return config


def read_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a YAML mapping safely; a missing or malformed file is an LMError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise LMError(f"config file '{path}' does not exist; pass an existing YAML file such as configs/tiny.yaml.")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LMError(f"config file '{path}' is not valid YAML ({first}); fix the file.") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise LMError(f"config file '{path}' must hold a mapping of sections (model:, train:, ...).")
    return tree


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Loads a YAML config (or the defaults when `path` is None) and applies overrides."""
    flat = flatten(read_yaml(path)) if path else {}
    flat.update(parse_overrides(list(overrides)))
    return from_flat(flat)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def replace(config: Config, **dotted: Any) -> Config:
    """Returns a copy with dotted keys replaced, e.g. replace(c, **{'train.steps': 5})."""
    flat = flatten(to_dict(config))
    flat.update(dotted)
    return from_flat(flat)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LMError(message)


def validate(c: Config) -> None:
    """Rejects values and combinations that cannot run, naming the key to change."""
    flat = flatten(to_dict(c))
    for key, options in CHOICES.items():
        _require(flat[key] in options, f"config key '{key}' is {flat[key]!r}; choose one of {', '.join(options)}.")
    for key in ("model.n_layers", "model.d_model", "model.n_heads", "model.max_seq_len",
                "train.steps", "train.batch_size", "train.seq_len", "train.grad_accum_steps",
                "checkpoint.every", "checkpoint.keep", "log.every"):
        _require(flat[key] > 0, f"config key '{key}' must be positive, got {flat[key]}.")
    for key in ("model.vocab_size", "model.n_kv_heads", "model.d_ff", "optim.warmup_steps",
                "optim.decay_steps", "eval.every", "eval.batches", "eval.batch_size",
                "optim.weight_decay", "optim.grad_clip", "optim.lr", "data.workers", "log.sample_tokens",
                "profile.start_step", "profile.steps", "parallel.cpu_chunk_tokens"):
        _require(flat[key] >= 0, f"config key '{key}' must not be negative, got {flat[key]}.")
    m, t = c.model, c.train
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; change one of them.")
    _require(m.n_kv_heads <= m.n_heads and m.n_heads % m.kv_heads == 0,
             f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
             "choose n_kv_heads that divides n_heads.")
    _require(m.position != "rope" or m.head_dim % 2 == 0,
             f"model.position=rope needs an even head dimension, but d_model/n_heads={m.head_dim}; change model.d_model or model.n_heads.")
    for key in ("model.splash_block_q", "model.splash_block_kv"):
        _require(flat[key] > 0 and flat[key] % 128 == 0,
                 f"config key '{key}' must be a positive multiple of 128 (the TPU lane width), got {flat[key]}.")
    _require(m.attention != "splash" or t.seq_len % 128 == 0,
             f"model.attention=splash needs train.seq_len a multiple of 128, got {t.seq_len}; "
             "change train.seq_len or use model.attention=auto (XLA attention for such lengths).")
    _require(t.loss_chunk_tokens >= -1,
             f"train.loss_chunk_tokens={t.loss_chunk_tokens} must be -1 (auto), 0 (whole) or a token count.")
    _require(t.seq_len <= m.max_seq_len,
             f"train.seq_len={t.seq_len} is above model.max_seq_len={m.max_seq_len}; lower train.seq_len or raise model.max_seq_len.")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1).")
    _require(0.0 < c.data.val_fraction < 1.0, f"data.val_fraction={c.data.val_fraction} must be in (0, 1).")
    _require(c.data.tokenizer != "sentencepiece" or c.data.tokenizer_model or c.data.vocab_size >= 300,
             f"data.vocab_size={c.data.vocab_size} is too small for SentencePiece with byte fallback "
             "(256 byte pieces + specials); use at least 300.")
    _require(0.0 <= c.optim.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={c.optim.min_lr_ratio} must be in [0, 1].")
    _require(t.batch_size % t.grad_accum_steps == 0,
             f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}; change one of them.")
    p = c.parallel
    for key, size in (("parallel.data", p.data), ("parallel.fsdp", p.fsdp), ("parallel.tensor", p.tensor)):
        _require(size == -1 or size > 0, f"config key '{key}' must be positive or -1 (fill), got {size}.")
    _require([p.data, p.fsdp, p.tensor].count(-1) <= 1,
             "only one of parallel.data, parallel.fsdp, parallel.tensor may be -1 (fill the rest).")
    _require(p.cpu_devices >= 0, f"parallel.cpu_devices={p.cpu_devices} must be 0 (one per core) or a device count.")
    _require(math.isfinite(c.optim.lr), "optim.lr must be a finite number.")
    _require(0 < t.preemption_grace_s < math.inf, f"train.preemption_grace_s={t.preemption_grace_s} must be positive "
             "(the seconds the scheduler allows between SIGTERM and SIGKILL).")
