"""TrainState, the loss, and the pure train and eval steps.

`train_step(state, batch) -> (state, metrics)` holds the whole update. Parallelism wraps
it (jit over a mesh, or per device under pmap or shard_map); the only hook is `axis_name`,
which a per-device wrapper sets so the step sums loss and gradients over its devices.
A batch is a dict of [B, T] arrays: `inputs`, `targets`, and optionally `weights`
(0 masks a target out), `positions` and `segment_ids` (packed documents).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from lm.model.transformer import head_logits
from lm.parallel.cpu import pass_count

Batch = dict[str, jax.Array]
# train.loss_chunk_tokens=-1: chunks whose float32 logits take at most this much per device,
AUTO_LOSS_CHUNK_BYTES = 256 * 2**20
# or, where the runtime knows the device's memory (a GPU), the whole loss when its float32 logits
# take at most this share of it: the whole loss ran 12% faster than tiles on an H200 (gpt2_124m,
# batch 32) and needs about 1.3x its logits' bytes more, which the rest of a step (unknown here)
# then has beside it (docs/scaling.md).
WHOLE_LOSS_SHARE = 0.125


@struct.dataclass
class TrainState:
    step: jax.Array  # completed updates, int32 scalar
    params: Any
    opt_state: Any


def init_params(model: nn.Module, rng: jax.Array, seq_len: int):
    """Unboxed float parameters of `model` (logical axis names are read separately)."""
    variables = model.init({"params": rng}, jnp.zeros((1, seq_len), jnp.int32))
    return nn.meta.unbox(variables)["params"]


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, seq_len: int) -> TrainState:
    params = init_params(model, rng, seq_len)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _weights(batch: Batch) -> jax.Array:
    if "weights" in batch:
        return batch["weights"].astype(jnp.float32)
    return jnp.ones(batch["targets"].shape, jnp.float32)


def loss_chunk_tokens(setting: int, vocab_size: int, whole_tokens: int = 0, memory_bytes: int | None = None) -> int:
    """train.loss_chunk_tokens resolved: -1 (auto) is 0 (the whole batch at once) when the float32
    logits of `whole_tokens` (one micro-batch on a device) take at most WHOLE_LOSS_SHARE of
    `memory_bytes` (None: unknown), else the tokens whose float32 logits fill AUTO_LOSS_CHUNK_BYTES."""
    if setting != -1:
        return setting
    if memory_bytes and 4 * vocab_size * whole_tokens <= WHOLE_LOSS_SHARE * memory_bytes:
        return 0
    return max(1, AUTO_LOSS_CHUNK_BYTES // (4 * vocab_size))


def loss_chunks(rows: int, seq_len: int, chunk_tokens: int) -> int:
    """Fewest equal slices of the sequence whose `rows` x slice tokens are at most `chunk_tokens`
    (one position at least; 0: one slice). `rows` are one device's."""
    return pass_count(seq_len, rows, chunk_tokens)  # the same search, over positions instead of rows


def _cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """logsumexp(logits) - the target's logit, in float32: optax's integer-label cross-entropy to
    the bit, with the target's logit picked by a compare against an iota instead of a gather. A
    gather's gradient is a scatter, which on a GPU took three passes over float32 [tokens, vocab]
    (softmax times the cotangent, the scatter, the cast to bf16); a select fuses into one."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    vocab_BxTxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxTxV.shape, 2)
    target_logit_BxT = jnp.where(vocab_BxTxV == targets_BxT[..., None], logits_BxTxV, 0.0).sum(axis=-1)
    return jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_logit_BxT


def token_losses(params, model: nn.Module, batch: Batch, dropout_rng: jax.Array | None = None, *,
                 chunk_tokens: int = 0, batch_ways: int = 1) -> jax.Array:
    """Next-token cross-entropy per position [B, T], computed in float32.

    With `chunk_tokens` > 0 the output layer and the cross-entropy run over slices of the
    sequence (`loss_chunks` of each device's B / `batch_ways` rows), each recomputed in the
    backward pass, so only one slice's float32 logits exist at a time: the same losses and
    gradients, to float rounding.
    """
    B, T = batch["targets"].shape
    n = loss_chunks(B // batch_ways, T, chunk_tokens)
    hidden_or_logits = model.apply(
        {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"),
        deterministic=dropout_rng is None, rngs=None if dropout_rng is None else {"dropout": dropout_rng},
        head=n == 1)
    if n == 1:
        return _cross_entropy(hidden_or_logits, batch["targets"])

    def chunk(xs):
        hidden_BxCxD, targets_BxC = xs
        return _cross_entropy(head_logits(model.cfg, params, hidden_BxCxD), targets_BxC)

    def split(x_BxT):  # [B, T, ...] -> [n, B, T/n, ...]: each slice keeps the batch's layout
        return jnp.moveaxis(x_BxT.reshape((B, n, T // n) + x_BxT.shape[2:]), 1, 0)

    losses_nxBxC = jax.lax.map(jax.checkpoint(chunk), (split(hidden_or_logits), split(batch["targets"])))
    return jnp.moveaxis(losses_nxBxC, 0, 1).reshape(B, T)


def psum_flat(tree, axis_name: str):
    """psum of a pytree as one flat float32 buffer: one collective, where XLA:CPU meets its
    devices once per buffer (37 meetings a shakespeare_cpu step otherwise)."""
    flat, unravel = ravel_pytree(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
    return jax.tree.map(lambda x, like: x.astype(like.dtype), unravel(jax.lax.psum(flat, axis_name)), tree)


def _split_micro(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], micro-batch i taking every n-th row so each stays spread over devices."""
    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, seed: int, grad_accum_steps: int = 1, skip_nonfinite: bool = False,
               loss_chunk_tokens: int = 0, batch_ways: int = 1, clip_norm: float = 0.0,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the global batch (mean loss over its weighted targets).

    `loss_chunk_tokens` and `batch_ways` (how many ways the batch is split over devices) tile
    the cross-entropy (`token_losses`). With `axis_name` the step runs on one device's rows
    (pmap, shard_map): weights, loss and gradients are summed over that axis in one `psum_flat`
    after the backward pass (the loss is differentiated as a sum, then divided by the summed
    weights), and each device draws its own dropout masks.

    `clip_norm` > 0 scales the summed gradients by min(1, clip_norm / their global norm) before
    `tx` (optim.grad_clip); metrics['grad_norm'] is that norm, before clipping.

    metrics['nonfinite'] is 1 when the loss or gradients hold a NaN or Inf. With
    `skip_nonfinite` such an update is dropped (params and optimizer state stay as they
    were) while the step still counts, so the next step sees the next batch.
    """
    step_rng = jax.random.fold_in(jax.random.key(seed), state.step)
    reduce: Callable[[Any], Any] = lambda x: x
    if axis_name is not None:
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
        reduce = functools.partial(psum_flat, axis_name=axis_name)
    use_dropout = model.cfg.dropout > 0 or model.cfg.attention_dropout > 0

    def loss_fn(params, micro: Batch, rng: jax.Array):
        losses_BxT = token_losses(params, model, micro, rng if use_dropout else None,
                                  chunk_tokens=loss_chunk_tokens, batch_ways=batch_ways)
        return (losses_BxT * _weights(micro)).sum()

    grad_fn = jax.value_and_grad(loss_fn)
    if grad_accum_steps == 1:
        loss_sum, grad_sums = grad_fn(state.params, batch, step_rng)
    else:
        def accumulate(carry, xs):
            index, micro = xs
            loss_i, grads_i = grad_fn(state.params, micro, jax.random.fold_in(step_rng, index))
            return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        micro_batches = _split_micro(batch, grad_accum_steps)
        (loss_sum, grad_sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches))
    loss_sum, grad_sums, total_weight = reduce((loss_sum, grad_sums, _weights(batch).sum()))
    loss = loss_sum / total_weight
    grad_norm = optax.tree.norm(grad_sums) / total_weight
    # The mean's 1/weight and the clipping factor: one scale, fused into the optimizer's own pass.
    scale = 1.0 / total_weight
    if clip_norm > 0:
        scale = scale * jnp.minimum(1.0, clip_norm / grad_norm)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grad_sums)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, model: nn.Module, pass_tokens: int = 0, batch_ways: int = 1,
              loss_chunk_tokens: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted target losses, sum of weights) for one batch, without dropout.

    With `pass_tokens` > 0, each of the batch's `batch_ways` device shards is walked in
    passes of at most that many tokens (`lm.parallel.cpu.pass_count`); `loss_chunk_tokens`
    tiles the cross-entropy (`token_losses`).
    """
    def sums(micro: Batch) -> tuple[jax.Array, jax.Array]:
        weights_BxT = _weights(micro)
        losses_BxT = token_losses(params, model, micro, chunk_tokens=loss_chunk_tokens, batch_ways=batch_ways)
        return (losses_BxT * weights_BxT).sum(), weights_BxT.sum()

    rows, seq_len = batch["targets"].shape
    passes = pass_count(rows // batch_ways, seq_len, pass_tokens)
    if passes == 1:
        return sums(batch)
    per_pass = jax.lax.map(sums, _split_micro(batch, passes))
    return jax.tree.map(jnp.sum, per_pass)
