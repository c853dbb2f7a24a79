"""Cheap checks of the pieces exact resume relies on: fingerprints, atomic files, metrics repair."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from lm.storage import write_atomic
from lm.training.checkpoint import fingerprint
from lm.observe.log import MetricsLog


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_fingerprint_changes_with_any_single_element(dtype):
    tree = {"a": jnp.arange(12, dtype=dtype).reshape(3, 4), "b": {"c": jnp.ones((5,), dtype)}}
    reference = fingerprint(tree)
    assert fingerprint({"a": tree["a"] + 0, "b": {"c": tree["b"]["c"] * 1}}) == reference
    for index in [(0, 0), (1, 2), (2, 3)]:
        changed = tree["a"].at[index].set(tree["a"][index] + 1)
        assert fingerprint({**tree, "a": changed}) != reference
    swapped = tree["a"].at[0, 0].set(tree["a"][0, 1]).at[0, 1].set(tree["a"][0, 0])
    assert fingerprint({**tree, "a": swapped}) != reference
    assert fingerprint({"a": tree["b"]["c"], "b": {"c": tree["a"]}}) != reference  # paths count


def test_write_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "config.yaml"
    write_atomic(path, "old\n")
    write_atomic(path, "new: 1\n")
    assert path.read_text() == "new: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_metrics_log_drops_records_past_the_checkpoint_and_a_cut_line(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 5, 10, 15)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 20, "lo')
    MetricsLog(tmp_path, resume_step=10, total_steps=30)
    kept = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 5, 10]


STRAY_READ_AT_EXIT = """
from lm.training.checkpoint import _silence_stray_read_errors
_silence_stray_read_errors()

async def {name}():
    pass

def fail_restore():  # leaves a read it never started in a reference cycle, freed (and warned of) at exit
    cycle = [{name}()]
    cycle.append(cycle)

fail_restore()
"""


@pytest.mark.parametrize("name, warns", [("_read_array_index_and_device_put", False), ("other_read", True)])
def test_only_orbax_reads_left_by_a_failed_restore_are_silenced(name, warns):
    done = subprocess.run([sys.executable, "-c", STRAY_READ_AT_EXIT.format(name=name)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("was never awaited" in done.stderr) == warns, done.stderr
