"""Hugging Face model families <-> lm's ModelConfig: what each config.json means in lm's terms.

Every Llama-like family (the same tensor names: model.layers.N.self_attn.q_proj, ...) is one row
of FAMILIES: the ModelConfig flags it fixes and where its config.json keeps the rest (biases,
sliding windows, per-layer RoPE, Gemma's attention scale). One reader (`model_config`) and one
writer (`hf_config`) serve them all; GPT-2 (fused c_attn, learned positions) has its own pair.
Anything lm would compute differently is refused with one line rather than imported approximately,
and an export is written only when reading it back gives a model that computes the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model.layers import rope_frequencies

GPT2 = "GPT2LMHeadModel"
SLIDING, FULL = "sliding_attention", "full_attention"
# Model keys an import may override, and an export ignores: they change how the model runs, not what it computes.
RUNTIME_KEYS = ("dtype", "param_dtype", "attention", "remat", "scan_layers", "dropout", "attention_dropout")
# The Llama-style body every family below starts from.
LLAMA_BODY = dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False)


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face architecture with Llama's tensor names, in lm's terms."""

    arch: str  # the HF class in config.json's "architectures"
    model_type: str
    flags: dict = dataclasses.field(default_factory=dict)  # ModelConfig values the family fixes
    # config.json values lm reproduces (a missing key means this value)
    requires: dict = dataclasses.field(default_factory=lambda: {"hidden_act": "silu"})
    tied: bool = False  # tie_word_embeddings when config.json leaves it out
    # none: attention_bias must be false; shared: attention_bias == mlp_bias (model.use_bias); qkv: q, k, v always
    bias: str = "none"
    # whether layer i slides when config.json has no layer_types; None: the family has no windows
    sliding: Callable[[dict, int], bool] | None = None
    sliding_opt_in: bool = False  # windows only with use_sliding_window: true
    reads_layer_types: bool = True  # False: `sliding` decides even when config.json lists layer_types (Mistral)
    default_theta: float = 10000.0
    local_rope: bool = False  # sliding layers have their own RoPE (rope_parameters.sliding_attention; Gemma 3)
    rope_layers: bool = False  # no_rope_layers lists which layers apply RoPE (1) (SmolLM3)
    scale_key: str | None = None  # config.json key whose value**-0.5 scales attention scores (Gemma 3)


def _qwen_sliding(hf: dict, i: int) -> bool:
    return i >= hf.get("max_window_layers", 28)


def _gemma_period(hf: dict) -> int:  # every this-many-th layer is global
    return hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))


FAMILIES = {f.arch: f for f in (
    Family("LlamaForCausalLM", "llama", bias="shared"),  # Llama 2, 3, 3.1 (rope llama3), 3.2 (tied)
    Family("Qwen2ForCausalLM", "qwen2", {"qkv_bias": True}, bias="qkv", sliding=_qwen_sliding, sliding_opt_in=True),
    Family("Qwen3ForCausalLM", "qwen3", {"qk_norm": "head"}, sliding=_qwen_sliding, sliding_opt_in=True),
    Family("MistralForCausalLM", "mistral", sliding=lambda hf, i: True, reads_layer_types=False),
    Family("SmolLM3ForCausalLM", "smollm3", tied=True, bias="shared", default_theta=2e6, rope_layers=True,
           sliding=lambda hf, i: not _rope_flags(hf)[i], sliding_opt_in=True),
    Family("Olmo2ForCausalLM", "olmo2", {"norm_placement": "post", "qk_norm": "all"}),
    Family("Gemma3ForCausalLM", "gemma3_text",
           {"norm": "rmsnorm_plus_one", "norm_placement": "sandwich", "qk_norm": "head", "mlp": "geglu",
            "scale_embeddings": True},
           requires={"hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
                     "attn_logit_softcapping": None, "use_bidirectional_attention": False},
           tied=True, default_theta=1e6, local_rope=True, scale_key="query_pre_attn_scalar",
           sliding=lambda hf, i: (i + 1) % _gemma_period(hf) != 0),
)}
# Architectures people ask for that lm refuses, and why.
REFUSED = {
    "Phi3ForCausalLM": "Phi-3 fuses q, k, v into qkv_proj and gate, up into gate_up_proj, which lm does not split",
    "Gemma3ForConditionalGeneration": "this is Gemma 3's multimodal model; lm imports the text-only Gemma3ForCausalLM",
}


def architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    known = {GPT2: "gpt2", **{f.arch: f.model_type for f in FAMILIES.values()}}
    for arch, model_type in known.items():
        if arch in archs or (not archs and hf.get("model_type") == model_type):
            return arch
    for arch in archs:
        if arch in REFUSED:
            raise LMError(f"config.json describes {arch}: {REFUSED[arch]}; it cannot be imported exactly.")
    raise LMError(f"config.json describes {archs or hf.get('model_type')!r}; lm imports only {', '.join(known)} "
                  "(docs/hf.md).")


def _unsupported(what: str) -> LMError:
    return LMError(f"this checkpoint uses {what}, which lm's model does not implement; it cannot be imported exactly.")


def _pattern(flags: list[bool]) -> str:
    """The shortest 0/1 pattern that, repeated, gives `flags` (ModelConfig.sliding_layers / rope_layers)."""
    period = next(p for p in range(1, len(flags) + 1) if all(f == flags[i % p] for i, f in enumerate(flags)))
    return ",".join("1" if f else "0" for f in flags[:period])


def _rope_flags(hf: dict) -> list[bool]:
    flags = hf.get("no_rope_layers")
    if flags is None:
        every = hf.get("no_rope_layer_interval", 4)
        flags = [(i + 1) % every != 0 for i in range(hf["num_hidden_layers"])]
    return [bool(f) for f in flags]


def _rope_scaling(params: dict, theta: float, max_len: int) -> dict:
    """ModelConfig RoPE keys for one rope_parameters dict (v5) or rope_scaling dict (v4, `type` = rope_type)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(f"partial_rotary_factor={params['partial_rotary_factor']} (RoPE on part of each head)")
    out = {"rope_theta": float(params.get("rope_theta", theta))}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_len": int(params.get("original_max_position_embeddings", max_len))}
    raise _unsupported(f"RoPE scaling {kind!r} (lm implements default, linear and llama3)")


def _rope(hf: dict, family: Family) -> dict:
    """RoPE keys from v5 `rope_parameters` (nested by layer type for Gemma 3) or v4 `rope_theta` + `rope_scaling`."""
    max_len = hf.get("max_position_embeddings", 2048)
    theta = hf.get("rope_theta", family.default_theta)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(f"partial_rotary_factor={hf['partial_rotary_factor']} (RoPE on part of each head)")
    if not family.local_rope:  # v4's rope_scaling wins over rope_parameters, as in transformers
        return _rope_scaling(hf.get("rope_scaling") or hf.get("rope_parameters") or {}, theta, max_len)
    nested = hf.get("rope_parameters") if FULL in (hf.get("rope_parameters") or {}) else {}
    full = nested.get(FULL) or hf.get("rope_scaling") or {}
    local = nested.get(SLIDING) or {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    out, local_out = _rope_scaling(full, theta, max_len), _rope_scaling(local, 10000.0, max_len)
    if local_out == out:  # sliding layers rotate like the others
        return out
    if len(local_out) > 1:
        raise _unsupported(f"RoPE scaling {local.get('rope_type')!r} on the sliding-window layers")
    return {**out, "rope_local_theta": local_out["rope_theta"]}


def _windows(hf: dict, family: Family, n_layers: int) -> dict:
    window = hf.get("sliding_window")
    if family.sliding is None or not window or (family.sliding_opt_in and not hf.get("use_sliding_window")):
        return {}
    types = hf.get("layer_types") if family.reads_layer_types else None
    flags = [t == SLIDING for t in types] if types else [family.sliding(hf, i) for i in range(n_layers)]
    if len(flags) != n_layers:
        raise LMError(f"config.json lists {len(flags)} layer_types for {n_layers} layers; it is inconsistent.")
    return {"sliding_window": int(window), "sliding_layers": _pattern(flags)} if any(flags) else {}


def _biases(hf: dict, family: Family) -> dict:
    attention_bias = bool(hf.get("attention_bias", False))
    if family.bias == "shared":
        if attention_bias != bool(hf.get("mlp_bias", False)):
            raise _unsupported("attention_bias != mlp_bias (lm has one model.use_bias)")
        return {"use_bias": attention_bias}
    if attention_bias:
        raise _unsupported(f"attention_bias=true, which {family.arch} puts on q, k, v and o but not the MLP")
    return {}


def model_config(hf: dict) -> ModelConfig:
    """Our ModelConfig for an HF config.json (checked: anything we would compute differently is refused)."""
    arch = architecture(hf)
    if arch == GPT2:
        return _gpt2_config(hf)
    family = FAMILIES[arch]
    for key, value in family.requires.items():
        if hf.get(key, value) != value:
            raise _unsupported(f"{key}={hf[key]!r} (lm reproduces {family.arch} with {key}={value!r})")
    d, n_heads, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or d // n_heads
    extra = {**LLAMA_BODY, **family.flags, **_biases(hf, family), **_rope(hf, family), **_windows(hf, family, n_layers)}
    if family.rope_layers:
        extra["rope_layers"] = _pattern(_rope_flags(hf)[:n_layers])
    if family.scale_key and hf.get(family.scale_key, head_dim) != head_dim:
        extra["attn_scale_dim"] = int(hf[family.scale_key])
    return ModelConfig(vocab_size=hf["vocab_size"], n_layers=n_layers, d_model=d, n_heads=n_heads,
                       n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"],
                       d_head=0 if head_dim * n_heads == d else head_dim,
                       max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=hf.get("tie_word_embeddings", family.tied),
                       init_std=hf.get("initializer_range", 0.02),
                       attention_dropout=float(hf.get("attention_dropout", 0.0)), **extra)


def _gpt2_config(hf: dict) -> ModelConfig:
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


def _rope_dict(cfg: ModelConfig, theta: float, scaled: bool) -> dict:
    out = {"rope_type": "default", "rope_theta": theta}
    if scaled and cfg.rope_scaling == "linear":
        out.update(rope_type="linear", factor=cfg.rope_factor)
    elif scaled and cfg.rope_scaling == "llama3":
        out.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_len)
    return out


def _write(family: Family, cfg: ModelConfig) -> dict:
    """config.json of `family` for cfg (what that family cannot say is simply left out)."""
    n = cfg.n_layers
    out = {"architectures": [family.arch], "model_type": family.model_type, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim, "num_hidden_layers": n,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
           "attention_dropout": cfg.attention_dropout, **family.requires}
    if family.bias == "shared":
        out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    if family.local_rope:
        local = (cfg.rope_local_theta, False) if cfg.rope_local_theta else (cfg.rope_theta, True)
        out["rope_parameters"] = {FULL: _rope_dict(cfg, cfg.rope_theta, True), SLIDING: _rope_dict(cfg, *local)}
    else:
        out["rope_parameters"] = _rope_dict(cfg, cfg.rope_theta, True)
    sliding = [cfg.layer_window(i) is not None for i in range(n)]
    if family.sliding is not None:
        if any(sliding):
            out["sliding_window"] = cfg.sliding_window
        elif not family.reads_layer_types:  # Mistral: windowed unless told None (Gemma 3 needs a value either way)
            out["sliding_window"] = None
        if family.sliding_opt_in:
            out["use_sliding_window"] = any(sliding)
        if family.reads_layer_types:
            out["layer_types"] = [SLIDING if s else FULL for s in sliding]
    if family.rope_layers:
        out["no_rope_layers"] = [int(cfg.layer_rope(i) is not None) for i in range(n)]
    if family.scale_key:
        out[family.scale_key] = cfg.attn_scale_dim or cfg.head_dim
    return out


def _write_gpt2(cfg: ModelConfig) -> dict:
    return {"architectures": [GPT2], "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ff_dim, "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std}


def signature(cfg: ModelConfig) -> dict:
    """What decides the function a ModelConfig computes from its weights (zeros and defaults resolved)."""
    def rope(i):
        kind = cfg.layer_rope(i)
        return None if kind is None else tuple(rope_frequencies(cfg, *kind).tolist())

    return {"vocab_size": cfg.vocab_size, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.kv_heads, "d_head": cfg.head_dim, "d_ff": cfg.ff_dim, "max_seq_len": cfg.max_seq_len,
            "norm": cfg.norm, "norm_eps": cfg.norm_eps, "norm_placement": cfg.norm_placement, "qk_norm": cfg.qk_norm,
            "mlp": cfg.mlp, "position": cfg.position, "attn_scale_dim": cfg.attn_scale_dim or cfg.head_dim,
            "scale_embeddings": cfg.scale_embeddings, "tie_embeddings": cfg.tie_embeddings, "use_bias": cfg.use_bias,
            "qkv_bias": cfg.qkv_bias or cfg.use_bias,
            "sliding_window (per layer)": [cfg.layer_window(i) for i in range(cfg.n_layers)],
            "rope (per layer)": [rope(i) for i in range(cfg.n_layers)]}


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for our model: the first family that, read back, computes the same function; else an LMError."""
    want, closest = signature(cfg), None
    for config in [_write_gpt2(cfg)] + [_write(f, cfg) for f in FAMILIES.values()]:
        try:
            got = signature(model_config(config))
        except LMError:
            continue
        differs = [k for k in want if got[k] != want[k]]
        if not differs:  # special ids are the run tokenizer's to say (lm.hf.export_run); no class defaults
            return {**config, "dtype": cfg.param_dtype, "bos_token_id": None, "pad_token_id": None, "eos_token_id": None}
        if closest is None or len(differs) < len(closest[1]):
            closest = (config["architectures"][0], differs)
    raise LMError(f"this model has no Hugging Face equivalent: the closest, {closest[0]}, differs in "
                  f"{', '.join('model.' + k for k in closest[1])}; docs/hf.md lists what export supports.")
