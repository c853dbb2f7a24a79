"""Device meshes, logical-axis rules, shardings of parameters and batches, and joining several hosts.

Mesh axes: `data` (batch only), `fsdp` (batch, plus parameters and optimizer state split
along d_model), `tensor` (attention heads, MLP hidden width and vocabulary split).
`parallel.mode=pmap` uses a one-axis mesh (`data`) whose state is replicated on every device.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lm.config import Config, ModelConfig, ParallelConfig
from lm.errors import LMError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
PMAP_AXIS = "data"


def is_multi_process(cfg: ParallelConfig) -> bool:
    """Whether this run joins several processes: set in parallel.*, or detected under SLURM / on a TPU pod."""
    detected = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return bool(cfg.coordinator_address or cfg.num_processes > 1 or detected)


def maybe_initialize_distributed(cfg: ParallelConfig) -> None:
    """Joins a multi-process run once: explicit parallel.* settings, or detected under SLURM / on TPU pods.

    parallel.num_processes > 1 alone is enough where JAX can detect the rest (Cloud TPU VMs, SLURM).
    """
    if jax.distributed.is_initialized() or not is_multi_process(cfg):
        return
    local_devices = None  # JAX's SLURM detection gives each process one GPU: that of SLURM_LOCALID
    if os.environ.get("SLURM_NTASKS_PER_NODE") == "1" and os.environ.get("SLURM_GPUS_ON_NODE"):
        local_devices = list(range(int(os.environ["SLURM_GPUS_ON_NODE"])))  # one process per node: all its GPUs
    try:
        jax.distributed.initialize(cfg.coordinator_address or None, cfg.num_processes or None,
                                   cfg.process_id if cfg.process_id >= 0 else None, local_devices)
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LMError(f"could not join the multi-process run ({reason}); check parallel.coordinator_address, "
                      "parallel.num_processes and parallel.process_id.") from None


def mesh_shape(cfg: ParallelConfig, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); a -1 takes the devices the others leave."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n_devices % known:
            raise LMError(f"the mesh axes given ({dict(zip(AXES, sizes))}) do not divide the {n_devices} devices; "
                          "choose parallel.* sizes whose product divides the device count.")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise LMError(f"the mesh data*fsdp*tensor = {math.prod(sizes)} does not match the {n_devices} devices; "
                      "set one of parallel.data, parallel.fsdp, parallel.tensor to -1 to fill the rest.")
    return tuple(sizes)


def make_mesh(cfg: ParallelConfig, devices) -> Mesh:
    """The data x fsdp x tensor mesh of parallel.mode=mesh, or pmap's one `data` axis."""
    if cfg.mode == "pmap":
        return Mesh(np.array(devices), (PMAP_AXIS,))
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_rules(cfg: ModelConfig, mesh: Mesh) -> tuple[tuple[str, object], ...]:
    """Logical parameter axes -> mesh axes. Vocabulary and KV heads fall back to replication."""
    tensor = mesh.shape["tensor"]
    return (
        ("batch", BATCH_AXES),
        ("vocab", "tensor" if cfg.vocab_size % tensor == 0 else None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor" if cfg.kv_heads % tensor == 0 else None),
        ("mlp", "tensor"),
        ("head_dim", None),
        ("position", None),
        ("norm", None),
        ("layers", None),
    )


def batch_ways(mesh: Mesh) -> int:
    """How many ways the batch is split: over the data and fsdp axes (pmap's mesh has only data)."""
    return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def check_layout(cfg: Config, mesh: Mesh) -> None:
    """Rejects a config the mesh cannot lay out, before anything is compiled."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    ways = batch_ways(mesh)
    micro = t.batch_size // t.grad_accum_steps
    tensor, fsdp = mesh.shape.get("tensor", 1), mesh.shape.get("fsdp", 1)
    checks = (
        (p.mode != "pmap" or (p.fsdp == 1 and p.tensor == 1 and p.data in (-1, mesh.size)),
         f"parallel.mode=pmap replicates the model over all {mesh.size} devices; leave parallel.data=-1, "
         "parallel.fsdp=1 and parallel.tensor=1, or use parallel.mode=mesh."),
        (micro % ways == 0, f"train.batch_size/train.grad_accum_steps = {micro} is not divisible by "
                            f"parallel.data*parallel.fsdp = {ways}; change the batch or the mesh."),
        (m.n_heads % tensor == 0, f"model.n_heads={m.n_heads} is not divisible by parallel.tensor={tensor}; "
                                  "change one of them."),
        (m.ff_dim % tensor == 0, f"model.d_ff={m.ff_dim} is not divisible by parallel.tensor={tensor}; "
                                 "change one of them."),
        (m.d_model % fsdp == 0, f"model.d_model={m.d_model} is not divisible by parallel.fsdp={fsdp}; "
                                "change one of them."),
        ((cfg.eval.batch_size or t.batch_size) % ways == 0,
         f"eval.batch_size={cfg.eval.batch_size or t.batch_size} is not divisible by "
         f"parallel.data*parallel.fsdp = {ways}; change eval.batch_size or the mesh."),
        (t.batch_size % jax.process_count() == 0, f"train.batch_size={t.batch_size} is not divisible by the "
                                                  f"{jax.process_count()} processes; change train.batch_size."),
    )
    for ok, message in checks:
        if not ok:
            raise LMError(message)


def param_shardings(model: nn.Module, mesh: Mesh, rules, seq_len: int):
    """(abstract unboxed params, their NamedShardings) read from the model's logical axes;
    replicated on every device when `rules` is None (pmap)."""
    abstract = jax.eval_shape(lambda rng: model.init({"params": rng}, jax.numpy.zeros((1, seq_len), "int32")),
                              jax.random.key(0))
    params = nn.meta.unbox(abstract)["params"]
    if rules is None:
        return params, jax.tree.map(lambda _: replicated(mesh), params)
    specs = nn.get_partition_spec(abstract)["params"]
    return params, nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying shardings: the restore target for Orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the batch axes the mesh has (data x fsdp, or pmap's data)."""
    return NamedSharding(mesh, P(tuple(axis for axis in BATCH_AXES if axis in mesh.shape)))


def host_rows(global_batch: int, batch_sharding: NamedSharding | None = None) -> np.ndarray:
    """Indices of the rows of each global batch this process loads: those its devices hold.

    Without a sharding, process i takes the i-th equal block. Processes whose devices are
    replicas along the batch (e.g. `tensor` spanning hosts) load the same rows.
    """
    if batch_sharding is None:
        per_host = global_batch // jax.process_count()
        return np.arange(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
    index_map = batch_sharding.addressable_devices_indices_map((global_batch,))
    return np.unique(np.concatenate([np.arange(global_batch)[index[0]] for index in index_map.values()]))


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each host's rows (in `host_rows` order) into global arrays laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
