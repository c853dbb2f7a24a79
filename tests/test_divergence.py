"""NaN/Inf: the run stops naming the step and checkpoints nothing diverged, or skips and counts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.training.checkpoint import Checkpoints
from lm.errors import LMError
from lm.training.runtime import build
from lm.training.optim import make_optimizer
from lm.training.step import train_step
from lm.data.tokenizers import ByteTokenizer
from lm.training.loop import train

# A learning rate this large turns the parameters to ~1e29 after one update, so the next
# forward pass overflows; grad_clip=0 keeps clipping from hiding the blow-up.
SMALL = ("model.n_layers=1", "model.d_model=32", "train.seq_len=16", "train.batch_size=4")
BLOW_UP = (*SMALL, "optim.lr=1e30", "optim.grad_clip=0", "train.steps=6", "checkpoint.every=1", "log.every=1", "eval.every=0")


def _step_inputs(tiny_config):
    """An initial state, a normal batch and one whose NaN weights make the loss NaN, plus train_step's kwargs."""
    cfg = tiny_config(*SMALL)
    rt = build(cfg, ByteTokenizer())
    tokens = jnp.arange(2 * cfg.train.seq_len, dtype=jnp.int32).reshape(2, -1) % 200 + 3
    good = {"inputs": tokens, "targets": tokens, "weights": jnp.ones(tokens.shape)}
    bad = {**good, "weights": jnp.full(tokens.shape, jnp.nan)}
    return rt.init(jax.random.key(0)), good, bad, dict(model=rt.model, tx=rt.tx, schedule=rt.schedule, seed=0)


def test_the_step_clips_gradients_as_optax_would(tiny_config):
    """clip_norm scales the summed gradients like optax.clip_by_global_norm (seen through plain SGD, which
    Adam's scale invariance would hide) and reports the norm before clipping."""
    state, good, _, kwargs = _step_inputs(tiny_config)
    def step(tx, **clip):
        return train_step(state.replace(opt_state=tx.init(state.params)), good, **{**kwargs, "tx": tx}, **clip)

    unclipped, metrics = step(optax.sgd(1.0))
    clip = float(metrics["grad_norm"]) / 10
    ours, ours_metrics = step(optax.sgd(1.0), clip_norm=clip)
    theirs, _ = step(optax.chain(optax.clip_by_global_norm(clip), optax.sgd(1.0)))
    assert float(ours_metrics["grad_norm"]) == pytest.approx(float(metrics["grad_norm"]), rel=1e-6)
    for a, b, c in zip(*(jax.tree.leaves(s.params) for s in (ours, theirs, unclipped))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = [np.abs(np.asarray(s.params["token_embed"]["embedding"] - state.params["token_embed"]["embedding"])).max()
             for s in (ours, unclipped)]
    assert moved[0] == pytest.approx(moved[1] / 10, rel=1e-3)


def test_optimizer_state_keeps_the_layout_of_optax_clipping(tiny_config):
    """optim.grad_clip > 0 keeps the chain's first, stateless link, so older checkpoints restore."""
    cfg = tiny_config(*SMALL, "optim.grad_clip=1.0")
    tx, _ = make_optimizer(cfg.optim, 10)
    adamw, _ = make_optimizer(dataclasses.replace(cfg.optim, grad_clip=0.0), 10)
    params = {"dense": {"kernel": jnp.ones((2, 3))}, "norm": {"scale": jnp.ones(3)}}
    ours, older = tx.init(params), optax.chain(optax.clip_by_global_norm(1.0), adamw).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(older)


def test_train_step_flags_and_drops_nonfinite_updates(tiny_config):
    """With skip_nonfinite a NaN step keeps params and optimizer state; the trainer test covers the default."""
    state, good, bad, kwargs = _step_inputs(tiny_config)
    step = jax.jit(lambda s, b: train_step(s, b, skip_nonfinite=True, **kwargs))

    after_good, metrics = step(state, good)
    assert int(metrics["nonfinite"]) == 0
    assert not np.array_equal(after_good.params["token_embed"]["embedding"], state.params["token_embed"]["embedding"])

    after_bad, metrics = step(state, bad)
    assert int(metrics["nonfinite"]) == 1 and int(after_bad.step) == int(state.step) + 1
    for a, b in zip(jax.tree.leaves((after_bad.params, after_bad.opt_state)),
                    jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["mesh", "pmap"])  # one runtime builder: both modes get skip_nonfinite
def test_divergence_stops_at_the_step_and_skip_counts_it(tiny_config, tmp_path, mode):
    skipping = tiny_config(*BLOW_UP, "train.skip_nonfinite=true", f"parallel.mode={mode}", run_dir=tmp_path / "skip")
    records = [r for r in train(skipping) if "loss" in r]
    counts = [r["skipped_steps"] for r in records]
    assert counts == sorted(counts) and counts[-1] > 0
    first_bad = next(r["step"] for r in records if r["skipped_steps"] > 0)
    assert not np.isfinite(next(r["loss"] for r in records if r["step"] == first_bad))
    ckpts = Checkpoints(tmp_path / "skip" / "checkpoints", read_only=True)
    params, meta = ckpts.restore_params(6, build(skipping, ByteTokenizer()).restore_target.params)
    assert meta["skipped_steps"] == counts[-1]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))

    stopping = tiny_config(*BLOW_UP, f"parallel.mode={mode}", run_dir=tmp_path / "stop")
    with pytest.raises(LMError, match=f"diverged at step {first_bad}:"):
        train(stopping)
    ckpts = Checkpoints(tmp_path / "stop" / "checkpoints", read_only=True)
    assert ckpts.latest() == first_bad - 1  # every step before it was checkpointed, that one was not
    logged = [json.loads(line)["step"] for line in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) < first_bad + 1
