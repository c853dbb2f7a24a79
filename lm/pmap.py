"""`parallel.mode=pmap`: classic data parallelism, the same pure train step under `jax.pmap`.

State is replicated: each leaf is one global array with a copy on every device (sharding
`P()` over a one-axis mesh), so checkpoints hold plain unreplicated arrays and restore in
mesh mode and back. The batch is reshaped to [n_devices, B/n, T]; the step's `reduce`
hook is a psum over the devices, so the loss and gradients are those of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import sharding
from lm.config import Config
from lm.cpu_chunks import chunk_tokens, train_passes
from lm.errors import LMError
from lm.model import Transformer
from lm.optim import make_optimizer
from lm.runtime import Runtime, resolve_model
from lm.step import eval_step, init_state, train_step

AXIS = "data"


class PmapRuntime(Runtime):
    """A Runtime whose steps are pmapped; batches are placed as [n_devices, B/n, T]."""

    def place_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        n_local = len(self.mesh.local_devices)
        return sharding.to_global({k: v.reshape((n_local, -1) + v.shape[1:]) for k, v in local_batch.items()},
                                  self.batch_sharding)

    def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        n = self.mesh.size
        shape = (n, (batch_size or self.cfg.train.batch_size) // n, self.cfg.train.seq_len)
        spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
        return {"inputs": spec, "targets": spec}


def check_pmap_layout(cfg: Config, n_devices: int) -> None:
    p, t = cfg.parallel, cfg.train
    eval_batch = cfg.eval.batch_size or t.batch_size
    checks = (
        (p.fsdp == 1 and p.tensor == 1 and p.data in (-1, n_devices),
         f"parallel.mode=pmap replicates the model over all {n_devices} devices; leave parallel.data=-1, "
         "parallel.fsdp=1 and parallel.tensor=1, or use parallel.mode=mesh."),
        ((t.batch_size // t.grad_accum_steps) % n_devices == 0,
         f"train.batch_size/train.grad_accum_steps = {t.batch_size // t.grad_accum_steps} is not divisible by "
         f"the {n_devices} devices pmap splits it over; change the batch or train.grad_accum_steps."),
        (eval_batch % n_devices == 0, f"eval batch size {eval_batch} is not divisible by the {n_devices} devices "
                                      "pmap splits it over; change eval.batch_size."),
    )
    for ok, message in checks:
        if not ok:
            raise LMError(message)


def _as_global(tree, shardings):
    """pmap's replicated outputs are host-local on several hosts; view them as global arrays (no copy)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_single_device_arrays(
        x.shape, s, [shard.data for shard in x.addressable_shards]), tree, shardings)


def build_pmap(cfg: Config, tokenizer, devices=None) -> PmapRuntime:
    """Like `runtime.build`, but jax.pmap over `devices` (default: all) with replicated state."""
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model, tokenizer))
    devices = list(devices if devices is not None else jax.devices())
    check_pmap_layout(cfg, len(devices))
    mesh = Mesh(np.array(devices), (AXIS,))
    passes = train_passes(cfg, devices[0].platform, len(devices))
    pass_tokens = chunk_tokens(cfg, devices[0].platform)
    model = Transformer(cfg.model)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    replicated = NamedSharding(mesh, P())
    abstract_state = jax.eval_shape(lambda rng: init_state(model, tx, rng, cfg.train.seq_len), jax.random.key(0))
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)

    psum = functools.partial(jax.lax.psum, axis_name=AXIS)
    init = jax.jit(lambda rng: init_state(model, tx, rng, cfg.train.seq_len), out_shardings=state_sharding)
    pmapped_step = jax.pmap(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, seed=cfg.seed,
                          grad_accum_steps=passes, reduce=psum),
        axis_name=AXIS, in_axes=(None, 0), out_axes=(None, None), devices=devices, donate_argnums=0)

    def step(state, batch):
        state, metrics = pmapped_step(state, batch)
        return (_as_global(state, state_sharding) if jax.process_count() > 1 else state), metrics

    evaluate = jax.pmap(lambda params, batch: psum(eval_step(params, batch, model=model, pass_tokens=pass_tokens)),
                        axis_name=AXIS, in_axes=(None, 0), out_axes=None, devices=devices)
    return PmapRuntime(cfg, model, mesh, tx, schedule, abstract_state, state_sharding,
                       NamedSharding(mesh, P(AXIS)), init, step, evaluate, passes)
