"""`lm aot --fit`: search the micro-batch, remat policy and data/fsdp split that fit a TPU or GPU topology.

Candidates are compiled for the topology (lm.tools.aot) cheapest first: remat tiers from the
least recomputation up; within a tier each data/fsdp split (data parallelism first: no weight
gathers), each with gradient accumulation raised until the step fits, and later splits only
tried with fewer accumulation steps than the best so far. The search stops after the first
tier in which something fits; of those, the one with the best estimated step time wins.
"""

from __future__ import annotations

from lm.config import Config, replace
from lm.errors import LMError
from lm.parallel.mesh import mesh_shape
from lm.tools import accelerators, aot

REMAT_TIERS = ("none", "save_qkv_attn", "save_qkv", "block")  # least recomputation first


def layouts(cfg: Config, n_devices: int) -> list[dict]:
    """parallel.data / parallel.fsdp overrides splitting the devices parallel.tensor leaves, data-parallel first."""
    ways = n_devices // mesh_shape(cfg.parallel, n_devices)[2]
    out = []
    for data in (d for d in range(ways, 0, -1) if ways % d == 0):
        fsdp = ways // data
        out.append({"parallel.data": -1, "parallel.fsdp": 1} if fsdp == 1 else
                   {"parallel.data": data, "parallel.fsdp": -1})
    return out


def accumulations(cfg: Config, batch_ways: int) -> list[int]:
    """train.grad_accum_steps values, ascending, whose micro-batch the batch axes still split evenly."""
    b = cfg.train.batch_size
    return [a for a in range(1, b + 1) if b % a == 0 and (b // a) % batch_ways == 0]


def as_overrides(candidate: dict) -> list[str]:
    return [f"{key}={value}" for key, value in candidate.items()]


def fit(cfg: Config, topology: str) -> dict:
    """The fitting layout with the best estimated step time: its `aot.analyse` report plus
    `overrides` (key=value strings) and every `candidates` tried; or, when nothing fits,
    `fits` False and the `closest` candidate."""
    chip, devices = accelerators.topology_devices(topology)
    n = len(devices)
    ways = n // mesh_shape(cfg.parallel, n)[2]
    tried, fitting, refusal = [], [], None
    for remat in REMAT_TIERS:
        best_accum = None
        for layout in layouts(cfg, n):
            for accum in accumulations(cfg, ways):
                if best_accum is not None and accum >= best_accum:
                    break
                candidate = {"train.grad_accum_steps": accum, "model.remat": remat, **layout}
                try:
                    trial = replace(cfg, **candidate)
                    rt, compiled = accelerators.compile_step(trial, devices, device_memory=chip.capacity)
                except LMError as e:  # a layout this config cannot take (e.g. d_model over fsdp)
                    refusal = e
                    break
                except Exception as e:
                    if not accelerators.refused(e):
                        raise
                    tried.append({"overrides": as_overrides(candidate), "fits": False,
                                  "hbm_needed_bytes": accelerators.bytes_in(str(e))})  # a lower bound: the compiler's message
                    continue
                memory = aot.memory_report(compiled, chip)
                tried.append({"overrides": as_overrides(candidate), "fits": memory["fits"],
                              "hbm_needed_bytes": memory["hbm_needed_bytes"]})
                if memory["fits"]:
                    fitting.append((candidate, trial, rt, compiled))
                    best_accum = accum
                    break
        if fitting:
            break
    if not tried and refusal is not None:  # no layout built: the config itself is refused, as without --fit
        raise refusal
    if not fitting:
        closest = min(tried, key=lambda c: c["hbm_needed_bytes"]) if tried else None
        return {"topology": topology, "fits": False, "overrides": [], "closest": closest, "candidates": tried,
                "hbm_capacity_bytes": chip.capacity}
    reports = [{**aot.compiled_report(trial, topology, chip, devices, rt, compiled), "overrides": as_overrides(c)}
               for c, trial, rt, compiled in fitting]
    return {**min(reports, key=lambda r: r["estimated_step_s"]), "candidates": tried}


def format_fit(r: dict) -> str:
    """Two lines: the verdict, then the overrides to paste after train.py (one line when nothing fits)."""
    if not r["fits"]:
        closest = r["closest"]
        if closest is None:
            return f"nothing fits {r['topology']}: no candidate layout could be built for this config."
        return (f"nothing fits {r['topology']}: the closest, {' '.join(closest['overrides'])}, needs "
                f"{aot.size(closest['hbm_needed_bytes'])} of {aot.size(r['hbm_capacity_bytes'])} per device "
                f"({len(r['candidates'])} candidates compiled).")
    return (f"fits {r['topology']} with {aot.size(r['hbm_needed_bytes'])} of {aot.size(r['hbm_capacity_bytes'])} per device, "
            f"est. step {aot.duration(r['estimated_step_s'])}, est. MFU {r['estimated_mfu']:.1%} "
            f"({len(r['candidates'])} candidates compiled; compiler estimates); add after train.py:\n"
            + " ".join(r["overrides"]))
