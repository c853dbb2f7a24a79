"""One JAX device per CPU core: the count chosen, and when it is (or cannot be) applied."""

import json
import os
import subprocess
import sys

import jax
import pytest

from lm.config import load_config
from lm.parallel.cpu import auto_count, split_cpu, usable_cores
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
    (("parallel.mode=pmap", "parallel.data=1"), 8, None),
    (("parallel.num_processes=2",), 8, None),
])
def test_auto_count(overrides, cores, expected):
    assert auto_count(tiny(*overrides), cores) == expected


def test_detected_multi_process_runs_are_not_split(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert auto_count(tiny(), 8) is None


@pytest.mark.parametrize("cpu_max, expected", [("max 100000", None), ("100000 100000", 1), ("150000 100000", 2)])
def test_container_cpu_quota_caps_the_cores(tmp_path, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    affinity = usable_cores(str(tmp_path / "absent"))
    assert usable_cores(str(tmp_path / "cpu.max")) == (affinity if expected is None else min(expected, affinity))


def devices_in_fresh_process(*overrides, env=None):
    code = ("import json, sys, jax; from lm.config import load_config; from lm.parallel.cpu import split_cpu; "
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


def test_an_earlier_auto_split_must_divide_the_next_runs_batches():
    code = """
import sys, jax
from lm.parallel import cpu as cpu_devices
from lm.config import load_config
from lm.errors import LMError
cpu_devices.usable_cores = lambda: 4
config = lambda batch: load_config(sys.argv[1], [f"train.batch_size={batch}"])
cpu_devices.split_cpu(config(8))
assert jax.device_count() == 4
cpu_devices.split_cpu(config(12))  # 4 devices divide 12: kept
try:
    cpu_devices.split_cpu(config(9))
except LMError as e:
    print(e)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / "tiny.yaml")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("this process already split the CPU into 4 devices for an earlier run, and they "
                                   "do not divide this run's batches (parallel.cpu_devices=0 would pick 3); run it "
                                   "in a fresh process.")


def test_explicit_count_after_jax_started_is_a_clear_error():
    jax.devices()  # this process already runs JAX with one CPU device (tests/conftest.py)
    split_cpu(tiny())  # auto keeps the running devices
    split_cpu(tiny("parallel.cpu_devices=1"))  # the count it already has
    with pytest.raises(LMError, match=r"parallel.cpu_devices=3 comes too late: JAX already runs here with 1 CPU"):
        split_cpu(tiny("parallel.cpu_devices=3"))
    assert jax.device_count() == 1
