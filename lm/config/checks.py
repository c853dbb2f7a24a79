"""Validation: every value and combination that cannot run is refused, in one sentence naming the key to change."""

from __future__ import annotations

import math
import re

from lm import storage
from lm.config.sections import (CHOICES, Config, DataConfig, ModelConfig, OptimConfig, flatten, is_layer_flags,
                                to_dict)
from lm.errors import LMError

# Keys (or whole sections, ending in '.') that only some optimizers read. Under another optim.name
# such a key must keep its default, since its value would be silently ignored.
OPTIMIZER_KEYS = {
    "optim.b1": ("adamw", "muon"),
    "optim.b2": ("adamw", "muon"),
    "optim.eps": ("adamw", "muon", "schedule_free_adamw"),
    "optim.min_lr_ratio": ("adamw", "muon", "lion"),
    "optim.decay_steps": ("adamw", "muon", "lion"),
    "optim.muon.": ("muon",),
    "optim.lion.": ("lion",),
    "optim.schedule_free_adamw.": ("schedule_free_adamw",),
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LMError(message)


def validate(c: Config) -> None:
    """Rejects values and combinations that cannot run, naming the key to change."""
    flat = flatten(to_dict(c))
    storage.check(c.run_dir, "run_dir")  # empty, or a scheme lm cannot store to
    for key, options in CHOICES.items():
        _require(flat[key] in options, f"config key '{key}' is {flat[key]!r}; choose one of {', '.join(options)}.")
    for key in ("model.n_layers", "model.d_model", "model.n_heads", "model.max_seq_len",
                "train.steps", "train.batch_size", "train.seq_len", "train.grad_accum_steps", "checkpoint.keep"):
        _require(flat[key] > 0, f"config key '{key}' must be positive, got {flat[key]}.")
    _require(c.eval.batches > 0, f"config key 'eval.batches' must be positive, got {c.eval.batches}; "
             "to turn in-training validation off, set eval.every=0.")
    # 0 means "none" or "derived" for these (docs/config.md, "Keys that take 0").
    for key in ("model.vocab_size", "model.n_kv_heads", "model.d_head", "model.d_ff", "model.sliding_window",
                "model.rope_local_theta", "model.attn_scale_dim", "optim.warmup_steps",
                "optim.decay_steps", "eval.every", "checkpoint.every", "log.every", "eval.batch_size",
                "optim.weight_decay", "optim.grad_clip", "optim.lr", "data.workers", "log.sample_tokens",
                "profile.start_step", "profile.steps", "parallel.cpu_chunk_tokens", "train.max_consecutive_skips"):
        _require(flat[key] >= 0, f"config key '{key}' must not be negative, got {flat[key]}.")
    for key in ("optim.b1", "optim.b2"):
        _require(0.0 <= flat[key] < 1.0, f"{key}={flat[key]} must be in [0, 1) (Adam's moment decay).")
    _require(not c.data.sha256 or SHA256.fullmatch(c.data.sha256) is not None,
             f"data.sha256={c.data.sha256!r} is not a SHA-256 digest (64 hexadecimal characters, as "
             "sha256sum prints); fix it or leave it empty.")
    m, t = c.model, c.train
    _validate_model(m)
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
    for key in ("model.dropout", "model.attention_dropout"):
        _require(0.0 <= flat[key] < 1.0, f"{key}={flat[key]} must be in [0, 1).")
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
    _require(not c.checkpoint.keep_best or c.eval.every > 0,
             "checkpoint.keep_best=true keeps the checkpoint with the lowest validation loss, but eval.every=0 runs "
             "no validation; set eval.every > 0, or checkpoint.keep_best=false.")
    _validate_optim(c.optim, flat)
    _require(0 < t.preemption_grace_s < math.inf, f"train.preemption_grace_s={t.preemption_grace_s} must be positive "
             "(the seconds the scheduler allows between SIGTERM and SIGKILL).")


def _validate_optim(o: OptimConfig, flat: dict) -> None:
    """The optimizer's own keys in range; another optimizer's keys at their defaults."""
    defaults = flatten(to_dict(Config()))
    for key, owners in OPTIMIZER_KEYS.items():
        for name in (k for k in flat if k == key or (key.endswith(".") and k.startswith(key))):
            whose = " and ".join(owner + "'s" for owner in owners)
            _require(o.name in owners or flat[name] == defaults[name],
                     f"config key '{name}' is set to {flat[name]!r}, but optim.name={o.name} ignores it (it is "
                     f"{whose}); remove it, or set optim.name to {' or '.join(owners)}.")
    for key in ("optim.muon.lr", "optim.muon.weight_decay", "optim.muon.consistent_rms",
                "optim.schedule_free_adamw.weight_lr_power"):
        _require(0 <= flat[key] < math.inf, f"config key '{key}' must be finite and not negative, got {flat[key]}.")
    _require(o.muon.ns_steps > 0, f"optim.muon.ns_steps={o.muon.ns_steps} must be positive.")
    sf = o.schedule_free_adamw
    for key, inside, bounds in (("optim.muon.beta", 0 <= o.muon.beta < 1, "[0, 1)"),
                                ("optim.lion.b1", 0 <= o.lion.b1 <= 1, "[0, 1]"),
                                ("optim.lion.b2", 0 <= o.lion.b2 <= 1, "[0, 1]"),
                                ("optim.schedule_free_adamw.b1", 0 < sf.b1 <= 1, "(0, 1]"),
                                ("optim.schedule_free_adamw.b2", 0 <= sf.b2 < 1, "[0, 1)")):
        _require(inside, f"config key '{key}' must be in {bounds}, got {flat[key]}.")


SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")
SHA256 = re.compile(r"[0-9A-Fa-f]{64}")


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
        _require(is_layer_flags(flags), f"{key}={flags!r} must be comma-separated 0/1 flags, one per layer and "
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
