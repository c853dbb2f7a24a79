"""What one train step costs on a device: FLOPs, bytes moved, and the seconds they imply.

XLA's cost analysis of the compiled step where the compiler gives one (TPU), with the splash
attention kernels it cannot see into counted analytically; where it gives none (the GPU
compiler), the model's FLOPs and the bytes the step must move, counted (`model_cost`).
"""

from __future__ import annotations

import math
import re

import numpy as np

from lm.config import Config, replace
from lm.observe.flops import flops_per_token, matmul_params
from lm.observe.memory import activation_floor
from lm.parallel.mesh import batch_ways
from lm.tools import accelerators

# The splash kernels (lm.model.splash) are custom calls XLA's cost analysis cannot see into.
# Matmuls each runs per tile of query-key pairs: forward QK^T and PV; dq recomputes QK^T,
# then dO V^T and dS K; dkv recomputes QK^T, then dO V^T, P^T dO and dS^T Q.
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_CALL = re.compile(r"%splash_mha_(fwd|dq|dkv)\S* = (.*?) custom-call\("
                          r".*?operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|f64)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "f64": 8}


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _SHAPE.findall(text)]


def kernel_cost(hlo_text: str, block_q: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one chip's splash attention kernel calls in a compiled program, analytically.

    FLOPs: the kernel's matmuls over the causal tiles it computes (`lm.model.splash.causal_pairs`;
    a sliding window computes fewer); bytes: every operand read and result written once.
    """
    from lm.model.splash import causal_pairs

    flops = bytes_ = 0.0
    for phase, results, operands in _SPLASH_CALL.findall(hlo_text):
        shapes = _shapes(results) + _shapes(operands)
        bytes_ += sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes)
        B, N, T, H = next(dims for _, dims in _shapes(operands) if len(dims) == 4)  # the queries
        flops += SPLASH_MATMULS[phase] * 2 * B * N * H * causal_pairs(T, block_q)
    return flops, bytes_


def _cost(compiled, block_q: int = 0) -> np.ndarray | None:
    """One chip's [FLOPs, seconds, bytes accessed] as XLA's cost analysis reports them, then
    [FLOPs, bytes] of the kernels it cannot see (`kernel_cost`); None where the compiler has none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per computation
    if not cost:
        return None
    kernel = kernel_cost(compiled.as_text(), block_q) if block_q else (0.0, 0.0)
    return np.array([cost["flops"], cost.get("optimal_seconds", 0.0), cost.get("bytes accessed", 0.0), *kernel])


def _optimizer_cost(rt) -> np.ndarray:
    """Cost of the optimizer update alone (optim.name's, and its apply; the step clips with one scale), on the
    state's shardings."""
    import jax
    import optax

    def update(params, opt_state):
        updates, opt_state = rt.tx.update(params, opt_state, params)  # params stand in for gradients
        return optax.apply_updates(params, updates), opt_state

    s, target = rt.state_sharding, rt.restore_target
    jitted = jax.jit(update, in_shardings=(s.params, s.opt_state), out_shardings=(s.params, s.opt_state))
    return _cost(accelerators.deviceless_compile(jitted.lower(target.params, target.opt_state)))


def step_cost(cfg: Config, devices, rt, compiled) -> tuple[np.ndarray, str, bool]:
    """Per-chip [FLOPs, seconds, bytes, kernel FLOPs, kernel bytes] of one whole train step, how
    it was obtained, and whether the compiler's seconds are usable (XLA's `optimal_seconds`
    turns negative when it cannot cost an operation, e.g. some collectives or a kernel).

    XLA's cost analysis counts a loop body once, whatever its trip count, so a step with
    scanned layers, gradient accumulation or a tiled loss is costed from loop-free compiles
    of one micro-batch with 1 and 2 layers (the layer's cost is their difference) and the
    loss untiled, repeated per micro-batch, with the optimizer update counted once.
    """
    m, t = cfg.model, cfg.train
    block_q = m.splash_block_q if rt.model.kernels.attention_name == "splash" else 0
    if compiled.cost_analysis() is None:  # the GPU compiler's
        return model_cost(rt), "model FLOPs and counted bytes (the compiler gives no cost analysis)", False
    if not m.scan_layers and t.grad_accum_steps == 1 and loss_tiling(rt)["loss_chunks"] == 1:
        cost = _cost(compiled, block_q)
        return cost, "the compiled step", cost[1] > 0
    micro = {"train.batch_size": t.batch_size // t.grad_accum_steps, "train.grad_accum_steps": 1,
             "model.scan_layers": False}

    def micro_cost(n_layers: int, loss_chunk_tokens: int):
        trial = replace(cfg, **micro, **{"model.n_layers": n_layers, "train.loss_chunk_tokens": loss_chunk_tokens})
        trial_rt, trial_compiled = accelerators.compile_step(trial, devices)
        return loss_tiling(trial_rt)["loss_chunk_tokens"], _cost(trial_compiled, block_q)

    source = "loop-free compiles of one micro-batch with 1 and 2 layers, extrapolated"
    try:
        (_, one), (_, two) = micro_cost(1, 0), micro_cost(2, 0)
    except Exception as e:
        if not accelerators.refused(e):
            raise
        # Whole logits do not fit: keep the tiling, whose loop body (one slice) is counted once,
        # and scale that slice's cost to all of them from a compile with half as many tokens a slice.
        (slice_tokens, one), (_, two) = micro_cost(1, rt.loss_chunk_tokens), micro_cost(2, rt.loss_chunk_tokens)
        half_tokens, half = micro_cost(1, max(1, rt.loss_chunk_tokens // 2))
        if half_tokens < slice_tokens:
            per_token = (one - half) / (slice_tokens - half_tokens)
            rest = per_token * (t.batch_size // t.grad_accum_steps * t.seq_len // batch_ways(rt.mesh) - slice_tokens)
            one, two = one + rest, two + rest
            source += " (loss tiled: one slice's cost scaled to all)"
        else:  # slices of one position cannot shrink
            source += " (loss tiled: only one slice of the output layer counted, an underestimate)"
    micro_step = one + (m.n_layers - 1) * (two - one)
    optimizer = _optimizer_cost(rt)
    return (t.grad_accum_steps * (micro_step - optimizer) + optimizer, source,
            min(one[1], two[1], optimizer[1]) > 0)


# Forward matmuls a remat policy runs again in the backward pass, by part of a block (what it does not keep).
RECOMPUTED = {"save_qkv_attn": ("out", "mlp"), "save_qkv": ("attention", "out", "mlp"),
              "block": ("qkv", "attention", "out", "mlp"), "nothing_saveable": ("qkv", "attention", "out", "mlp")}


def recomputed_flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token that cfg.remat recomputes (the matmuls and attention of what it does not keep)."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attention = (flops_per_token(cfg, seq_len) - 6 * matmul_params(cfg)) / 3  # all layers, forward
    per_layer = {"qkv": 2 * d * (q + 2 * kv), "out": 2 * q * d,
                 "mlp": 2 * (3 if cfg.mlp in ("swiglu", "geglu") else 2) * d * cfg.ff_dim}
    parts = RECOMPUTED.get(cfg.remat, ())
    return cfg.n_layers * sum(per_layer.get(p, 0) for p in parts) + (attention if "attention" in parts else 0)


def _device_bytes(tree, shardings) -> int:
    import jax

    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def state_bytes(rt) -> int:
    """Parameters and optimizer state on one device, by their shardings."""
    return _device_bytes(rt.abstract_state, rt.state_sharding)


def model_cost(rt) -> np.ndarray:
    """One device's [FLOPs, 0, bytes, 0, 0] of a step, counted where the compiler gives no cost analysis.

    FLOPs: the model's (lm.observe.flops) plus what remat and a tiled loss recompute, split evenly
    over the devices.
    Bytes, a lower bound on memory traffic: per micro-batch the parameters read twice (forward,
    backward), the gradients written once and the activation floor (lm.observe.memory) written
    and read once; per step the optimizer reading parameters, gradients and its state and
    writing parameters and state.
    """
    cfg, t = rt.cfg, rt.cfg.train
    tokens, n = t.batch_size * t.seq_len, rt.mesh.size
    head = 2 * cfg.model.d_model * cfg.model.vocab_size if loss_tiling(rt)["loss_chunks"] > 1 else 0  # tiles recompute it
    flops = (flops_per_token(cfg.model, t.seq_len) + recomputed_flops_per_token(cfg.model, t.seq_len) + head) \
        * tokens / n
    params = _device_bytes(rt.abstract_state.params, rt.state_sharding.params)
    opt = _device_bytes(rt.abstract_state.opt_state, rt.state_sharding.opt_state)
    bytes_ = rt.train_passes * (3 * params + 2 * sum(floor_bytes(rt).values())) + 3 * params + 2 * opt
    return np.array([flops, 0.0, bytes_, 0.0, 0.0])


def loss_tiling(rt) -> dict:
    """How the train step's cross-entropy is tiled: sequence chunks per micro-batch, tokens per device in one."""
    from lm.training.step import loss_chunks

    t = rt.cfg.train
    rows = t.batch_size // rt.train_passes // batch_ways(rt.mesh)
    chunks = loss_chunks(rows, t.seq_len, rt.loss_chunk_tokens)
    return {"loss_chunks": chunks, "loss_chunk_tokens": rows * t.seq_len // chunks}


def floor_bytes(rt) -> dict[str, int]:
    """The step's activation floor on one device (lm.observe.memory), by part."""
    t = rt.cfg.train
    tokens = t.batch_size // rt.train_passes // batch_ways(rt.mesh) * t.seq_len
    return activation_floor(rt.model_cfg, tokens, loss_tiling(rt)["loss_chunk_tokens"], tensor=rt.mesh.shape["tensor"])


