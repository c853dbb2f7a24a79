"""The XLA_FLAGS lm adds for GPUs (lm.parallel.gpu): the user's own win, and CPU programs stay the same."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax

from lm.data.tokenizers import ByteTokenizer
from lm.parallel.gpu import GPU_XLA_FLAGS, flag_names, merge_flags, set_gpu_flags
from lm.training.runtime import build

DEFAULTS = {"xla_gpu_a": "true", "xla_gpu_b": "4"}


def test_defaults_follow_the_users_flags_and_skip_those_it_names():
    assert merge_flags("", DEFAULTS) == "--xla_gpu_a=true --xla_gpu_b=4"
    user = "--xla_dump_to=/tmp/x  --xla_gpu_a=false"
    assert merge_flags(user, DEFAULTS) == "--xla_dump_to=/tmp/x  --xla_gpu_a=false --xla_gpu_b=4"
    assert merge_flags("--xla_gpu_b", DEFAULTS) == "--xla_gpu_b --xla_gpu_a=true"  # a bare boolean flag counts
    assert merge_flags("--xla_gpu_a=1 --xla_gpu_b=0", DEFAULTS) == "--xla_gpu_a=1 --xla_gpu_b=0"
    twice = merge_flags(merge_flags("--xla_other=1", DEFAULTS), DEFAULTS)
    assert twice == "--xla_other=1 --xla_gpu_a=true --xla_gpu_b=4"  # nothing added twice
    assert flag_names("--xla_gpu_a=x=y --xla_gpu_b") == {"xla_gpu_a", "xla_gpu_b"}


def test_set_gpu_flags_and_import_lm_add_only_what_the_user_left_unset():
    environ = {}
    set_gpu_flags(environ)
    assert flag_names(environ["XLA_FLAGS"]) == set(GPU_XLA_FLAGS)
    name = next(iter(GPU_XLA_FLAGS))
    code = "import lm, os; print(os.environ['XLA_FLAGS'])"
    for user, expected in ((f"--{name}=false --xla_backend_optimization_level=0",
                            f"--{name}=false --xla_backend_optimization_level=0"),
                           ("--xla_backend_optimization_level=0",
                            merge_flags("--xla_backend_optimization_level=0", GPU_XLA_FLAGS))):
        env = {**os.environ, "XLA_FLAGS": user}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def program(lowered, options=None) -> str:
    """The compiled program's instructions, without source locations: the persistent compilation cache
    may hand back the same program compiled by another process, whose stack frames name other files."""
    blocks = lowered.compile(compiler_options=options).as_text().split("\n\n")
    kept = [b for b in blocks if not b.startswith(("FileNames", "FunctionNames", "FileLocations", "StackFrames"))]
    return re.sub(r", metadata=\{[^}]*\}", "", "\n\n".join(kept))


def test_gpu_flags_leave_cpu_programs_unchanged(tiny_config):
    """XLA parses every flag on every backend; the GPU ones must not change what XLA:CPU compiles."""
    rt = build(tiny_config(), ByteTokenizer(), devices=jax.devices("cpu")[:1])
    lowered = rt.train_step.lower(rt.restore_target, rt.abstract_batch())
    plain = program(lowered)
    options = {name: {"true": True, "false": False}.get(value, value) for name, value in GPU_XLA_FLAGS.items()}
    assert program(lowered, options) == plain
    # the comparison sees a flag XLA:CPU does read
    assert program(lowered, {"xla_cpu_enable_fast_min_max": False}) != plain
