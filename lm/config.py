"""Typed experiment config: YAML file + dotted `key=value` overrides, validated up front.

Every section is a frozen dataclass. `load_config(path, overrides)` reads the YAML with
`yaml.safe_load`, applies overrides such as `model.d_model=256`, checks every key and
type, and rejects impossible combinations before anything is built. Every key is a scalar
but `data.mixture`, a tuple of frozen `MixtureSource` entries (a list of mappings in YAML
and in `to_dict`); an override gives it a whole YAML list, or one entry's key as
`data.mixture.NAME.KEY=VALUE`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import re
import typing
from typing import Any

import yaml

from lm.errors import LMError

REMAT_POLICIES = (
    "none",
    "block",
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
    d_head: int = 0  # width of one attention head; 0: d_model // n_heads
    d_ff: int = 0  # 0: 4 * d_model
    max_seq_len: int = 1024
    norm: str = "layernorm"  # layernorm, rmsnorm, or rmsnorm_plus_one (scale 1 + w, w starting at 0: Gemma)
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre: x + f(norm(x)); post: x + norm(f(x)) (OLMo 2); sandwich: x + norm(f(norm(x)))
    qk_norm: str = "none"  # norm of queries and keys before RoPE: none, head (per head), all (over all heads)
    mlp: str = "gelu"  # gelu, swiglu (silu gate) or geglu (tanh-GELU gate)
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none, linear (positions / rope_factor) or llama3 (Llama 3.1 frequency bands)
    rope_factor: float = 1.0  # linear and llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
    rope_original_max_len: int = 8192  # llama3: the context length the model was first trained at
    rope_local_theta: float = 0.0  # RoPE base of sliding-window layers, unscaled (Gemma 3); 0: as the other layers
    rope_layers: str = "1"  # which layers apply RoPE: comma-separated 0/1 flags, repeated over the layers
    sliding_window: int = 0  # key j visible to query i iff i - W < j <= i on sliding layers; 0: no window
    sliding_layers: str = "1"  # which layers use sliding_window: comma-separated 0/1 flags, repeated over the layers
    attn_scale_dim: int = 0  # attention scores are scaled by attn_scale_dim ** -0.5; 0: head width
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (in the activation dtype)
    tie_embeddings: bool = True
    use_bias: bool = True
    qkv_bias: bool = False  # biases on the query, key and value projections even when use_bias is false (Qwen2)
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"
    scan_layers: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of block `layer`, or None for full causal attention."""
        return self.sliding_window if self.sliding_window and _flag(self.sliding_layers, layer) else None

    def layer_rope(self, layer: int) -> tuple[float, bool] | None:
        """(RoPE base, whether rope_scaling applies) for block `layer`, or None where it has no RoPE."""
        if self.position != "rope" or not _flag(self.rope_layers, layer):
            return None
        if self.rope_local_theta and self.layer_window(layer):
            return self.rope_local_theta, False
        return self.rope_theta, True

    @property
    def uniform_layers(self) -> bool:
        """Whether every block attends and rotates alike (what model.scan_layers stacks)."""
        kinds = {(self.layer_window(i), self.layer_rope(i)) for i in range(self.n_layers)}
        return len(kinds) == 1

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


def _flag(flags: str, layer: int) -> bool:
    """Flag `layer` of a per-layer pattern such as "1,1,1,0" (repeated over the layers)."""
    values = flags.split(",")
    return values[layer % len(values)].strip() == "1"


def _is_flags(flags: str) -> bool:
    return all(v.strip() in ("0", "1") for v in flags.split(","))


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One entry of data.mixture: own files or a named TFDS dataset, and its share of the training tokens.

    The data keys mean what the single-source keys of the same name mean (docs/data.md).
    """

    name: str = ""  # names the source in metrics, evaluation and overrides (letters, digits, _ and -)
    weight: float = 0.0  # expected share of training tokens; normalised over the entries
    files: str = ""  # comma-separated paths or globs of .txt / .jsonl files (or builtin:NAME)
    doc_separator: str = ""
    text_key: str = "text"
    tfds_name: str = ""
    train_split: str = "train"
    eval_split: str = "validation"


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
    source: str = "text_file"  # text_file: random windows of one file; tfds: packed documents (grain); mixture
    files: str = ""  # tfds source, own corpus: comma-separated paths or globs of .txt / .jsonl files
    doc_separator: str = ""  # cut text files into documents at this string ("\n" = newline); "": whole file
    text_key: str = "text"  # the text field of JSONL lines and of named datasets
    tfds_name: str = ""  # a named TFDS dataset (prepared as array_record), e.g. tiny_shakespeare
    tfds_data_dir: str = ""  # "": cache_dir/tfds
    train_split: str = "train"
    eval_split: str = "validation"
    workers: int = 0  # grain worker processes (0: in the training process); per source of a mixture
    mixture: tuple[MixtureSource, ...] = ()  # data.source=mixture: the weighted sources

    @property
    def packed(self) -> bool:
        """Whether batches are packed documents (with segment ids), not windows of one text."""
        return self.source in ("tfds", "mixture")

    @property
    def source_names(self) -> tuple[str, ...]:
        """The names of the mixture's sources; () for a single source."""
        return tuple(entry.name for entry in self.mixture) if self.source == "mixture" else ()


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
    "model.norm": ("layernorm", "rmsnorm", "rmsnorm_plus_one"),
    "model.norm_placement": ("pre", "post", "sandwich"),
    "model.qk_norm": ("none", "head", "all"),
    "model.mlp": ("gelu", "swiglu", "geglu"),
    "model.position": ("learned", "sinusoidal", "rope"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ("xla", "cudnn", "auto"),
    "model.remat": REMAT_POLICIES,
    "data.tokenizer": ("byte", "sentencepiece", "hf"),
    "data.spm_algorithm": ("bpe", "unigram"),
    "data.source": ("text_file", "tfds", "mixture"),
    "parallel.mode": ("mesh", "pmap"),
}


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: type) -> Any:
    """Returns `value` as type `tp`, or raises LMError naming `key`."""
    if typing.get_origin(tp) is tuple:
        return _entries(key, value, typing.get_args(tp)[0])
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


def _entries(key: str, value: Any, cls: type) -> tuple:
    """A list of mappings (YAML, or a YAML/JSON list given as an override) as a tuple of `cls` entries."""
    types = _field_types(cls)
    if value is None or value == "":
        return ()
    if not isinstance(value, (list, tuple)):
        raise LMError(f"config key '{key}' must be a list of entries with keys {', '.join(types)}, got {value!r}; "
                      "see docs/data.md#mixtures.")
    entries = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise LMError(f"{where} must be a mapping with keys {', '.join(types)}, got {item!r}; fix that entry.")
        for name in item:
            if name not in types:
                raise _unknown_key(f"{where}.{name}", [f"{where}.{known}" for known in types])
        entries.append(cls(**{name: _coerce(f"{where}.{name}", v, types[name]) for name, v in item.items()}))
    return tuple(entries)


def _edit_entries(flat: dict[str, Any], key: str) -> None:
    """Applies overrides `KEY.NAME.FIELD=value` to the entry of list `key` called NAME (in place)."""
    prefix = key + "."
    edits = {k: flat.pop(k) for k in [k for k in flat if k.startswith(prefix)]}
    if not edits:
        return
    entries = [dict(e) if isinstance(e, dict) else e for e in (flat.get(key) or [])]
    for dotted, value in edits.items():
        name, _, field = dotted[len(prefix):].rpartition(".")
        matches = [e for e in entries if isinstance(e, dict) and e.get("name") == name]
        if not matches or not field:
            names = ", ".join(str(e.get("name")) for e in entries if isinstance(e, dict)) or "none"
            raise LMError(f"override '{dotted}' names no entry of {key} (its names: {names}); "
                          f"use {key}.NAME.KEY=VALUE with one of those names.")
        matches[0][field] = value
    flat[key] = entries


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
    flat = dict(flat)
    _edit_entries(flat, "data.mixture")
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
    """The config as plain YAML/JSON values (the entries of data.mixture as a list of mappings)."""
    tree = dataclasses.asdict(config)
    tree["data"]["mixture"] = list(tree["data"]["mixture"])
    return tree


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
    for key in ("model.vocab_size", "model.n_kv_heads", "model.d_head", "model.d_ff", "model.sliding_window",
                "model.rope_local_theta", "model.attn_scale_dim", "optim.warmup_steps",
                "optim.decay_steps", "eval.every", "eval.batches", "eval.batch_size",
                "optim.weight_decay", "optim.grad_clip", "optim.lr", "data.workers", "log.sample_tokens",
                "profile.start_step", "profile.steps", "parallel.cpu_chunk_tokens"):
        _require(flat[key] >= 0, f"config key '{key}' must not be negative, got {flat[key]}.")
    m, t = c.model, c.train
    _validate_model(m)
    _require(t.seq_len <= m.max_seq_len,
             f"train.seq_len={t.seq_len} is above model.max_seq_len={m.max_seq_len}; lower train.seq_len or raise model.max_seq_len.")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1).")
    _require(0.0 < c.data.val_fraction < 1.0, f"data.val_fraction={c.data.val_fraction} must be in (0, 1).")
    _require(c.data.tokenizer != "sentencepiece" or c.data.tokenizer_model or c.data.vocab_size >= 300,
             f"data.vocab_size={c.data.vocab_size} is too small for SentencePiece with byte fallback "
             "(256 byte pieces + specials); use at least 300.")
    _validate_mixture(c.data)
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


SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _validate_mixture(d: DataConfig) -> None:
    """data.source=mixture needs named, positively weighted entries, each with exactly one source."""
    if d.source != "mixture":
        _require(not d.mixture, f"data.mixture is set but data.source is {d.source!r}; set data.source=mixture "
                 "to train on the mixture, or remove data.mixture (data.mixture=[]).")
        return
    _require(bool(d.mixture), "data.source=mixture needs data.mixture: a list of sources, each with a name, a "
             "weight and files or tfds_name (see docs/data.md#mixtures).")
    seen = set()
    for i, e in enumerate(d.mixture):
        where = f"data.mixture[{i}]" + (f" ({e.name})" if e.name else "")
        _require(bool(e.name), f"{where} has no name; give every source a name (letters, digits, _ and -).")
        _require(SOURCE_NAME.fullmatch(e.name) is not None,
                 f"{where}: the name {e.name!r} may hold only letters, digits, '_' and '-' (it names the source "
                 "in metrics and in overrides data.mixture.NAME.KEY=VALUE); rename it.")
        _require(e.name not in seen, f"data.mixture names '{e.name}' twice; give every source its own name.")
        seen.add(e.name)
        _require(math.isfinite(e.weight) and e.weight > 0,
                 f"{where} has weight {e.weight}; every weight must be a positive number (the weights are "
                 "normalised into each source's share of the training tokens).")
        _require(bool(e.files) or bool(e.tfds_name),
                 f"{where} names no data; set its files (paths, globs or builtin:NAME) or its tfds_name.")
        _require(not (e.files and e.tfds_name),
                 f"{where} sets both files and tfds_name; keep one (each entry is one source).")


def _validate_model(m: ModelConfig) -> None:
    _require(m.d_head or m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; change one of them "
             "(or set model.d_head).")
    _require(m.n_kv_heads <= m.n_heads and m.n_heads % m.kv_heads == 0,
             f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
             "choose n_kv_heads that divides n_heads.")
    _require(m.position != "rope" or m.head_dim % 2 == 0,
             f"model.position=rope needs an even head dimension, but it is {m.head_dim}; change model.d_head "
             "(or model.d_model / model.n_heads).")
    _require(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be positive.")
    for key, flags in (("model.sliding_layers", m.sliding_layers), ("model.rope_layers", m.rope_layers)):
        _require(_is_flags(flags), f"{key}={flags!r} must be comma-separated 0/1 flags, one per layer and "
                 "repeated over the layers (e.g. 1,1,1,1,1,0: every sixth layer off).")
    _require(m.rope_scaling == "none" or m.position == "rope",
             f"model.rope_scaling={m.rope_scaling} needs model.position=rope.")
    _require(m.rope_scaling == "none" or m.rope_factor > 0,
             f"model.rope_factor={m.rope_factor} must be positive.")
    _require(m.rope_scaling != "llama3" or 0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
             f"model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor < model.rope_high_freq_factor, "
             f"got {m.rope_low_freq_factor} and {m.rope_high_freq_factor}.")
    _require(m.rope_original_max_len > 0,
             f"model.rope_original_max_len={m.rope_original_max_len} must be positive.")
    _require(not m.scan_layers or m.uniform_layers,
             "model.scan_layers=true stacks identical blocks, but model.sliding_layers / model.rope_layers / "
             "model.rope_local_theta make the layers differ; set model.scan_layers=false.")
