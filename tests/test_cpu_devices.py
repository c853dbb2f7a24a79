"""One JAX device per CPU core: the count chosen, and when it is (or cannot be) applied."""

import json
import os
import subprocess
import sys

import jax
import pytest

from lm.config import load_config
from lm.cpu_devices import auto_count, split_cpu, usable_cores
from lm.errors import LMError
from tests.conftest import ROOT


def tiny(*overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))  # batch 8


@pytest.mark.parametrize("overrides, cores, expected", [
    ((), 2, 2),
    ((), 8, 8),
    ((), 64, 8),  # never more devices than rows
    (("train.batch_size=12",), 8, 6),  # the largest count that divides the batch
    (("train.batch_size=9",), 2, 1),
    (("train.batch_size=12", "train.grad_accum_steps=3"), 8, 4),  # micro-batches of 4
    (("train.batch_size=12", "eval.batch_size=8"), 8, 4),  # eval batches split too
    (("parallel.mode=pmap",), 4, 4),
    (("parallel.fsdp=2",), 8, None),  # a layout the user chose names its own device count
    (("parallel.data=2",), 8, None),
    (("parallel.num_processes=2",), 8, None),
])
def test_auto_count(overrides, cores, expected):
    assert auto_count(tiny(*overrides), cores) == expected


def devices_in_fresh_process(*overrides, env=None):
    code = ("import json, sys, jax; from lm.config import load_config; from lm.cpu_devices import split_cpu; "
            "split_cpu(load_config(sys.argv[1], sys.argv[2:])); print(json.dumps(jax.device_count()))")
    env = {**os.environ, **(env or {})}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / "tiny.yaml"), *overrides],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_split_applies_before_jax_starts_and_respects_xla_flags():
    assert devices_in_fresh_process() == auto_count(tiny(), usable_cores())
    assert devices_in_fresh_process("parallel.cpu_devices=3") == 3
    assert devices_in_fresh_process(env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) == 4


def test_explicit_count_after_jax_started_is_a_clear_error():
    jax.devices()  # this process already runs JAX with one CPU device (tests/conftest.py)
    split_cpu(tiny())  # auto keeps the running devices
    split_cpu(tiny("parallel.cpu_devices=1"))  # the count it already has
    with pytest.raises(LMError, match=r"parallel.cpu_devices=3 comes too late: JAX already runs here with 1 CPU"):
        split_cpu(tiny("parallel.cpu_devices=3"))
    assert jax.device_count() == 1
