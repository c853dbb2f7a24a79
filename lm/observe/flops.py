"""Model FLOPs per token, peak FLOP/s per device, and model FLOPs utilisation (MFU).

FLOPs are *model* FLOPs (the useful work of one training token), counted the way PaLM
(Chowdhery et al. 2022, appendix B) does, with causal attention counted once:

    flops_per_token = 6 * N + 6 * L * T * (n_heads * head_dim)

N is the number of parameters that take part in a matrix multiply: every attention and
feed-forward kernel plus the output head (d_model * vocab, counted even when it is tied to
the embedding, because the head matmul runs either way). Token and position embeddings are
lookups and do not count; neither do norms, biases or element-wise ops. 6 = 2 (multiply-add)
x 3 (forward + two backward matmuls). The attention term is QK^T and AV: 2 matmuls x 2 x 3
= 12 * L * T * d per token for full attention; a causal token attends on average to T/2
keys, so 6 * L * T * d. A sliding-window layer (window W < T) attends on average to
W - W^2 / 2T keys, so it counts 12 * (W - W^2 / 2T) * d. Rematerialisation and masked-out work do not count (that would be
hardware FLOPs), so MFU is a lower bound on how busy the chips are.

MFU = achieved model FLOP/s / (peak FLOP/s per device * devices). The peak comes from
the vendors' dense (non-sparse) figures below; on CPU it is measured by a dense-matmul
probe, because CPUs differ too much to tabulate.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from lm.config import ModelConfig

TFLOPS = 1e12

# (substring of jax Device.device_kind, dtype) -> dense peak FLOP/s of one JAX device.
# float32 matmuls run on the matrix units at reduced precision by default (TPU: bf16 passes;
# GPU: TF32 on Ampere and later), so their peak is the bf16 (TPU) / TF32 (GPU) figure:
# the larger number, so MFU is never flattered.
# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e,system-architecture-tpu-vm};
# NVIDIA A100 datasheet (2020), H100 datasheet (2023, SXM column), H200 datasheet (2024),
# L4 datasheet (2023), V100 datasheet (2018). Longer substrings are matched first.
PEAK_FLOPS = {
    ("TPU v3", "bfloat16"): 123 / 2 * TFLOPS,  # 123 per chip, 2 TensorCores = 2 JAX devices
    ("TPU v4", "bfloat16"): 275 * TFLOPS,  # megacore: one JAX device per chip
    ("TPU v5 lite", "bfloat16"): 197 * TFLOPS,  # v5e
    ("TPU v5e", "bfloat16"): 197 * TFLOPS,
    ("TPU v5p", "bfloat16"): 459 * TFLOPS,
    ("TPU v5", "bfloat16"): 459 * TFLOPS,  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", "bfloat16"): 918 * TFLOPS,  # v6e (Trillium)
    ("TPU v6e", "bfloat16"): 918 * TFLOPS,
    ("A100", "bfloat16"): 312 * TFLOPS,
    ("A100", "float32"): 156 * TFLOPS,  # TF32
    ("H100 PCIe", "bfloat16"): 756 * TFLOPS,
    ("H100 PCIe", "float32"): 378 * TFLOPS,
    ("H100", "bfloat16"): 989 * TFLOPS,  # SXM
    ("H100", "float32"): 494 * TFLOPS,
    ("H200", "bfloat16"): 989 * TFLOPS,  # same compute as H100 SXM, more and faster memory
    ("H200", "float32"): 494 * TFLOPS,
    ("L4", "bfloat16"): 121 * TFLOPS,
    ("L4", "float32"): 60 * TFLOPS,
    ("V100", "bfloat16"): 125 * TFLOPS,  # no bf16 units; XLA runs bf16 as fp16 tensor-core math
    ("V100", "float32"): 15.7 * TFLOPS,
}
for (_kind, _dtype), _peak in list(PEAK_FLOPS.items()):
    if _kind.startswith("TPU") and _dtype == "bfloat16":
        PEAK_FLOPS[(_kind, "float32")] = _peak


def matmul_params(cfg: ModelConfig) -> int:
    """N of the module docstring: attention, feed-forward and head matmul weights."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attention = d * q + 2 * d * kv + q * d
    mlp = (2 if cfg.mlp == "gelu" else 3) * d * cfg.ff_dim  # gated (swiglu, geglu): gate, up, down
    return cfg.n_layers * (attention + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training model FLOPs per token (forward + backward) at sequence length `seq_len`."""
    keys_x2 = 0.0  # twice the keys a query attends to on average, summed over layers
    for layer in range(cfg.n_layers):
        w = min(cfg.layer_window(layer) or seq_len, seq_len)
        keys_x2 += 2 * w - w * w / seq_len  # = seq_len without a window (causal: T/2 keys)
    return 6 * matmul_params(cfg) + round(6 * keys_x2 * cfg.n_heads * cfg.head_dim)


def table_peak(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of `device_kind` from PEAK_FLOPS, or None if unknown."""
    for (kind, kind_dtype), peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0][0])):
        if kind in device_kind and kind_dtype == dtype:
            return peak
    return None


_BEST_PROBE: dict[str, float] = {}


def cpu_matmul_probe(dtype: str = "float32", refresh: bool = False) -> float:
    """Best FLOP/s of a jitted 1024 x 1024 matmul on this process's CPU seen so far.

    Measured once per process (best of repeated runs over half a second), and again with
    `refresh=True`, keeping the best: an upper estimate of what the whole process can do
    (shared by all its CPU devices), robust to other jobs slowing one measurement down.
    """
    if refresh or dtype not in _BEST_PROBE:
        _BEST_PROBE[dtype] = max(_BEST_PROBE.get(dtype, 0.0), _probe(dtype, 1024, 0.5))
    return _BEST_PROBE[dtype]


def _probe(dtype: str, size: int, seconds: float) -> float:
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), dtype), cpu)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(devices, dtype: str, refresh: bool = False) -> tuple[float | None, str]:
    """(total peak FLOP/s of `devices` for `dtype` matmuls, how it was obtained).

    CPU devices of one process share its cores, so their total is one probe per process,
    however many (fake) devices there are. An unknown accelerator gives None, not a guess.
    """
    device = devices[0]
    if device.platform == "cpu":
        processes = len({d.process_index for d in devices})
        return (cpu_matmul_probe(dtype, refresh) * processes,
                f"measured: best {dtype} 1024x1024 matmul on this process's CPU x {processes} process(es)")
    peak = table_peak(device.device_kind, dtype)
    if peak is None:
        return None, f"unknown device kind '{device.device_kind}' for {dtype}: add it to lm.metrics.PEAK_FLOPS"
    return peak * len(devices), f"table: {peak / TFLOPS:g} TFLOP/s x {len(devices)} '{device.device_kind}'"


def mfu(tokens_per_sec: float, flops_per_tok: float, total_peak: float | None) -> float | None:
    """Model FLOPs utilisation, or None when the peak is unknown."""
    if not total_peak:
        return None
    return tokens_per_sec * flops_per_tok / total_peak
