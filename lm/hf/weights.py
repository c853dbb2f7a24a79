"""Weight layouts: Hugging Face Llama / GPT-2 tensors <-> our parameter tree (numpy, both ways).

HF Llama uses torch `Linear` weights [out, in]; GPT-2 uses `Conv1D` weights [in, out]
with q, k, v fused in `c_attn`. Ours are Flax kernels [in, ...out] with heads split:
query [D, N, H], key/value [D, K, H], out [N, H, D]. Llama's HF checkpoints already use
the rotate-half RoPE layout that `lm.layers.apply_rope` implements, so no permutation.
"""

from __future__ import annotations

import jax
import numpy as np

from lm.config import ModelConfig
from lm.errors import LMError

# Buffers some checkpoints carry that are not parameters (causal masks, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class Tensors:
    """Named HF tensors; `take` pops one (checking its shape) so leftovers can be reported."""

    def __init__(self, tensors: dict[str, np.ndarray], prefix_to_strip: str = ""):
        self._t = {}
        for name, value in tensors.items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if prefix_to_strip and name.startswith(prefix_to_strip):
                name = name[len(prefix_to_strip):]
            self._t[name] = value

    def has(self, name: str) -> bool:
        return name in self._t

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._t:
            raise LMError(f"the checkpoint has no tensor '{name}'; it does not match its config.json.")
        value = self._t.pop(name)
        if tuple(value.shape) != tuple(shape):
            raise LMError(f"tensor '{name}' has shape {tuple(value.shape)} but config.json implies {tuple(shape)}; "
                          "the checkpoint does not match its config.json.")
        return value

    def check_consumed(self) -> None:
        if self._t:
            names = ", ".join(sorted(self._t)[:5])
            raise LMError(f"the checkpoint has tensors this architecture does not use ({names}); "
                          "it is not a plain LlamaForCausalLM / GPT2LMHeadModel.")


def _linear_in(t: Tensors, name: str, out_shape: tuple[int, ...], d_in: int) -> np.ndarray:
    """torch Linear weight [out, in] -> kernel [in, *out_shape]."""
    return t.take(name, (int(np.prod(out_shape)), d_in)).T.reshape((d_in,) + out_shape)


def _linear_out(kernel: np.ndarray) -> np.ndarray:
    """kernel [in..., out...] with a single output or input group -> torch Linear [out, in]."""
    return np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)


def _layer_norm(t: Tensors, name: str, d: int, bias: bool) -> dict:
    out = {"scale": t.take(f"{name}.weight", (d,))}
    if bias:
        out["bias"] = t.take(f"{name}.bias", (d,))
    return out


def llama_to_params(t: Tensors, cfg: ModelConfig) -> dict:
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
    params = {"token_embed": {"embedding": t.take("model.embed_tokens.weight", (cfg.vocab_size, D))}}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."

        def dense(name, out_shape, d_in=D, kernel_reshape=None):
            leaf = {"kernel": _linear_in(t, f"{p}{name}.weight", out_shape, d_in)}
            if kernel_reshape:
                leaf["kernel"] = leaf["kernel"].reshape(kernel_reshape)
            if cfg.use_bias:
                leaf["bias"] = t.take(f"{p}{name}.bias", (int(np.prod(out_shape)),)).reshape(out_shape)
            return leaf

        params[f"block_{i}"] = {
            "attn_norm": _layer_norm(t, f"{p}input_layernorm", D, False),
            "attn": {"query": dense("self_attn.q_proj", (N, H)), "key": dense("self_attn.k_proj", (K, H)),
                     "value": dense("self_attn.v_proj", (K, H)),
                     "out": dense("self_attn.o_proj", (D,), N * H, (N, H, D))},
            "mlp_norm": _layer_norm(t, f"{p}post_attention_layernorm", D, False),
            "mlp": {"gate": dense("mlp.gate_proj", (F,)), "up": dense("mlp.up_proj", (F,)),
                    "down": dense("mlp.down_proj", (D,), F)},
        }
    params["final_norm"] = _layer_norm(t, "model.norm", D, False)
    if not cfg.tie_embeddings:
        params["head"] = {"kernel": t.take("lm_head.weight", (cfg.vocab_size, D)).T}
    elif t.has("lm_head.weight"):  # tied checkpoints sometimes store the copy
        t.take("lm_head.weight", (cfg.vocab_size, D))
    t.check_consumed()
    return params


def params_to_llama(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {"model.embed_tokens.weight": params["token_embed"]["embedding"],
           "model.norm.weight": params["final_norm"]["scale"]}
    names = {("attn", "query"): "self_attn.q_proj", ("attn", "key"): "self_attn.k_proj",
             ("attn", "value"): "self_attn.v_proj", ("attn", "out"): "self_attn.o_proj",
             ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj", ("mlp", "down"): "mlp.down_proj"}
    for i in range(cfg.n_layers):
        block, p = params[f"block_{i}"], f"model.layers.{i}."
        out[f"{p}input_layernorm.weight"] = block["attn_norm"]["scale"]
        out[f"{p}post_attention_layernorm.weight"] = block["mlp_norm"]["scale"]
        for (group, ours), theirs in names.items():
            leaf = block[group][ours]
            kernel = leaf["kernel"]
            out[f"{p}{theirs}.weight"] = (_linear_out(kernel) if ours != "out"
                                          else np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T))
            if "bias" in leaf:
                out[f"{p}{theirs}.bias"] = leaf["bias"].reshape(-1)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(params["head"]["kernel"].T)
    return out


def gpt2_to_params(t: Tensors, cfg: ModelConfig) -> dict:
    D, N, H, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.ff_dim
    params = {"token_embed": {"embedding": t.take("wte.weight", (cfg.vocab_size, D))},
              "pos_embed": {"embedding": t.take("wpe.weight", (cfg.max_seq_len, D))}}
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        qkv_w = np.split(t.take(f"{p}attn.c_attn.weight", (D, 3 * D)), 3, axis=1)
        qkv_b = np.split(t.take(f"{p}attn.c_attn.bias", (3 * D,)), 3)
        attn = {name: {"kernel": w.reshape(D, N, H), "bias": b.reshape(N, H)}
                for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b)}
        attn["out"] = {"kernel": t.take(f"{p}attn.c_proj.weight", (D, D)).reshape(N, H, D),
                       "bias": t.take(f"{p}attn.c_proj.bias", (D,))}
        params[f"block_{i}"] = {
            "attn_norm": _layer_norm(t, f"{p}ln_1", D, True),
            "attn": attn,
            "mlp_norm": _layer_norm(t, f"{p}ln_2", D, True),
            "mlp": {"up": {"kernel": t.take(f"{p}mlp.c_fc.weight", (D, F)), "bias": t.take(f"{p}mlp.c_fc.bias", (F,))},
                    "down": {"kernel": t.take(f"{p}mlp.c_proj.weight", (F, D)),
                             "bias": t.take(f"{p}mlp.c_proj.bias", (D,))}},
        }
    params["final_norm"] = _layer_norm(t, "ln_f", D, True)
    if not cfg.tie_embeddings:
        params["head"] = {"kernel": t.take("lm_head.weight", (cfg.vocab_size, D)).T}
    elif t.has("lm_head.weight"):
        t.take("lm_head.weight", (cfg.vocab_size, D))
    t.check_consumed()
    return params


def params_to_gpt2(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    D = cfg.d_model
    out = {"transformer.wte.weight": params["token_embed"]["embedding"],
           "transformer.wpe.weight": params["pos_embed"]["embedding"],
           "transformer.ln_f.weight": params["final_norm"]["scale"],
           "transformer.ln_f.bias": params["final_norm"]["bias"]}
    for i in range(cfg.n_layers):
        block, p = params[f"block_{i}"], f"transformer.h.{i}."
        attn, mlp = block["attn"], block["mlp"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{p}{theirs}.weight"], out[f"{p}{theirs}.bias"] = block[ours]["scale"], block[ours]["bias"]
        out[f"{p}attn.c_attn.weight"] = np.concatenate(
            [attn[n]["kernel"].reshape(D, D) for n in ("query", "key", "value")], axis=1)
        out[f"{p}attn.c_attn.bias"] = np.concatenate([attn[n]["bias"].reshape(D) for n in ("query", "key", "value")])
        out[f"{p}attn.c_proj.weight"] = attn["out"]["kernel"].reshape(D, D)
        out[f"{p}attn.c_proj.bias"] = attn["out"]["bias"]
        out[f"{p}mlp.c_fc.weight"], out[f"{p}mlp.c_fc.bias"] = mlp["up"]["kernel"], mlp["up"]["bias"]
        out[f"{p}mlp.c_proj.weight"], out[f"{p}mlp.c_proj.bias"] = mlp["down"]["kernel"], mlp["down"]["bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(params["head"]["kernel"].T)
    return out


def stack_blocks(params: dict, n_layers: int) -> dict:
    """Per-layer block_{i} trees -> one 'blocks' tree with a leading layer axis (model.scan_layers)."""
    blocks = [params.pop(f"block_{i}") for i in range(n_layers)]
    params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return params


def unstack_blocks(params: dict, n_layers: int) -> dict:
    params = dict(params)
    blocks = params.pop("blocks")
    for i in range(n_layers):
        params[f"block_{i}"] = jax.tree.map(lambda x: x[i], blocks)
    return params
