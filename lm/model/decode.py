"""Decoding with a KV cache: greedy or temperature / top-k / top-p sampling, as pure functions.

The prompt is run once through the model (prefill), filling each layer's key/value cache;
every new token then costs one position. A prompt that does not fit the context with the
new tokens keeps only its last `max_seq_len - max_new_tokens` tokens. The command line and
the text-in, text-out helpers are in lm.tools.generate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def check(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise LMError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}; fix the flags.")


def sample(logits_BxV: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    """Next ids [B] from the last position's logits."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if s.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / s.temperature
    if s.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, min(s.top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if s.top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < s.top_p  # the top token is always kept
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)


def _positions(start, length: int, batch: int) -> jax.Array:
    return jnp.broadcast_to(start + jnp.arange(length), (batch, length))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling"))
def _generate_cached(params, prompt_BxP, rng, *, cfg: ModelConfig, max_new_tokens: int, sampling: Sampling):
    model = Transformer(cfg, decode=True)
    B, P = prompt_BxP.shape
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((B, P + max_new_tokens), jnp.int32)))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def forward(cache, tokens_BxT, start):
        logits_BxTxV, updated = model.apply({"params": params, "cache": cache}, tokens_BxT,
                                            _positions(start, tokens_BxT.shape[1], B), mutable=["cache"])
        return updated["cache"], logits_BxTxV[:, -1]

    cache, logits_BxV = forward(cache, prompt_BxP, 0)
    first_B = sample(logits_BxV, jax.random.fold_in(rng, 0), sampling)

    def step(carry, i):
        cache, token_B = carry
        cache, logits_BxV = forward(cache, token_B[:, None], P + i - 1)
        next_B = sample(logits_BxV, jax.random.fold_in(rng, i), sampling)
        return (cache, next_B), next_B

    _, rest_NxB = jax.lax.scan(step, (cache, first_B), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling"))
def _generate_full(params, prompt_BxP, rng, *, cfg: ModelConfig, max_new_tokens: int, sampling: Sampling):
    """The reference without a cache: every token re-runs the model over the whole (fixed-size) window."""
    model = Transformer(cfg)
    B, P = prompt_BxP.shape
    window_BxL = jnp.pad(prompt_BxP, ((0, 0), (0, max_new_tokens)))

    def step(window_BxL, i):
        logits_BxLxV = model.apply({"params": params}, window_BxL)
        logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, P + i - 1, axis=1, keepdims=False)
        next_B = sample(logits_BxV, jax.random.fold_in(rng, i), sampling)
        return jax.lax.dynamic_update_index_in_dim(window_BxL, next_B, P + i, axis=1), None

    window_BxL, _ = jax.lax.scan(step, window_BxL, jnp.arange(max_new_tokens))
    return window_BxL[:, P:]


def fit_prompt(prompt_ids: np.ndarray, max_seq_len: int, max_new_tokens: int) -> np.ndarray:
    """The prompt, cut to its last max_seq_len - max_new_tokens ids when prompt + new tokens overflow."""
    if not 0 < max_new_tokens < max_seq_len:
        raise LMError(f"max_new_tokens={max_new_tokens} must be between 1 and the context length "
                      f"{max_seq_len} - 1; lower it.")
    if len(prompt_ids) == 0:
        raise LMError("the prompt encodes to no tokens; pass a non-empty --prompt.")
    return np.asarray(prompt_ids)[-(max_seq_len - max_new_tokens):]


def generate(params, cfg: ModelConfig, prompt_ids, max_new_tokens: int, sampling: Sampling = Sampling(),
             seed: int = 0, use_cache: bool = True) -> np.ndarray:
    """New token ids [B, max_new_tokens] continuing each row of `prompt_ids` ([P] or [B, P], equal lengths)."""
    sampling.check()
    prompt_BxP = np.atleast_2d(np.asarray(prompt_ids, np.int32))
    prompt_BxP = np.stack([fit_prompt(row, cfg.max_seq_len, max_new_tokens) for row in prompt_BxP])
    cfg = dataclasses.replace(cfg, dropout=0.0, remat="none")
    fn = _generate_cached if use_cache else _generate_full
    out = fn(params, jnp.asarray(prompt_BxP), jax.random.key(seed), cfg=cfg, max_new_tokens=max_new_tokens,
             sampling=sampling)
    return np.asarray(out)
