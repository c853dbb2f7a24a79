"""Everything a config compiles into: model, mesh, optimizer, state shardings and the jitted steps.

`build(cfg, tokenizer)` is the one assembly shared by training, evaluation, benchmarks and
ahead-of-time compiles, so they all run exactly the step train.py runs. The two parallel
modes differ only in how that step is mapped over the devices:

- `mesh` (default): `jax.jit` with explicit shardings over a data x fsdp x tensor mesh,
  the state donated.
  On CPU devices with only data parallelism the step runs per device under `jax.shard_map`
  instead, its gradients summed as one flat buffer (`lm.training.step.psum_flat`): XLA:CPU's
  collectives meet once per buffer, and the partitioner's all-reduce of every gradient
  took a fifth of a shakespeare_cpu step on 2 cores.
- `pmap`: `jax.pmap` over a one-axis mesh, the state replicated (stored as ordinary global
  arrays, so checkpoints move between the modes), the batch reshaped to [devices, B/n, T]
  and the step's `axis_name` set, so loss and gradients are those of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm.config import Config, ModelConfig
from lm.errors import LMError
from lm.model import attention, splash
from lm.model.layers import Kernels
from lm.model.transformer import Transformer
from lm.parallel import mesh as mesh_lib
from lm.parallel.cpu import chunk_tokens, train_passes
from lm.parallel.matmul import EIGEN_MATMULS, FAST_MIN_MAX, cpu_compiler_options, dense_dot_general
from lm.training.optim import eval_params, evaluated_apart, make_optimizer
from lm.training.step import TrainState, eval_step, init_state, loss_chunk_tokens, train_step


def resolve_model(cfg: ModelConfig, tokenizer) -> ModelConfig:
    """Fills model.vocab_size from the tokenizer (or checks an explicit one is big enough)."""
    if cfg.vocab_size == 0:
        return dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise LMError(f"model.vocab_size={cfg.vocab_size} is below the tokenizer's {tokenizer.vocab_size} ids; "
                      "raise it or set it to 0 to follow the tokenizer.")
    return cfg


# model.dtype=auto: bf16 activations (parameters stay model.param_dtype) where the matrix units
# run bf16, float32 elsewhere (the CPU).
AUTO_DTYPE = {"gpu": "bfloat16", "tpu": "bfloat16"}


def platform_model(cfg: ModelConfig, platform: str) -> ModelConfig:
    """`cfg` as the model runs on `platform`: model.dtype=auto resolved (config.yaml and checkpoints keep auto)."""
    if cfg.dtype != "auto":
        return cfg
    return dataclasses.replace(cfg, dtype=AUTO_DTYPE.get(platform, "float32"))


# On CPU, causal attention over 128 or more positions runs 64 queries at a time, skipping the
# masked scores (shakespeare_char, 256 positions: 10 of 16 score blocks computed).
CPU_QUERY_BLOCK = 64


def platform_kernels(cfg: ModelConfig, platform: str, packed: bool = False, seq_len: int = 0,
                     mesh: Mesh | None = None) -> Kernels:
    """The model's kernels on `platform`: model.attention resolved, and the CPU's Dense matmul.

    Splash attention (TPU) runs per chip under shard_map over `mesh` (batch over data x fsdp,
    heads over tensor); without a mesh (pmap) on each device's own arrays.
    """
    dtype = platform_model(cfg, platform).dtype
    name = attention.resolve(cfg.attention, dtype, cfg.head_dim, packed, platform, seq_len, cfg.attention_dropout)
    kind = name
    if name == splash.NAME:
        axes = mesh.shape if mesh is not None else {}
        kind = splash.Splash(cfg.splash_block_q, cfg.splash_block_kv, mesh,
                             tuple(a for a in mesh_lib.BATCH_AXES if a in axes), "tensor" if "tensor" in axes else None)
    return Kernels(attention=kind, dot_general=dense_dot_general(platform, cfg.remat),
                   query_block=CPU_QUERY_BLOCK if platform == "cpu" else 0)


def state_shardings(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh, rules, seq_len: int):
    """(abstract TrainState, TrainState of NamedShardings): optimizer moments follow their parameters.

    `rules` None replicates everything (pmap).
    """
    abstract_params, params_sharding = mesh_lib.param_shardings(model, mesh, rules, seq_len)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = mesh_lib.replicated(mesh)
    opt_sharding = optax.tree_map_params(  # a parameter group's masked-out leaves (optax.partition) stay so
        tx, lambda leaf, s: leaf if isinstance(leaf, optax.MaskedNode) else s, abstract_opt, params_sharding,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=abstract_params, opt_state=abstract_opt)
    return abstract, TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """A compiled experiment: `init(rng)`, then `train_step(state, batch)` and `eval_step(params, batch)`."""

    cfg: Config  # model.vocab_size resolved
    model: Transformer
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_sharding: TrainState
    batch_sharding: NamedSharding
    init: Callable
    train_step: Callable
    eval_step: Callable
    eval_params: Callable  # (params, opt_state) -> the parameters to evaluate (lm.training.optim.eval_params)
    train_passes: int  # micro-batches per update: train.grad_accum_steps, each chunked on CPU
    loss_chunk_tokens: int  # train.loss_chunk_tokens resolved (lm.training.step.token_losses)
    mapped: bool  # pmap: batches carry a leading device axis
    per_device: bool  # the step runs on each device's rows (pmap, or CPU data parallelism under shard_map)

    @property
    def model_cfg(self) -> ModelConfig:
        """cfg.model as the model runs it: model.dtype resolved for this platform (`platform_model`)."""
        return self.model.cfg

    @property
    def restore_target(self) -> TrainState:
        return mesh_lib.with_shardings(self.abstract_state, self.state_sharding)

    def describe(self) -> str:
        """One line on where the step runs: devices, mesh axes, parameter count and optimizer, compute
        dtype and attention implementation, and CPU passes."""
        device = self.mesh.devices.flat[0]
        axes = " ".join(f"{name}={size}" for name, size in self.mesh.shape.items())
        n_params = sum(leaf.size for leaf in jax.tree.leaves(self.abstract_state.params))
        line = (f"{self.mesh.size} x {device.device_kind} ({device.platform}) | {self.cfg.parallel.mode} {axes} | "
                f"{n_params / 1e6:.2f}M parameters ({self.cfg.optim.name}) | {self.model_cfg.dtype} compute, "
                f"{self.model.kernels.attention_name} attention")
        if self.model_cfg.attention_dropout:
            line += f" with dropout {self.model_cfg.attention_dropout:g}"
        if self.train_passes > 1:
            t = self.cfg.train
            rows = t.batch_size // self.train_passes // mesh_lib.batch_ways(self.mesh)
            line += f" | {self.train_passes} passes of {rows} x {t.seq_len} tokens per device"
        return line

    def cpu_options(self) -> dict | None:
        """What the CPU layout chose for this step (lm bench prints it); None off the CPU."""
        if self.mesh.devices.flat[0].platform != "cpu":
            return None
        return {"devices": self.mesh.size, "pass_tokens": self.cfg.parallel.cpu_chunk_tokens,
                "matmuls": "eigen" if EIGEN_MATMULS.keys() <= cpu_compiler_options().keys() else "xla default",
                "min_max": "fast" if FAST_MIN_MAX.keys() <= cpu_compiler_options().keys() else "nan-propagating",
                "attention_query_block": self.query_block,
                "gradient_sum": "one flat buffer" if self.per_device and self.mesh.size > 1 else "compiler's"}

    @property
    def query_block(self) -> int:
        """Queries XLA attention takes at a time in a train step (0: all; lm.model.attention.attend blocks
        causal sequences of at least two blocks)."""
        block = self.model.kernels.query_block
        return block if block and self.cfg.train.seq_len >= 2 * block else 0

    def host_rows(self, batch_size: int) -> np.ndarray:
        """The rows of a global batch of `batch_size` that this process loads."""
        return mesh_lib.host_rows(batch_size, self.batch_sharding)

    def place_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.mapped:
            n_local = len(self.mesh.local_devices)
            local_batch = {k: v.reshape((n_local, -1) + v.shape[1:]) for k, v in local_batch.items()}
        return mesh_lib.to_global(local_batch, self.batch_sharding)

    def place_step(self, step: int) -> jax.Array:
        return jax.device_put(jnp.asarray(step, jnp.int32), self.state_sharding.step)

    def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size or self.cfg.train.batch_size, self.cfg.train.seq_len)
        if self.mapped:
            shape = (self.mesh.size, shape[0] // self.mesh.size, shape[1])
        spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
        return {"inputs": spec, "targets": spec}


def gpu_memory(devices, given: int | None = None) -> int | None:
    """Bytes a GPU step may use (JAX's memory pool): `given`, or what the device reports; None off GPUs
    and for devices that cannot tell (compile-only ones)."""
    if devices[0].platform != "gpu":
        return None
    if given:
        return given
    try:
        stats = devices[0].memory_stats()
    except jax.errors.JaxRuntimeError:  # a compile-only device has no memory statistics
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def build(cfg: Config, tokenizer, devices=None, device_memory: int | None = None) -> Runtime:
    """Lays the config out on `devices` (default: all) and jits init, train and eval steps.

    `device_memory`: bytes one device may use, for the choices that depend on it (on a GPU, whether
    the loss is tiled); by default what the devices report (lm aot passes its chip's).
    """
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model, tokenizer))
    devices = list(devices if devices is not None else jax.devices())
    mapped = cfg.parallel.mode == "pmap"
    mesh = mesh_lib.make_mesh(cfg.parallel, devices)
    mesh_lib.check_layout(cfg, mesh)
    platform, ways = devices[0].platform, mesh_lib.batch_ways(mesh)
    passes = train_passes(cfg, platform, ways)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    per_device = mapped or (platform == "cpu" and 1 < mesh.size == mesh.shape["data"])  # the step sees its own rows
    kernels = platform_kernels(cfg.model, platform, packed=cfg.data.packed, seq_len=cfg.train.seq_len,
                               mesh=None if mapped else mesh)
    model = Transformer(platform_model(cfg.model, platform), activation_sharding=None if per_device else batch_sharding,
                        kernels=kernels)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    rules = None if mapped else mesh_lib.logical_rules(cfg.model, mesh)
    abstract_state, state_sharding = state_shardings(model, tx, mesh, rules, cfg.train.seq_len)

    init = jax.jit(lambda rng: init_state(model, tx, rng, cfg.train.seq_len), out_shardings=state_sharding)
    rows = max(cfg.train.batch_size // passes, cfg.eval.batch_size or cfg.train.batch_size) // ways  # per device, a pass
    loss_tokens = loss_chunk_tokens(cfg.train.loss_chunk_tokens, cfg.model.vocab_size, rows * cfg.train.seq_len,
                                    gpu_memory(devices, device_memory))
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, seed=cfg.seed,
                             grad_accum_steps=passes, skip_nonfinite=cfg.train.skip_nonfinite,
                             loss_chunk_tokens=loss_tokens, batch_ways=1 if per_device else ways,
                             clip_norm=cfg.optim.grad_clip, axis_name=mesh_lib.PMAP_AXIS if per_device else None)
    evaluate = functools.partial(eval_step, model=model, pass_tokens=chunk_tokens(cfg, platform),
                                 batch_ways=1 if mapped else ways, loss_chunk_tokens=loss_tokens)
    if mapped:
        train_fn, eval_fn = _pmapped(step, evaluate, devices, state_sharding)
    else:
        options = cpu_compiler_options() if platform == "cpu" else None
        if per_device:  # the state is replicated: data parallelism only
            step = jax.shard_map(step, mesh=mesh, in_specs=(P(), batch_sharding.spec), out_specs=(P(), P()),
                                 check_vma=False)  # the CPU matmul's custom VJP does not track varying axes
        train_fn = jax.jit(step, in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                           donate_argnums=0, compiler_options=options)
        eval_fn = jax.jit(evaluate, in_shardings=(state_sharding.params, batch_sharding), compiler_options=options)
    evaluated = functools.partial(eval_params, cfg.optim)
    if evaluated_apart(cfg.optim):
        evaluated = jax.jit(evaluated, out_shardings=state_sharding.params)
    return Runtime(cfg=cfg, model=model, mesh=mesh, tx=tx, schedule=schedule, abstract_state=abstract_state,
                   state_sharding=state_sharding, batch_sharding=batch_sharding, init=init, train_step=train_fn,
                   eval_step=eval_fn, eval_params=evaluated, train_passes=passes, loss_chunk_tokens=loss_tokens,
                   mapped=mapped, per_device=per_device)


def _pmapped(step: Callable, evaluate: Callable, devices, state_sharding: TrainState) -> tuple[Callable, Callable]:
    """The train and eval steps under jax.pmap: replicated state in, the global batch's sums out."""
    psum = functools.partial(jax.lax.psum, axis_name=mesh_lib.PMAP_AXIS)
    mapped_step = jax.pmap(step, axis_name=mesh_lib.PMAP_AXIS, in_axes=(None, 0),
                           out_axes=(None, None), devices=devices, donate_argnums=0)

    def train_fn(state: TrainState, batch) -> tuple[TrainState, Any]:
        state, metrics = mapped_step(state, batch)
        return (_as_global(state, state_sharding) if jax.process_count() > 1 else state), metrics

    eval_fn = jax.pmap(lambda params, batch: psum(evaluate(params, batch)), axis_name=mesh_lib.PMAP_AXIS,
                       in_axes=(None, 0), out_axes=None, devices=devices)
    return train_fn, eval_fn


def _as_global(tree, shardings):
    """pmap's replicated outputs are host-local on several hosts; view them as global arrays (no copy)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_single_device_arrays(
        x.shape, s, [shard.data for shard in x.addressable_shards]), tree, shardings)
