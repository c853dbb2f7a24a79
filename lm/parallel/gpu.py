"""XLA's GPU backend as lm runs it: the XLA_FLAGS lm adds, each only where the user has not set it.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so `import lm` sets them
(lm/__init__.py; every command and the Python API import the package first). A flag the
user's own XLA_FLAGS names, with any value, is left as the user set it. XLA parses every
flag on every backend and the CPU compiler ignores these: CPU programs are unchanged
(tests/test_gpu_flags.py compiles a step both ways). Kept to flags with a documented reason;
the riskier ones are A/B variants in benchmarks/gpu.sh (docs/benchmarks.md, "On a GPU").
"""

from __future__ import annotations

import os
from typing import MutableMapping

GPU_XLA_FLAGS = {
    # Schedules each step so collectives (FSDP's all-gathers and reduce-scatters over several
    # GPUs) overlap compute; XLA's default is off. JAX's GPU performance tips, NVIDIA's JAX
    # images and every MaxText GPU recipe turn it on. On one GPU it only orders the kernels.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
}


def flag_names(xla_flags: str) -> set[str]:
    """The flag names an XLA_FLAGS string sets: `--name=value` and bare `--name`."""
    return {token[2:].split("=", 1)[0] for token in xla_flags.split() if token.startswith("--")}


def merge_flags(user: str, defaults: dict[str, str]) -> str:
    """`user`'s XLA_FLAGS followed by each default (`--name=value`) whose name it does not set."""
    named = flag_names(user)
    added = [f"--{name}={value}" for name, value in defaults.items() if name not in named]
    return " ".join([user.strip(), *added]).strip()


def set_gpu_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds GPU_XLA_FLAGS to `environ`'s XLA_FLAGS (only those it does not name)."""
    merged = merge_flags(environ.get("XLA_FLAGS", ""), GPU_XLA_FLAGS)
    if merged:
        environ["XLA_FLAGS"] = merged
