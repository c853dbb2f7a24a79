"""Everything a config compiles into: tokenizer, model, mesh, optimizer and jitted steps.

`build(cfg)` is shared by training, evaluation, benchmarks and ahead-of-time compiles, so
they all run exactly the step train.py runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from lm import sharding
from lm.config import Config, ModelConfig
from lm.cpu_chunks import chunk_tokens, train_passes
from lm.errors import LMError
from lm.matmul import cpu_compiler_options
from lm.model import Transformer
from lm.optim import make_optimizer
from lm.step import TrainState, eval_step, init_state, train_step
from lm.tokenizer import ByteTokenizer


def resolve_model(cfg: ModelConfig, tokenizer: ByteTokenizer) -> ModelConfig:
    """Fills model.vocab_size from the tokenizer (or checks an explicit one is big enough)."""
    if cfg.vocab_size == 0:
        return dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise LMError(f"model.vocab_size={cfg.vocab_size} is below the tokenizer's {tokenizer.vocab_size} ids; "
                      "raise it or set it to 0 to follow the tokenizer.")
    return cfg


@dataclasses.dataclass
class Runtime:
    """A compiled experiment: call `init()`, then `train_step(state, batch)`."""

    cfg: Config
    model: Transformer
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_sharding: TrainState
    batch_sharding: NamedSharding
    init: Any
    train_step: Any
    eval_step: Any
    train_passes: int  # micro-batches per update: train.grad_accum_steps, each chunked on CPU

    @property
    def restore_target(self) -> TrainState:
        return sharding.with_shardings(self.abstract_state, self.state_sharding)

    def describe(self) -> str:
        """One line on where the step runs: devices, mesh axes and parameter count."""
        device = self.mesh.devices.flat[0]
        axes = " ".join(f"{name}={size}" for name, size in self.mesh.shape.items())
        n_params = sum(leaf.size for leaf in jax.tree.leaves(self.abstract_state.params))
        return (f"{self.mesh.size} x {device.device_kind} ({device.platform}) | {self.cfg.parallel.mode} {axes} | "
                f"{n_params / 1e6:.2f}M parameters{self.describe_passes()}")

    def describe_passes(self) -> str:
        """' | 8 passes of 4 x 256 tokens per device' when an update takes several passes, else ''."""
        if self.train_passes == 1:
            return ""
        t = self.cfg.train
        rows = t.batch_size // self.train_passes // sharding.batch_ways(self.mesh)
        return f" | {self.train_passes} passes of {rows} x {t.seq_len} tokens per device"

    def host_rows(self, batch_size: int) -> np.ndarray:
        """The rows of a global batch of `batch_size` that this process loads."""
        return sharding.host_rows(batch_size, self.batch_sharding)

    def place_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.to_global(local_batch, self.batch_sharding)

    def place_step(self, step: int) -> jax.Array:
        return jax.device_put(jnp.asarray(step, jnp.int32), self.state_sharding.step)

    def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size or self.cfg.train.batch_size, self.cfg.train.seq_len)
        spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
        return {"inputs": spec, "targets": spec}


def build(cfg: Config, tokenizer: ByteTokenizer, devices=None) -> Runtime:
    """Lays the config out on `devices` (default: all) and jits init, train and eval steps."""
    if cfg.parallel.mode == "pmap":
        from lm.pmap import build_pmap  # lm.pmap builds on this module
        return build_pmap(cfg, tokenizer, devices)
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model, tokenizer))
    mesh = sharding.make_mesh(cfg.parallel, devices)
    sharding.check_layout(cfg, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    platform, ways = mesh.devices.flat[0].platform, sharding.batch_ways(mesh)
    passes = train_passes(cfg, platform, ways)
    model = Transformer(cfg.model, activation_sharding=batch_sharding)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    rules = sharding.logical_rules(cfg.model, mesh)
    abstract_state, state_sharding = sharding.state_shardings(model, tx, mesh, rules, cfg.train.seq_len)

    init = jax.jit(lambda rng: init_state(model, tx, rng, cfg.train.seq_len), out_shardings=state_sharding)
    options = cpu_compiler_options() if platform == "cpu" else None
    step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, seed=cfg.seed,
                          grad_accum_steps=passes, skip_nonfinite=cfg.train.skip_nonfinite),
        in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None), donate_argnums=0,
        compiler_options=options)
    evaluate = jax.jit(functools.partial(eval_step, model=model, pass_tokens=chunk_tokens(cfg, platform),
                                         batch_ways=ways),
                       in_shardings=(state_sharding.params, batch_sharding), compiler_options=options)
    return Runtime(cfg, model, mesh, tx, schedule, abstract_state, state_sharding, batch_sharding,
                   init, step, evaluate, passes)
