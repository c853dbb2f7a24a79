"""The tiled cross-entropy: the same losses and gradients as the whole [B, T, V] computation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.config import ModelConfig
from lm.model.transformer import Transformer
from lm.training.step import AUTO_LOSS_CHUNK_BYTES, eval_step, init_params, loss_chunk_tokens, loss_chunks, token_losses


def test_chunk_count():
    assert loss_chunks(rows=4, seq_len=64, chunk_tokens=0) == 1  # 0: whole
    assert loss_chunks(rows=4, seq_len=64, chunk_tokens=256) == 1
    assert loss_chunks(rows=4, seq_len=64, chunk_tokens=64) == 4  # 16 positions x 4 rows
    assert loss_chunks(rows=4, seq_len=64, chunk_tokens=100) == 4  # 32 positions would be 128 tokens
    assert loss_chunks(rows=64, seq_len=64, chunk_tokens=8) == 64  # one position at least
    # auto: float32 logits of at most AUTO_LOSS_CHUNK_BYTES; GPT-2's vocabulary, 8 rows of 1024 per chip
    tokens = loss_chunk_tokens(-1, 50257)
    assert tokens == AUTO_LOSS_CHUNK_BYTES // (4 * 50257) and loss_chunks(8, 1024, tokens) == 8
    assert loss_chunk_tokens(0, 50257) == 0 and loss_chunk_tokens(512, 50257) == 512
    # Where the device's memory is known (a GPU) the loss stays whole while its float32 logits take at most
    # an eighth of it: gpt2_124m at 32 x 1024 (6.1 GiB) on an H200's 105 GiB pool, not at 256 x 1024.
    pool = int(0.75 * 150754820096)
    assert loss_chunk_tokens(-1, 50304, 32 * 1024, pool) == 0
    assert loss_chunk_tokens(-1, 50304, 256 * 1024, pool) == AUTO_LOSS_CHUNK_BYTES // (4 * 50304)
    assert loss_chunk_tokens(-1, 50304, 32 * 1024, None) == AUTO_LOSS_CHUNK_BYTES // (4 * 50304)
    assert loss_chunk_tokens(2048, 50304, 32 * 1024, pool) == 2048  # an explicit setting stands


@pytest.mark.parametrize("tied", [True, False])
def test_tiled_loss_and_gradients_match_whole(tied):
    cfg = ModelConfig(vocab_size=96, n_layers=1, d_model=32, n_heads=2, max_seq_len=32, tie_embeddings=tied,
                      init_std=0.2)
    model = Transformer(cfg)
    params = init_params(model, jax.random.key(0), 8)
    rng = np.random.RandomState(0)
    batch = {"inputs": jnp.asarray(rng.randint(0, 96, (4, 32))), "targets": jnp.asarray(rng.randint(0, 96, (4, 32))),
             "weights": jnp.asarray(rng.rand(4, 32) > 0.2, jnp.float32)}

    @functools.partial(jax.jit, static_argnums=1)
    def loss_and_grads(params, chunk_tokens):
        def mean_loss(params):
            losses_BxT = token_losses(params, model, batch, chunk_tokens=chunk_tokens, batch_ways=2)
            return (losses_BxT * batch["weights"]).sum() / batch["weights"].sum(), losses_BxT
        return jax.value_and_grad(mean_loss, has_aux=True)(params)

    (whole, whole_BxT), whole_grads = loss_and_grads(params, 0)
    (tiled, tiled_BxT), tiled_grads = loss_and_grads(params, 16)  # 2 rows per device: 4 slices of 8 positions
    assert loss_chunks(2, 32, 16) == 4
    np.testing.assert_allclose(tiled_BxT, whole_BxT, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tiled, whole, rtol=1e-6)
    head = "token_embed" if tied else "head"
    assert np.abs(np.asarray(jax.tree.leaves(whole_grads[head])[0])).max() > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), tiled_grads, whole_grads)
    sums = [jax.jit(functools.partial(eval_step, model=model, batch_ways=2, loss_chunk_tokens=t))(params, batch)
            for t in (0, 16)]
    np.testing.assert_allclose(sums[1][0], sums[0][0], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_and_gradients_are_optaxs_to_the_bit(dtype):
    """token_losses picks the target's logit with a select (its gradient fuses on a GPU): optax's bits."""
    cfg = ModelConfig(vocab_size=96, n_layers=1, d_model=32, n_heads=2, max_seq_len=32, init_std=0.2, dtype=dtype)
    model = Transformer(cfg)
    params = init_params(model, jax.random.key(0), 8)
    rng = np.random.RandomState(0)
    batch = {"inputs": jnp.asarray(rng.randint(0, 96, (4, 32))), "targets": jnp.asarray(rng.randint(0, 96, (4, 32)))}
    weights_BxT = jnp.asarray(rng.rand(4, 32), jnp.float32)

    def ours(params):
        return (token_losses(params, model, batch) * weights_BxT).sum()

    def optaxs(params):
        logits_BxTxV = model.apply({"params": params}, batch["inputs"]).astype(jnp.float32)
        return (optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"]) * weights_BxT).sum()

    (loss, grads), (expected, expected_grads) = (jax.jit(jax.value_and_grad(f))(params) for f in (ours, optaxs))
    assert loss == expected and np.isfinite(float(loss))
    assert np.abs(np.asarray(expected_grads["token_embed"]["embedding"])).max() > 1e-3
    jax.tree.map(np.testing.assert_array_equal, grads, expected_grads)
