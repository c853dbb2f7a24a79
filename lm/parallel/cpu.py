"""The CPU backend laid out for speed: one JAX device per core, and steps in cache-sized passes.

Devices: XLA:CPU runs a step's many small ops mostly one after another, so one device leaves
cores idle. Split into one device per core, the batch is data-parallel across cores like
across chips (shakespeare_cpu on 2 cores: about 1.4x the tokens/s of one device).
`parallel.cpu_devices` sets the count: 0 (auto) takes the cores this process may use,
lowered until it divides the batch. This must happen before JAX starts its CPU backend.

Passes: taken whole, a 64 x 256 shakespeare_char batch holds [tokens, 4*d_model] activations
and [rows, heads, T, T] attention scores far larger than a CPU's caches. The same step walked
in chunks, summing gradients like `train.grad_accum_steps`, gives the same update (to float
rounding; dropout draws other masks) faster. `parallel.cpu_chunk_tokens` bounds the tokens
one device holds per pass; GPU and TPU steps are never chunked.
(docs/scaling.md, "One device per CPU core" and "Cache-sized passes on CPU".)
"""

from __future__ import annotations

import math
import os

import jax

from lm.config import Config
from lm.errors import LMError
from lm.parallel.mesh import is_multi_process

XLA_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # "QUOTA PERIOD" or "max PERIOD" (cgroup v2)
_split_by_lm: list[int] = []  # the count auto set in this process, if it did


def usable_cores(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open(cpu_max).read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 quota here
        pass
    return cores


def auto_count(cfg: Config, cores: int) -> int | None:
    """Devices for parallel.cpu_devices=0, or None to leave JAX's default.

    Only a single-process run whose layout is left to fill (parallel.data=-1, fsdp=tensor=1)
    is split: any other layout names its own device count.
    """
    p, t = cfg.parallel, cfg.train
    if is_multi_process(p) or (p.data, p.fsdp, p.tensor) != (-1, 1, 1):
        return None
    rows = (t.batch_size // t.grad_accum_steps, cfg.eval.batch_size or t.batch_size)
    return max(n for n in range(1, cores + 1) if all(r % n == 0 for r in rows))


def split_cpu(cfg: Config, any_running: bool = False) -> None:
    """Sets JAX's CPU device count from parallel.cpu_devices, before JAX starts.

    Auto leaves alone a count chosen elsewhere (XLA_FLAGS' --xla_force_host_platform_device_count,
    JAX_NUM_CPU_DEVICES, jax.config) and the devices of a JAX already running in this process;
    those an earlier auto split made must divide this run's batches, unless `any_running`
    (an inference restore, which rounds its batch up to the devices there are).
    """
    count = cfg.parallel.cpu_devices
    if count == 0:
        if _chosen_elsewhere():
            return
        count = auto_count(cfg, usable_cores())
        if count is None:
            return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX already started in this process
        running = len(jax.devices("cpu"))
        if cfg.parallel.cpu_devices and running != count:
            raise LMError(f"parallel.cpu_devices={count} comes too late: JAX already runs here with {running} CPU "
                          "device(s); set it in a fresh process (or leave it at 0).") from None
        if _split_by_lm and not any_running and auto_count(cfg, running) != running:
            raise LMError(f"this process already split the CPU into {running} devices for an earlier run, and they do "
                          f"not divide this run's batches (parallel.cpu_devices=0 would pick {count}); run it in a "
                          "fresh process.") from None
        return
    if cfg.parallel.cpu_devices == 0:
        _split_by_lm[:] = [count]


def _chosen_elsewhere() -> bool:
    """Whether the CPU device count was set other than by lm's auto split (XLA_FLAGS, JAX_NUM_CPU_DEVICES,
    jax.config)."""
    return XLA_DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or \
        jax.config.jax_num_cpu_devices not in [-1, *_split_by_lm]


def split_per_core() -> int | None:
    """Splits the CPU into one device per usable core, the most parallel.cpu_devices=0 gives a run (what
    `lm info` shows); None where a count was chosen elsewhere or JAX already runs here."""
    if _chosen_elsewhere():
        return None
    try:
        jax.config.update("jax_num_cpu_devices", usable_cores())
    except RuntimeError:  # JAX already started in this process
        return None
    return usable_cores()


def pass_count(rows: int, seq_len: int, max_tokens: int) -> int:
    """Fewest equal whole-row passes over `rows` rows with at most `max_tokens` tokens each.

    A pass holds one row at least; `max_tokens=0` means one pass.
    """
    if max_tokens <= 0:
        return 1
    return next(n for n in range(1, rows + 1)
                if rows % n == 0 and (rows // n * seq_len <= max_tokens or n == rows))


def chunk_tokens(cfg: Config, platform: str) -> int:
    """The per-device token bound of one pass on `platform` (0: no chunking, off the CPU)."""
    return cfg.parallel.cpu_chunk_tokens if platform == "cpu" else 0


def train_passes(cfg: Config, platform: str, batch_ways: int) -> int:
    """Micro-batches per update: `train.grad_accum_steps`, each chunked on CPU.

    `batch_ways` is how many ways the batch is split over devices.
    """
    t = cfg.train
    rows = t.batch_size // t.grad_accum_steps // batch_ways
    return t.grad_accum_steps * pass_count(rows, t.seq_len, chunk_tokens(cfg, platform))
