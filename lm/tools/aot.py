"""Compile the real train step for a TPU topology on a CPU-only machine, and read its cost.

    python -m lm.aot --config configs/llama_1b.yaml --topology v5e:2x4 [key=value ...] [--json]   (or lm aot)

`libtpu` (the `tpu` extra) describes TPU chips without owning any: the step train.py would
run (same `lm.training.runtime.build`: mesh, logical rules, shardings, dtypes, remat, batch) is
lowered and compiled for those devices, and XLA's own memory and cost analyses say what
one chip needs and how long the compiler expects a step to take. Every figure it prints
is a compiler estimate, not a measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re

import numpy as np

from lm.config import Config, replace
from lm.errors import LMError
from lm.observe.flops import flops_per_token
from lm.parallel.mesh import batch_ways

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # HBM per chip
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    megacore: bool  # two TensorCores presented as one JAX device
    source: str


# Google Cloud TPU documentation, "key specifications" tables (HBM quoted there as 32/16/95/32 GB).
CHIPS = {
    "v4": Chip(32 * GIB, 275e12, 1200e9, True, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(16 * GIB, 197e12, 819e9, False, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(95 * GIB, 459e12, 2765e9, True, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(32 * GIB, 918e12, 1640e9, False, "https://cloud.google.com/tpu/docs/v6e"),
}
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


def _require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise LMError("compiling for TPU needs libtpu, which is not installed; run `pip install -e '.[tpu]'` "
                      "(jax[tpu]: the libtpu your jax names).")
    # No TPU is touched: quiet libtpu's host lookup and let it load beside other jax processes.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str) -> tuple[Chip, list]:
    """(chip specs, abstract TPU devices, one per chip) for a name such as 'v5e:2x4' or 'v4:2x2x1'."""
    match = TOPOLOGY.match(topology)
    if not match:
        raise LMError(f"--topology '{topology}' is not GENERATION:SHAPE with GENERATION one of "
                      f"{', '.join(CHIPS)} (e.g. v5e:2x4, v6e:2x4, v4:2x2x1, v5p:2x2x1).")
    _require_libtpu()
    import jax
    from jax.experimental import topologies

    chip = CHIPS[match.group(1)]
    kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except jax.errors.JaxRuntimeError as e:
        reason = str(e).splitlines()[0]
        raise LMError(f"libtpu rejected --topology '{topology}' ({reason}); use a shape Cloud TPU offers, "
                      "e.g. v5e:2x2, v5e:2x4, v4:2x2x1.") from None
    return chip, list(desc.devices)


def suggestions(cfg: Config, n_chips: int) -> list[str]:
    """What to change when a step does not fit in one chip's HBM."""
    out = []
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    if micro > n_chips:
        out.append(f"shrink the per-step micro-batch ({micro} sequences): lower train.batch_size or raise "
                   "train.grad_accum_steps (same global batch, less activation memory)")
    if cfg.model.remat in ("none", "everything_saveable", "dots_saveable"):
        out.append("recompute activations in the backward pass: model.remat=block (or nothing_saveable)")
    if cfg.parallel.fsdp == 1 and n_chips > 1:
        out.append("shard parameters and optimizer state over the chips: parallel.fsdp=-1 parallel.data=1")
    out.append("or use a topology with more chips, or chips with more HBM (v5p: 95 GiB); "
               "`lm aot --fit` searches micro-batch, remat and mesh for you")
    return out


def bytes_in(message: str) -> int:
    """The first size such as '54.62G' in a compiler message, in bytes (0 when there is none)."""
    match = re.search(r"(\d+(?:\.\d+)?)([KMGT])\b", message)
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2))) if match else 0


def compile_step(cfg: Config, devices):
    """(runtime, TPU executable) of the train step train.py would run for `cfg` on `devices`."""
    from lm.data.tokenizers import ByteTokenizer
    from lm.training.runtime import build

    rt = build(cfg, ByteTokenizer(), devices=devices)
    return rt, tpu_compile(rt.train_step.lower(rt.restore_target, rt.abstract_batch()))


def tpu_compile(lowered):
    """Compiles a program lowered for topology devices, bypassing JAX's persistent compilation
    cache (on for every lm command): a cached TPU-topology executable cannot be loaded back, and
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
    """Whether the TPU compiler refused a program for not fitting in HBM."""
    import jax

    return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


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


def _cost(compiled, block_q: int = 0) -> np.ndarray:
    """One chip's [FLOPs, seconds, bytes accessed] as XLA's cost analysis reports them, then
    [FLOPs, bytes] of the kernels it cannot see (`kernel_cost`)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per computation
    kernel = kernel_cost(compiled.as_text(), block_q) if block_q else (0.0, 0.0)
    return np.array([cost["flops"], cost.get("optimal_seconds", 0.0), cost.get("bytes accessed", 0.0), *kernel])


def _optimizer_cost(rt) -> np.ndarray:
    """Cost of the optimizer update alone (AdamW, apply; the step clips with one scale), on the state's shardings."""
    import jax
    import optax

    def update(params, opt_state):
        updates, opt_state = rt.tx.update(params, opt_state, params)  # params stand in for gradients
        return optax.apply_updates(params, updates), opt_state

    s, target = rt.state_sharding, rt.restore_target
    jitted = jax.jit(update, in_shardings=(s.params, s.opt_state), out_shardings=(s.params, s.opt_state))
    return _cost(tpu_compile(jitted.lower(target.params, target.opt_state)))


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
    if not m.scan_layers and t.grad_accum_steps == 1 and loss_tiling(rt)["loss_chunks"] == 1:
        cost = _cost(compiled, block_q)
        return cost, "the compiled step", cost[1] > 0
    micro = {"train.batch_size": t.batch_size // t.grad_accum_steps, "train.grad_accum_steps": 1,
             "model.scan_layers": False}

    def micro_cost(n_layers: int, loss_chunk_tokens: int):
        trial = replace(cfg, **micro, **{"model.n_layers": n_layers, "train.loss_chunk_tokens": loss_chunk_tokens})
        trial_rt, trial_compiled = compile_step(trial, devices)
        return loss_tiling(trial_rt)["loss_chunk_tokens"], _cost(trial_compiled, block_q)

    source = "loop-free compiles of one micro-batch with 1 and 2 layers, extrapolated"
    try:
        (_, one), (_, two) = micro_cost(1, 0), micro_cost(2, 0)
    except Exception as e:
        if not refused(e):
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


def loss_tiling(rt) -> dict:
    """How the train step's cross-entropy is tiled: sequence chunks per micro-batch, tokens per device in one."""
    from lm.training.step import loss_chunks

    t = rt.cfg.train
    rows = t.batch_size // rt.train_passes // batch_ways(rt.mesh)
    chunks = loss_chunks(rows, t.seq_len, rt.loss_chunk_tokens)
    return {"loss_chunks": chunks, "loss_chunk_tokens": rows * t.seq_len // chunks}


def analyse(cfg: Config, topology: str) -> dict:
    """Compiles cfg's train step for `topology` and returns per-chip memory, cost and MFU estimates."""
    chip, devices = topology_devices(topology)
    try:
        rt, compiled = compile_step(cfg, devices)
    except Exception as e:
        if not refused(e):
            raise
        return refusal_report(cfg, topology, chip, devices, e)
    return compiled_report(cfg, topology, chip, devices, rt, compiled)


def refusal_report(cfg: Config, topology: str, chip: Chip, devices, error: Exception) -> dict:
    """The report of a step the TPU compiler refused for not fitting; its message names the shortfall."""
    return {**_describe(cfg, topology, chip, devices), "fits": False, "hbm_needed_bytes": bytes_in(str(error)),
            "compiler_message": str(error).splitlines()[0], "suggestions": suggestions(cfg, len(devices))}


def compiled_report(cfg: Config, topology: str, chip: Chip, devices, rt, compiled) -> dict:
    """The whole report of a compiled step: memory, cost (`step_cost`), step time and MFU."""
    report = {**_describe(cfg, topology, chip, devices, rt), **memory_report(compiled, chip)}
    return {**report, **_timing(cfg, chip, devices, rt, compiled, report["model_flops_per_step"]),
            "suggestions": [] if report["fits"] else suggestions(cfg, len(devices))}


def _describe(cfg: Config, topology: str, chip: Chip, devices, rt=None) -> dict:
    """The report's fields that need no compile: the config, the chips, the model's FLOPs."""
    import jax

    from lm.data.tokenizers import ByteTokenizer
    from lm.training.runtime import build

    rt = rt or build(cfg, ByteTokenizer(), devices=devices)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    return {
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "chips": len(devices),
        "mesh": dict(rt.mesh.shape),
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "remat": cfg.model.remat,
        "attention": rt.model.kernels.attention_name,
        **loss_tiling(rt),
        "params": int(sum(x.size for x in jax.tree.leaves(rt.abstract_state.params))),
        "hbm_capacity_bytes": chip.hbm_bytes,
        "model_flops_per_step": flops_per_token(rt.cfg.model, cfg.train.seq_len) * tokens,
        "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
    }


def memory_report(compiled, chip: Chip) -> dict:
    """HBM one chip needs for a compiled step, by kind, and whether it fits."""
    mem = compiled.memory_analysis()
    # Sizes are per chip; aliased bytes (the donated state) are counted in both arguments and outputs.
    hbm = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes \
        + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    return {
        "hbm_argument_bytes": int(mem.argument_size_in_bytes),
        "hbm_output_bytes": int(mem.output_size_in_bytes),
        "hbm_alias_bytes": int(mem.alias_size_in_bytes),
        "hbm_temp_bytes": int(mem.temp_size_in_bytes),
        "hbm_code_bytes": int(mem.generated_code_size_in_bytes),
        "hbm_needed_bytes": int(hbm),
        "fits": bool(hbm <= chip.hbm_bytes),
    }


def _timing(cfg: Config, chip: Chip, devices, rt, compiled, model_flops: float) -> dict:
    """Step time and MFU: the compiler's estimate plus the kernels it cannot see, never under the roofline."""
    n = len(devices)
    (flops, optimal_s, bytes_, kernel_flops, kernel_bytes), cost_source, compiler_timed = \
        step_cost(cfg, devices, rt, compiled)
    kernel_s = max(kernel_flops / chip.peak_bf16_flops, kernel_bytes / chip.hbm_bandwidth)
    # Roofline: the slower of the chip's peak FLOP/s and its HBM bandwidth (communication ignored),
    # over everything the step runs, and never faster than its model FLOPs allow.
    roofline_s = max((flops + kernel_flops) / chip.peak_bf16_flops, (bytes_ + kernel_bytes) / chip.hbm_bandwidth,
                     model_flops / (n * chip.peak_bf16_flops))
    if not compiler_timed:
        step_s, source = roofline_s, "roofline (compiler optimal_seconds unusable)"
    elif optimal_s + kernel_s < roofline_s:
        step_s, source = roofline_s, "roofline (above compiler optimal_seconds)"
    else:
        step_s, source = optimal_s + kernel_s, "compiler optimal_seconds"
    if kernel_flops:
        source += "; splash attention kernels counted analytically (the compiler cannot see into them)"
    peak = n * chip.peak_bf16_flops
    return {
        "compiler_flops_per_step": float(flops) * n,  # cost analysis counts one chip's share
        "kernel_flops_per_step": float(kernel_flops) * n,
        "bytes_accessed_per_chip": float(bytes_),
        "kernel_bytes_per_chip": float(kernel_bytes),
        "compiler_optimal_s": float(optimal_s),
        "roofline_step_s": float(roofline_s),
        "estimated_step_s": float(step_s),
        "step_time_source": source,
        "cost_source": cost_source,
        "estimated_tokens_per_s": cfg.train.batch_size * cfg.train.seq_len / step_s,
        "estimated_mfu": model_flops / (step_s * peak),
        "estimated_hfu": (flops + kernel_flops) * n / (step_s * peak),
    }


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    header = (f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh {r['mesh']}, "
              f"batch {r['batch_size']} x {r['seq_len']} (accum {r['grad_accum_steps']}), remat {r['remat']}, "
              f"attention {r['attention']}, loss in {r['loss_chunks']} chunk(s), {r['params'] / 1e6:.1f}M params")
    if "compiler_message" in r:
        lines = [header, f"  HBM per chip    DOES NOT FIT in {gib(r['hbm_capacity_bytes'])}; the TPU compiler "
                 f"refused it: {r['compiler_message']}"]
        return "\n".join(lines + [f"  to fit: {s}" for s in r["suggestions"]])
    lines = [
        header,
        "compiler estimates for one train step, not measurements:",
        f"  HBM per chip    {gib(r['hbm_needed_bytes'])} of {gib(r['hbm_capacity_bytes'])}: {verdict}",
        f"    arguments {gib(r['hbm_argument_bytes'])}, temporaries {gib(r['hbm_temp_bytes'])}, "
        f"outputs {gib(r['hbm_output_bytes'])} (of which {gib(r['hbm_alias_bytes'])} reuse donated arguments)",
        f"  FLOPs per step  {r['model_flops_per_step']:.3e} model (6N + attention), "
        f"{r['compiler_flops_per_step']:.3e} compiled (incl. recomputation)"
        + (f" + {r['kernel_flops_per_step']:.3e} in splash kernels (analytic)" if r["kernel_flops_per_step"] else ""),
        f"  step time       {r['estimated_step_s'] * 1e3:.1f} ms ({r['estimated_tokens_per_s']:,.0f} tokens/s), "
        f"from {r['step_time_source']}; costed from {r['cost_source']}",
        f"  MFU             {r['estimated_mfu']:.1%} of {r['peak_bf16_flops_per_chip'] / 1e12:.0f} "
        f"TFLOP/s bf16 per chip (hardware FLOPs utilisation {r['estimated_hfu']:.1%})",
    ]
    lines += [f"  to fit: {s}" for s in r["suggestions"]]
    return "\n".join(lines)
