"""Hugging Face model families <-> lm's ModelConfig: what each config.json means in lm's terms.

Anything lm would compute differently is refused with one line rather than imported approximately.
"""

from __future__ import annotations

from lm.config import ModelConfig
from lm.errors import LMError

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"


def architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for arch, model_type in ((LLAMA, "llama"), (GPT2, "gpt2")):
        if arch in archs or (not archs and hf.get("model_type") == model_type):
            return arch
    raise LMError(f"config.json describes {archs or hf.get('model_type')!r}; lm imports only {LLAMA} and {GPT2}.")


def _unsupported(what: str) -> LMError:
    return LMError(f"this checkpoint uses {what}, which lm's model does not implement; it cannot be imported exactly.")


def model_config(hf: dict) -> ModelConfig:
    """Our ModelConfig for an HF config.json (checked: anything we would compute differently is refused)."""
    arch = architecture(hf)
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
