"""Decoding: greedy or temperature / top-k / top-p sampling, any number of new tokens, in batches.

The window. A model sees at most L = max_seq_len tokens, so token n (counting the prompt's
from 0) is drawn from the logits of a forward pass over tokens[a(n):n], where a(n) = 0 while
n <= L and otherwise the smallest multiple of the shift C with n - a(n) <= L (`window_start`).
Once the context is full the window slides C tokens at a time and holds between L - C + 1
and L tokens; C = 1 is nanoGPT's crop to the last L tokens at every step. The same rule holds for every position
kind (learned, sinusoidal, RoPE); tokens before a window are never seen again.

With the KV cache, the window's keys and values are cached and a new token costs one
position; when the window slides, the cache is refilled from the new window's L - C + 1
tokens (one prefill every C tokens). Without it (the reference) every token re-runs the
model over its window. Both draw the same tokens.

Rows of a batch may have prompts of different lengths: rows are aligned at their first
token, a shared part is prefilled and each prompt's remaining tokens are fed in place of
sampled ones. Row b draws with its own key (seed + b by default, folded with its new-token
index), so a row's samples do not depend on the batch around it. The device runs `chunk` steps per call; `stream`
yields each chunk's tokens as they arrive and stops every row at its own end id.
The text-in, text-out helpers and the command line are in lm.tools.generate and lm.cli.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model.transformer import Transformer

CHUNK = 16  # decoding steps per device call: the granularity of streaming


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def check(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise LMError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}; fix the flags.")


def sample(logits_BxV: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    """Next ids [B] from the last position's logits; `rng` is one key, or one key per row ([B])."""
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
    draw = jax.vmap(jax.random.categorical) if rng.shape else jax.random.categorical
    return draw(rng, logits_BxV).astype(jnp.int32)


def window_start(n, max_seq_len: int, shift: int):
    """a(n): the first token of the window that token n is drawn from (a Python or a traced integer)."""
    start = -(-(n - max_seq_len) // shift) * shift  # a multiple of shift, so a(n) grows in steps of shift
    return jnp.maximum(start, 0) if isinstance(n, jax.Array) else max(start, 0)


class _State(NamedTuple):
    """What the device carries from one decoding step to the next."""

    recent_BxL: jax.Array  # the last L tokens of each row, right-aligned (zeros before the first)
    n: jax.Array  # the index of the next token (the same for every row)
    prompt_BxL: jax.Array  # each row's prompt, left-aligned
    prompt_len_B: jax.Array
    keys_B: jax.Array  # each row's sampling key
    cache: object  # the layers' KV cache: () until the first prefill; None for the reference without one


def _positions(length: int, batch: int, start=0) -> jax.Array:
    return jnp.broadcast_to(start + jnp.arange(length), (batch, length))


def _cached_apply(params, cfg: ModelConfig, cache, tokens_BxT, positions_BxT):
    logits_BxTxV, updated = Transformer(cfg, decode=True).apply(
        {"params": params, "cache": cache}, tokens_BxT, positions_BxT, mutable=["cache"])
    return updated["cache"], logits_BxTxV[:, -1]


def _refill(params, cfg: ModelConfig, recent_BxL, length: int):
    """A fresh cache holding the last `length` tokens of `recent_BxL` at positions 0.., and the next logits."""
    B, L = recent_BxL.shape
    shapes = jax.eval_shape(lambda: Transformer(cfg, decode=True).init(jax.random.key(0), recent_BxL))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
    return _cached_apply(params, cfg, cache, recent_BxL[:, L - length:], _positions(length, B))


def _next_logits(params, state: _State, *, cfg: ModelConfig, shift: int, first: int):
    """(cache, logits [B, V] of token state.n) over the window of token n."""
    B, L = state.recent_BxL.shape
    n = state.n
    if state.cache is None:  # the reference: the whole window, left-aligned in L slots
        width = n - window_start(n, L, shift)
        window_BxL = jnp.roll(state.recent_BxL, width - L, axis=1)
        logits_BxLxV = Transformer(cfg).apply({"params": params}, window_BxL)
        return None, jax.lax.dynamic_index_in_dim(logits_BxLxV, width - 1, axis=1, keepdims=False)
    if first:  # the first window: the prompts' shared part, of static length
        return _refill(params, cfg, state.recent_BxL, first)
    start = window_start(n, L, shift)

    def extend(cache):
        return _cached_apply(params, cfg, cache, state.recent_BxL[:, -1:], _positions(1, B, n - 1 - start))

    return jax.lax.cond(start == window_start(n - 1, L, shift), extend,
                        lambda cache: _refill(params, cfg, state.recent_BxL, L - shift + 1), state.cache)


def _step(params, state: _State, *, cfg, sampling, shift, first=0):
    """Draws token state.n of every row (or feeds the prompt's, where a row's prompt is longer)."""
    cache, logits_BxV = _next_logits(params, state, cfg=cfg, shift=shift, first=first)
    keys_B = jax.vmap(jax.random.fold_in)(state.keys_B, state.n - state.prompt_len_B)
    drawn_B = sample(logits_BxV, keys_B, sampling)
    L = state.prompt_BxL.shape[1]
    forced_B = jax.lax.dynamic_index_in_dim(state.prompt_BxL, jnp.minimum(state.n, L - 1), axis=1, keepdims=False)
    token_B = jnp.where(state.n < state.prompt_len_B, forced_B, drawn_B)
    recent_BxL = jnp.concatenate([state.recent_BxL[:, 1:], token_B[:, None]], axis=1)
    return state._replace(recent_BxL=recent_BxL, n=state.n + 1, cache=cache), token_B


_STATIC = ("cfg", "sampling", "shift")


@functools.partial(jax.jit, static_argnames=_STATIC + ("first",))
def _first(params, state: _State, *, cfg, sampling, shift, first: int):
    """Prefills the first `first` tokens of every row (with a cache) and draws the next: [B, 1]."""
    state, token_B = _step(params, state, cfg=cfg, sampling=sampling, shift=shift, first=first)
    return state, token_B[:, None]


@functools.partial(jax.jit, static_argnames=_STATIC + ("steps",))
def _chunk(params, state: _State, *, cfg, sampling, shift, steps: int):
    """`steps` more tokens of every row: [B, steps]."""
    state, tokens_SxB = jax.lax.scan(
        lambda s, _: _step(params, s, cfg=cfg, sampling=sampling, shift=shift), state, None, length=steps)
    return state, tokens_SxB.T


def _rows(prompt_ids) -> list[np.ndarray]:
    """[P], [B, P] or a list of rows of any lengths -> a list of int32 rows."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)) or (len(prompt_ids) and np.ndim(prompt_ids[0]) == 0):
        prompt_ids = np.atleast_2d(np.asarray(prompt_ids))
    rows = [np.asarray(row, np.int32).reshape(-1) for row in prompt_ids]
    if not rows or any(len(row) == 0 for row in rows):
        raise LMError("a prompt encodes to no tokens; pass a non-empty prompt.")
    return rows


def _initial_state(rows: list[np.ndarray], seeds: Sequence[int], L: int, use_cache: bool) -> _State:
    """Before the first step: every row holds the first `first` tokens of its prompt, where `first` is the
    prompts' length, or for prompts of different lengths the power of two at or below the shortest
    (so batches of many prompts compile a few prefills, not one per length)."""
    lengths = np.array([len(row) for row in rows], np.int32)
    first = int(lengths.min())
    first = first if (lengths == first).all() else 1 << (first.bit_length() - 1)
    prompt_BxL = np.zeros((len(rows), L), np.int32)
    for b, row in enumerate(rows):
        prompt_BxL[b, :len(row)] = row
    recent_BxL = np.zeros_like(prompt_BxL)
    recent_BxL[:, L - first:] = prompt_BxL[:, :first]
    keys_B = jnp.stack([jax.random.key(s) for s in seeds])
    return _State(jnp.asarray(recent_BxL), jnp.int32(first), jnp.asarray(prompt_BxL), jnp.asarray(lengths), keys_B,
                  () if use_cache else None)


def stream(params, cfg: ModelConfig, prompt_ids, max_new_tokens: int, sampling: Sampling = Sampling(),
           seed: int | Sequence[int] = 0, *, eos_ids: Sequence[int] = (), use_cache: bool = True,
           shift: int | None = None, chunk: int = CHUNK) -> Iterator[tuple[list[np.ndarray], list[str | None]]]:
    """Generates up to `max_new_tokens` for each prompt row, yielding after every device call.

    `prompt_ids`: one prompt ([P]) or rows ([B, P], or a list of rows of any lengths).
    `seed`: row b draws with seed + b, or give one seed per row. Each item yielded is
    (the new ids of each row since the last item, each row's stop: None while it runs,
    "eos" once it drew one of `eos_ids` (not included in its ids), "max_new_tokens").
    The iteration ends when every row has stopped. `shift`: the window's slide (default L // 4).
    """
    sampling.check()
    rows = _rows(prompt_ids)
    L = cfg.max_seq_len
    shift = shift or max(1, L // 4)
    if max_new_tokens < 1:
        raise LMError(f"max_new_tokens={max_new_tokens} must be at least 1; raise it.")
    if not 1 <= shift <= L:
        raise LMError(f"the window shift {shift} must be between 1 and the context length {L}.")
    seeds = [seed + b for b in range(len(rows))] if isinstance(seed, int) else list(seed)
    rows = [row[window_start(len(row), L, shift):] for row in rows]  # earlier tokens are never seen
    state = _initial_state(rows, seeds, L, use_cache)
    lengths, first = np.asarray(state.prompt_len_B), int(state.n)
    cfg = dataclasses.replace(cfg, dropout=0.0, remat="none")
    static = dict(cfg=cfg, sampling=sampling, shift=shift)
    state, tokens_Bx1 = _first(params, state, first=first, **static)

    total = int(lengths.max()) + max_new_tokens - first  # steps until the last row has all its tokens
    steps = min(chunk, max(1, total - 1))
    queue = collections.deque([(first, tokens_Bx1)])
    done_steps = 1
    counts = np.zeros(len(rows), np.int64)  # new tokens of each row so far
    stops: list[str | None] = [None] * len(rows)
    eos = np.asarray(list(eos_ids) or [-1])
    while queue:
        if done_steps < total:  # keep one call in flight while this one's tokens are read
            state, tokens_BxS = _chunk(params, state, steps=steps, **static)
            queue.append((first + done_steps, tokens_BxS))
            done_steps += steps
        n, tokens_BxS = queue.popleft()
        tokens_BxS = np.asarray(tokens_BxS)
        pieces = []
        for b, row_tokens in enumerate(tokens_BxS):
            piece = row_tokens[max(0, lengths[b] - n):] if stops[b] is None else row_tokens[:0]
            piece = piece[:max_new_tokens - counts[b]]
            ends = np.flatnonzero(np.isin(piece, eos))
            if ends.size:
                piece, stops[b] = piece[:ends[0]], "eos"
            counts[b] += len(piece)
            if stops[b] is None and counts[b] == max_new_tokens:
                stops[b] = "max_new_tokens"
            pieces.append(piece)
        yield pieces, list(stops)
        if all(stops):
            return


def generate(params, cfg: ModelConfig, prompt_ids, max_new_tokens: int, sampling: Sampling = Sampling(),
             seed: int | Sequence[int] = 0, use_cache: bool = True, eos_ids: Sequence[int] = (),
             shift: int | None = None) -> list[np.ndarray]:
    """The new ids of each prompt row (see `stream`): up to `max_new_tokens` each, cut before an end id."""
    parts = None
    for pieces, _ in stream(params, cfg, prompt_ids, max_new_tokens, sampling, seed, eos_ids=eos_ids,
                            use_cache=use_cache, shift=shift):
        parts = parts or [[] for _ in pieces]
        for part, piece in zip(parts, pieces):
            part.append(piece)
    return [np.concatenate(part) for part in parts]
