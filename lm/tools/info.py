"""`lm info`: the versions that matter, the processor, the backend and its devices, and known version mismatches.

A mismatch is a package installed beside jax whose version jax's own metadata rules out
(e.g. a libtpu other than the one `jax[tpu]` names, or a CUDA plugin built for another
jax): pip can install such a pair, and it fails later in obscure ways.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from lm import __version__

# Packages whose version a run depends on; the first two pairs must agree with jax's metadata.
PACKAGES = ("lm", "jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "nvidia-cudnn-cu13", "flax", "optax", "orbax-checkpoint", "numpy")
REQUIRERS = ("jax", "jax-cuda12-plugin", "jax-cuda13-plugin")  # whose pins on the others are checked
ACCELERATOR_EXTRAS = ("tpu", "cuda", "cuda12", "cuda13")  # jax's extras that install a companion package
CPUINFO = "/proc/cpuinfo"
# The widest vector extension a CPU timing depends on, by its /proc/cpuinfo flag (x86 "flags", Arm "Features").
SIMD_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse4_2", "SSE4.2"), ("sve", "SVE"), ("asimd", "NEON"))


def processor(cpuinfo: str = CPUINFO) -> str:
    """This machine's processor as CPU figures should name it, e.g. "AMD EPYC, family 25 model 17, AVX-512".

    Read from the first processor of /proc/cpuinfo (model name, x86 family and model, widest
    vector extension); elsewhere whatever `platform` knows.
    """
    try:
        with open(cpuinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in lines:
        key, colon, value = line.partition(":")
        if not colon and fields:  # the blank line after the first processor
            break
        if colon:
            fields.setdefault(key.strip(), value.strip())
    parts = [fields.get("model name") or fields.get("Hardware") or platform.machine()]
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    widest = next((label for flag, label in SIMD_FLAGS if flag in flags), None)
    return ", ".join(parts + ([widest] if widest else []))


def installed_versions() -> dict[str, str | None]:
    """Each package's installed version (None when absent); lm's is the running source tree's own."""
    versions = {}
    for name in PACKAGES:
        try:  # lm's from its source: also right in a checkout that is not installed
            versions[name] = __version__ if name == "lm" else importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def requirements(versions: dict[str, str | None]) -> dict[str, list[str]]:
    """Each installed requirer's requirement strings (jax's own, and the CUDA plugins')."""
    return {name: importlib.metadata.requires(name) or [] for name in REQUIRERS if versions.get(name)}


def mismatches(versions: dict[str, str | None], requires: dict[str, list[str]]) -> list[str]:
    """One sentence per installed package whose version a requirer's metadata rules out.

    A requirement counts when it has no marker or belongs to an accelerator extra (jax names
    libtpu under `tpu`, the CUDA plugin under `cuda12`), since an installed package of that name
    is the one jax will load; pins of other extras (e.g. jax's `minimum-jaxlib`) do not.
    """
    from packaging.requirements import Requirement

    found = []
    for requirer, lines in requires.items():
        for line in lines:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ACCELERATOR_EXTRAS):
                continue
            have = versions.get(req.name)
            if have is None or req.name not in PACKAGES or not req.specifier or req.specifier.contains(have, True):
                continue
            sentence = (f"{req.name} {have} is installed but {requirer} {versions[requirer]} asks for "
                        f"{req.name}{req.specifier}; reinstall them together: {_fix(req.name, versions['jax'])}.")
            if sentence not in found:
                found.append(sentence)
    return found


def _fix(name: str, jax_version: str) -> str:
    extra = "tpu" if name == "libtpu" else "cuda12" if "cuda12" in name else "cuda13" if "cuda13" in name else ""
    return f"pip install 'jax[{extra}]=={jax_version}'" if extra else f"pip install 'jaxlib=={jax_version}'"


def aot_targets(versions: dict[str, str | None]) -> dict[str, bool]:
    """Which devices `lm aot` can compile for here: TPUs with libtpu (the `tpu` extra), GPUs with
    jax's CUDA 13 plugin of jax's own version and cuDNN (the `gpu-aot` extra)."""
    gpu = versions.get("jax-cuda13-plugin") == versions.get("jax") and bool(versions.get("nvidia-cudnn-cu13"))
    return {"tpu": bool(versions.get("libtpu")), "gpu": gpu}


def info() -> dict:
    """Versions, mismatches, and what JAX sees: backend, device kind and counts, processes."""
    versions = installed_versions()
    report = {"lm": versions["lm"], "python": sys.version.split()[0], "machine": f"{platform.system()} "
              f"{platform.machine()}", "processor": processor(),
              "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "versions": versions, "aot": aot_targets(versions),
              "warnings": mismatches(versions, requirements(versions))}
    try:
        import jax

        from lm.parallel.cpu import split_per_core

        per_core = split_per_core()  # as commands split the CPU (only the CPU backend reads it)
        devices = jax.devices()
        report.update(backend=jax.default_backend(), device_kind=devices[0].device_kind, devices=len(devices),
                      local_devices=jax.local_device_count(), processes=jax.process_count())
        if report["backend"] == "cpu" and per_core:
            report["cpu_split_per_core"] = True
    except Exception as e:  # a broken accelerator install: still report the versions
        report.update(backend=None, backend_error=str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    return report


def format_info(r: dict) -> str:
    v = r["versions"]
    cuda = ", ".join(f"{n} {v[n]}" for n in PACKAGES if "cuda" in n and v[n]) or "none"
    lines = [
        f"lm {r['lm']} | Python {r['python']} | {r['machine']} | {r['processor']} | {r['cores']} cores",
        f"jax {v['jax']} | jaxlib {v['jaxlib']} | libtpu {v['libtpu'] or 'none'} | CUDA plugin {cuda}",
        f"flax {v['flax']} | optax {v['optax']} | orbax-checkpoint {v['orbax-checkpoint']} | numpy {v['numpy']}",
    ]
    aot = r["aot"]
    lines.append("lm aot: TPU topologies " + ("yes" if aot["tpu"] else "no (pip install -e '.[tpu]')")
                 + ", GPU topologies " + ("yes (gpu-aot extra)" if aot["gpu"] else "no (pip install -e '.[gpu-aot]')"))
    if r.get("backend"):
        lines.append(f"backend {r['backend']}: {r['devices']} x {r['device_kind']} ({r['local_devices']} local), "
                     f"{r['processes']} process(es)")
        if r.get("cpu_split_per_core"):
            lines[-1] += (" | commands split the CPU into one device per core (fewer when that does not divide "
                          "the batch; parallel.cpu_devices)")
    else:
        lines.append(f"backend: JAX could not start ({r['backend_error']})")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)
