"""Compile the real train step for a TPU slice or GPU host on a machine without one, and report what it needs.

    python -m lm.aot --config configs/llama_1b.yaml --topology v5e:2x4 [key=value ...] [--json]   (or lm aot)
    python -m lm.aot --config configs/llama_1b.yaml --topology h100:8

libtpu (the `tpu` extra) and jax's CUDA plugin (the `gpu-aot` extra) describe devices without
owning any (lm.tools.accelerators): the step train.py would run (same `lm.training.runtime.build`:
mesh, logical rules, shardings, dtypes, remat, batch) is lowered and compiled for them, and the
compiler's memory analysis says what one device needs, beside the activation floor counted for
the config (lm.observe.memory); the cost (lm.tools.cost) gives a step time and MFU. Every figure
it prints is an estimate, not a measurement.
"""

from __future__ import annotations

from lm.config import Config
from lm.observe.flops import flops_per_token
from lm.tools import accelerators, cost
from lm.tools.accelerators import Chip


def suggestions(cfg: Config, n_chips: int) -> list[str]:
    """What to change when a step does not fit in one device's memory."""
    out = []
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    if micro > n_chips:
        out.append(f"shrink the per-step micro-batch ({micro} sequences): lower train.batch_size or raise "
                   "train.grad_accum_steps (same global batch, less activation memory)")
    if cfg.model.remat in ("none", "everything_saveable", "dots_saveable"):
        out.append("recompute activations in the backward pass: model.remat=block (or nothing_saveable)")
    if cfg.parallel.fsdp == 1 and n_chips > 1:
        out.append("shard parameters and optimizer state over the chips: parallel.fsdp=-1 parallel.data=1")
    out.append("or use a topology with more chips, or chips with more memory (v5p: 95 GiB, h200: 141 GB); "
               "`lm aot --fit` searches micro-batch, remat and mesh for you")
    return out


def analyse(cfg: Config, topology: str) -> dict:
    """Compiles cfg's train step for `topology` and returns per-device memory, cost and MFU estimates."""
    chip, devices = accelerators.topology_devices(topology)
    try:
        rt, compiled = accelerators.compile_step(cfg, devices, device_memory=chip.capacity)
    except Exception as e:
        if not accelerators.refused(e):
            raise
        return refusal_report(cfg, topology, chip, devices, e)
    return compiled_report(cfg, topology, chip, devices, rt, compiled)


def refusal_report(cfg: Config, topology: str, chip: Chip, devices, error: Exception) -> dict:
    """The report of a step the compiler refused for not fitting; its message names the shortfall."""
    return {**_describe(cfg, topology, chip, devices), "fits": False,
            "hbm_needed_bytes": accelerators.bytes_in(str(error)),
            "compiler_message": str(error).splitlines()[0], "suggestions": suggestions(cfg, len(devices))}


def compiled_report(cfg: Config, topology: str, chip: Chip, devices, rt, compiled) -> dict:
    """The whole report of a compiled step: memory beside its floor, cost (`cost.step_cost`), step time and MFU."""
    report = {**_describe(cfg, topology, chip, devices, rt), **memory_report(compiled, chip)}
    floor = report["floor_bytes"] + report["state_bytes"]
    return {**report, "over_floor": report["hbm_needed_bytes"] / floor,
            **_timing(cfg, chip, devices, rt, compiled, report["model_flops_per_step"]),
            "suggestions": [] if report["fits"] else suggestions(cfg, len(devices))}


def _describe(cfg: Config, topology: str, chip: Chip, devices, rt=None) -> dict:
    """The report's fields that need no compile: the config, the devices, the model's FLOPs, the floor."""
    import jax

    from lm.data.tokenizers import ByteTokenizer
    from lm.training.runtime import build

    rt = rt or build(cfg, ByteTokenizer(), devices=devices, device_memory=chip.capacity)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    floor = cost.floor_bytes(rt)
    return {
        "topology": topology,
        "platform": chip.platform,
        "device_kind": devices[0].device_kind,
        "chips": len(devices),
        "hosts": len({d.process_index for d in devices}),
        "mesh": dict(rt.mesh.shape),
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "remat": cfg.model.remat,
        "attention": rt.model.kernels.attention_name,
        **cost.loss_tiling(rt),
        "params": int(sum(x.size for x in jax.tree.leaves(rt.abstract_state.params))),
        "hbm_capacity_bytes": chip.capacity,
        "device_memory_bytes": chip.hbm_bytes,
        "floor_bytes": sum(floor.values()),
        "floor_parts_bytes": floor,
        "state_bytes": cost.state_bytes(rt),
        "model_flops_per_step": flops_per_token(rt.cfg.model, cfg.train.seq_len) * tokens,
        "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
    }


def memory_report(compiled, chip: Chip) -> dict:
    """Memory one device needs for a compiled step, by kind, and whether it fits."""
    mem = compiled.memory_analysis()
    # Sizes are per device; aliased bytes (the donated state) are counted in both arguments and outputs.
    hbm = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes \
        + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    return {
        "hbm_argument_bytes": int(mem.argument_size_in_bytes),
        "hbm_output_bytes": int(mem.output_size_in_bytes),
        "hbm_alias_bytes": int(mem.alias_size_in_bytes),
        "hbm_temp_bytes": int(mem.temp_size_in_bytes),
        "hbm_code_bytes": int(mem.generated_code_size_in_bytes),
        "hbm_needed_bytes": int(hbm),
        "fits": bool(hbm <= chip.capacity),
    }


def _timing(cfg: Config, chip: Chip, devices, rt, compiled, model_flops: float) -> dict:
    """Step time and MFU: the compiler's estimate plus the kernels it cannot see, never under the roofline."""
    n = len(devices)
    (flops, optimal_s, bytes_, kernel_flops, kernel_bytes), cost_source, compiler_timed = \
        cost.step_cost(cfg, devices, rt, compiled)
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


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps them at or above 1: '41.14 GiB', '4.00 MiB', '512 B'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def duration(seconds: float) -> str:
    """Seconds as ms or µs, three significant digits or more: '3044 ms', '12.5 ms', '84.2 µs'."""
    value, unit = (seconds * 1e3, "ms") if seconds >= 1e-3 else (seconds * 1e6, "µs")
    return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f} {unit}"


def _capacity(r: dict) -> str:
    if r["hbm_capacity_bytes"] == r["device_memory_bytes"]:
        return size(r["hbm_capacity_bytes"])
    return (f"{size(r['hbm_capacity_bytes'])} ({r['hbm_capacity_bytes'] / r['device_memory_bytes']:.0%} of "
            f"{size(r['device_memory_bytes'])}: JAX's memory pool, XLA_CLIENT_MEM_FRACTION sets it)")


def format_report(r: dict) -> str:
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    per = "GPU" if r["platform"] == "gpu" else "chip"
    header = (f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh {r['mesh']}, "
              f"batch {r['batch_size']} x {r['seq_len']} (accum {r['grad_accum_steps']}), remat {r['remat']}, "
              f"attention {r['attention']}, loss in {r['loss_chunks']} chunk(s), {r['params'] / 1e6:.1f}M params")
    if "compiler_message" in r:
        lines = [header, f"  memory per {per}  DOES NOT FIT in {_capacity(r)}; the compiler refused it: "
                 f"{r['compiler_message']}"]
        return "\n".join(lines + [f"  to fit: {s}" for s in r["suggestions"]])
    parts = ", ".join(f"{name.replace('_', ' ')} {size(n)}" for name, n in r["floor_parts_bytes"].items() if n)
    lines = [
        header,
        "compiler estimates for one train step, not measurements:",
        f"  memory per {per}  {size(r['hbm_needed_bytes'])} of {_capacity(r)}: {verdict}",
        f"    arguments {size(r['hbm_argument_bytes'])}, temporaries {size(r['hbm_temp_bytes'])}, "
        f"outputs {size(r['hbm_output_bytes'])} (of which {size(r['hbm_alias_bytes'])} reuse donated arguments)",
        f"    floor (counted): activations {size(r['floor_bytes'])} ({parts}) + parameters and optimizer state "
        f"{size(r['state_bytes'])}; this step needs {r['over_floor']:.2f}x that",
        f"  FLOPs per step  {r['model_flops_per_step']:.3e} model (6N + attention), "
        f"{r['compiler_flops_per_step']:.3e} {'counted' if r['platform'] == 'gpu' else 'compiled'} "
        "(incl. recomputation)"
        + (f" + {r['kernel_flops_per_step']:.3e} in splash kernels (analytic)" if r["kernel_flops_per_step"] else ""),
        f"  step time       {duration(r['estimated_step_s'])} ({r['estimated_tokens_per_s']:,.0f} tokens/s), "
        f"from {r['step_time_source']}; costed from {r['cost_source']}",
        f"  MFU             {'at most ' if r['step_time_source'].startswith('roofline') else ''}"
        f"{r['estimated_mfu']:.1%} of {r['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per {per} "
        f"(hardware FLOPs utilisation {r['estimated_hfu']:.1%})",
    ]
    lines += [f"  to fit: {s}" for s in r["suggestions"]]
    return "\n".join(lines)
