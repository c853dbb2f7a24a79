"""The accelerators `lm aot` compiles for without owning any, and compiling the train step for them.

TPU slices come from libtpu (the `tpu` extra): `v5e:2x4` is a v5e-8. NVIDIA GPU hosts come from
jax's CUDA plugin (the `gpu-aot` extra): `h100:8` is one host of 8 H100s, `h100:2x8` two such
hosts. Each GPU is described to XLA by a target config shipped in lm/tools/gpus/ (sources, and
what is approximate, in each file's header).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import importlib.util
import os
import re

from lm.config import Config
from lm.errors import LMError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # memory per device
    peak_bf16_flops: float  # dense bf16 FLOP/s per device
    hbm_bandwidth: float  # bytes/s per device
    megacore: bool  # two TensorCores presented as one JAX device
    source: str
    platform: str = "tpu"
    usable: float = 1.0  # share of hbm_bytes one process may allocate (JAX's GPU memory pool)

    @property
    def capacity(self) -> int:
        """Bytes a train step may use on one device."""
        return int(self.hbm_bytes * self.usable)


# Google Cloud TPU documentation, "key specifications" tables (HBM quoted there as 32/16/95/32 GB).
CHIPS = {
    "v4": Chip(32 * GIB, 275e12, 1200e9, True, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(16 * GIB, 197e12, 819e9, False, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(95 * GIB, 459e12, 2765e9, True, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(32 * GIB, 918e12, 1640e9, False, "https://cloud.google.com/tpu/docs/v6e"),
}
# Dense bf16 peaks from NVIDIA's datasheets (A100 2020, H100 2023 SXM column, H200 2024); memory and
# bandwidth are read from each GPU's target config (lm/tools/gpus/NAME.txtpb).
GPUS = {
    "a100": (312e12, "NVIDIA A100 datasheet; lm/tools/gpus/a100.txtpb"),
    "a100-40g": (312e12, "NVIDIA A100 datasheet; lm/tools/gpus/a100-40g.txtpb"),
    "h100": (989e12, "NVIDIA H100 datasheet (SXM); lm/tools/gpus/h100.txtpb"),
    "h200": (989e12, "NVIDIA H200 datasheet; lm/tools/gpus/h200.txtpb"),
}
# JAX's GPU client takes this share of a GPU's memory for its pool unless told otherwise.
GPU_POOL_SHARE = 0.75
GPU_POOL_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
TPU_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
GPU_TOPOLOGY = re.compile(r"^(a100-40g|a100|h100|h200):(?:(\d+)x)?(\d+)$")
EXTRA = {"tpu": "pip install -e '.[tpu]'", "gpu": "pip install -e '.[gpu-aot]'"}


def gpu_target_config(name: str) -> str:
    """The GpuTargetConfig text proto describing GPU `name` (a key of GPUS)."""
    return importlib.resources.files("lm.tools").joinpath("gpus", f"{name}.txtpb").read_text()


def gpu_chip(name: str) -> Chip:
    """GPU `name`'s figures: memory and bandwidth from its target config, peak from GPUS."""
    config = gpu_target_config(name)
    memory, bandwidth = (int(re.search(rf"\b{field}: (\d+)", config).group(1))
                         for field in ("device_memory_size", "memory_bandwidth"))
    share = next((float(os.environ[v]) for v in GPU_POOL_VARIABLES if os.environ.get(v)), GPU_POOL_SHARE)
    peak, source = GPUS[name]
    return Chip(memory, peak, float(bandwidth), False, source, platform="gpu", usable=share)


def _tpu_devices(generation: str, shape: str) -> list:
    if importlib.util.find_spec("libtpu") is None:
        raise LMError(f"compiling for TPU needs libtpu, which is not installed; run `{EXTRA['tpu']}` "
                      "(jax[tpu]: the libtpu your jax names).")
    # No TPU is touched: quiet libtpu's lookups of this host and let it load beside other jax processes.
    n = CHIPS[generation].megacore + 1
    for axis in shape.split("x"):
        n *= int(axis)
    cloud_name = f"v5litepod-{n}" if generation == "v5e" else f"{generation}-{n}"
    for name, value in (("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                        ("TPU_ACCELERATOR_TYPE", cloud_name)):
        os.environ.setdefault(name, value)
    import jax
    from jax.experimental import topologies

    topology = f"{generation}:{shape}"
    kwargs = {"chip_config_name": "megacore"} if CHIPS[generation].megacore else {}
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
    except jax.errors.JaxRuntimeError as e:
        reason = str(e).splitlines()[0]
        raise LMError(f"libtpu rejected --topology '{topology}' ({reason}); use a shape Cloud TPU offers, "
                      "e.g. v5e:2x2, v5e:2x4, v4:2x2x1.") from None


def quiet() -> None:
    """No device is touched: skip the CUDA plugin's check of a CUDA installation, and leave out
    XLA's warnings (e.g. that it cannot rematerialise a step below a GPU's memory; the report
    says whether it fits). Best called before JAX starts, which reads its log level once."""
    for variable, value in (("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1"), ("TF_CPP_MIN_LOG_LEVEL", "2")):
        os.environ.setdefault(variable, value)


def _gpu_devices(name: str, hosts: int, per_host: int) -> list:
    if importlib.util.find_spec("jax_plugins.xla_cuda13") is None or importlib.util.find_spec("nvidia.cudnn") is None:
        raise LMError(f"compiling for a GPU needs jax's CUDA plugin and cuDNN, which are not installed; run "
                      f"`{EXTRA['gpu']}` (jax-cuda13-plugin of your jax's version, nvidia-cudnn-cu13).")
    quiet()
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(name),
                                             topology=f"1x{hosts}x{per_host}").devices)


def topology_devices(topology: str) -> tuple[Chip, list]:
    """(chip specs, abstract devices, one per TPU chip or GPU) for 'v5e:2x4', 'v4:2x2x1', 'h100:8', 'h200:2x8'..."""
    if match := TPU_TOPOLOGY.match(topology):
        return CHIPS[match.group(1)], _tpu_devices(match.group(1), match.group(2))
    match = GPU_TOPOLOGY.match(topology)
    hosts, per_host = (int(match.group(2) or 1), int(match.group(3))) if match else (0, 0)
    if hosts and per_host:
        return gpu_chip(match.group(1)), _gpu_devices(match.group(1), hosts, per_host)
    raise LMError(f"--topology '{topology}' is neither TPU:SHAPE with TPU one of {', '.join(CHIPS)} (e.g. v5e:2x4, "
                  f"v4:2x2x1) nor GPU:N or GPU:HOSTSxN with GPU one of {', '.join(GPUS)} (e.g. h100:8, h200:2x8).")


def compile_step(cfg: Config, devices, device_memory: int | None = None):
    """(runtime, executable) of the train step train.py would run for `cfg` on `devices`
    (`device_memory`: bytes one device may use, for the runtime's choices that depend on it)."""
    from lm.data.tokenizers import ByteTokenizer
    from lm.training.runtime import build

    rt = build(cfg, ByteTokenizer(), devices=devices, device_memory=device_memory)
    return rt, deviceless_compile(rt.train_step.lower(rt.restore_target, rt.abstract_batch()))


def deviceless_compile(lowered):
    """Compiles a program lowered for topology devices, bypassing JAX's persistent compilation
    cache (on for every lm command): a cached topology executable cannot be loaded back, and
    each read would warn."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    with contextlib.ExitStack() as restore:
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()  # JAX decides once whether the cache is used: ask again
        restore.callback(compilation_cache.reset_cache)
        restore.callback(jax.config.update, "jax_enable_compilation_cache", enabled)
        return lowered.compile()


def refused(e: Exception) -> bool:
    """Whether the compiler refused a program for not fitting in a device's memory."""
    import jax

    return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def bytes_in(message: str) -> int:
    """The first size such as '54.62G' in a compiler message, in bytes (0 when there is none)."""
    match = re.search(r"(\d+(?:\.\d+)?)([KMGT])\b", message)
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2))) if match else 0
