"""Weight layouts: Hugging Face tensors <-> our parameter tree (numpy, both ways).

The Llama-named families (families.FAMILIES) use torch `Linear` weights [out, in]; GPT-2 uses
`Conv1D` weights [in, out] with q, k, v fused in `c_attn`. Ours are Flax kernels [in, ...out]
with heads split: query [D, N, H], key/value [D, K, H], out [N, H, D]. `llama_layout` lists every
tensor of a Llama-named checkpoint once, for both directions. Their HF checkpoints already use
the rotate-half RoPE layout that `lm.model.layers.apply_rope` implements, so no permutation.
"""

from __future__ import annotations

import dataclasses

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
            raise LMError(f"the checkpoint has tensors its config.json's architecture does not use ({names}); "
                          "lm imports only what it computes exactly, so it cannot import this one.")


def _layer_norm(t: Tensors, name: str, d: int, bias: bool) -> dict:
    out = {"scale": t.take(f"{name}.weight", (d,))}
    if bias:
        out["bias"] = t.take(f"{name}.bias", (d,))
    return out


# Our block norms -> HF names, by model.norm_placement (OLMo 2 and Gemma 3 reuse post_attention_layernorm).
NORM_NAMES = {
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "post": {"attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
    "sandwich": {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: our parameter path and shape, its HF name and shape; `linear`: a torch Linear weight
    [out, in], so ours is its transpose ([in..., out...])."""

    path: tuple[str, ...]
    name: str
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    linear: bool = False

    def to_ours(self, value: np.ndarray) -> np.ndarray:
        return (value.T if self.linear else value).reshape(self.shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value.reshape(self.hf_shape[::-1]).T if self.linear else value.reshape(self.hf_shape))


def llama_layout(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of a Llama-named checkpoint (Llama, Qwen2/3, Mistral, SmolLM3, OLMo 2, Gemma 3) for cfg."""
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim, cfg.vocab_size

    def linear(path, name, d_in, d_out, bias):
        entries = [Entry(path + ("kernel",), f"{name}.weight", d_in + d_out,
                         (int(np.prod(d_out)), int(np.prod(d_in))), linear=True)]
        if bias:
            entries.append(Entry(path + ("bias",), f"{name}.bias", d_out, (int(np.prod(d_out)),)))
        return entries

    def vector(path, name, shape):
        return Entry(path, name, shape, (int(np.prod(shape)),))

    entries = [Entry(("token_embed", "embedding"), "model.embed_tokens.weight", (V, D), (V, D))]
    in_bias = cfg.use_bias or cfg.qkv_bias
    norm_shapes = {"head": ((H,), (H,)), "all": ((N * H,), (K * H,))}.get(cfg.qk_norm)
    for i in range(cfg.n_layers):
        b, p = f"block_{i}", f"model.layers.{i}."
        entries += [vector((b, ours, "scale"), f"{p}{theirs}.weight", (D,))
                    for ours, theirs in NORM_NAMES[cfg.norm_placement].items()]
        entries += linear((b, "attn", "query"), f"{p}self_attn.q_proj", (D,), (N, H), in_bias)
        entries += linear((b, "attn", "key"), f"{p}self_attn.k_proj", (D,), (K, H), in_bias)
        entries += linear((b, "attn", "value"), f"{p}self_attn.v_proj", (D,), (K, H), in_bias)
        entries += linear((b, "attn", "out"), f"{p}self_attn.o_proj", (N, H), (D,), cfg.use_bias)
        if norm_shapes:
            entries += [vector((b, "attn", "query_norm", "scale"), f"{p}self_attn.q_norm.weight", norm_shapes[0]),
                        vector((b, "attn", "key_norm", "scale"), f"{p}self_attn.k_norm.weight", norm_shapes[1])]
        for ours, d_in, d_out in (("gate", D, F), ("up", D, F), ("down", F, D)):
            entries += linear((b, "mlp", ours), f"{p}mlp.{ours}_proj", (d_in,), (d_out,), cfg.use_bias)
    entries.append(vector(("final_norm", "scale"), "model.norm.weight", (D,)))
    if not cfg.tie_embeddings:
        entries += linear(("head",), "lm_head", (D,), (V,), False)
    return entries


def llama_to_params(t: Tensors, cfg: ModelConfig) -> dict:
    params: dict = {}
    for entry in llama_layout(cfg):
        *parents, leaf = entry.path
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = entry.to_ours(t.take(entry.name, entry.hf_shape))
    if cfg.tie_embeddings and t.has("lm_head.weight"):  # tied checkpoints sometimes store the copy
        t.take("lm_head.weight", (cfg.vocab_size, cfg.d_model))
    t.check_consumed()
    return params


def params_to_llama(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {}
    for entry in llama_layout(cfg):
        value = params
        for key in entry.path:
            value = value[key]
        out[entry.name] = entry.to_hf(np.asarray(value))
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
