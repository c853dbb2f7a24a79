"""Kill anywhere, preemption: a real train.py subprocess is interrupted and restarted.

One run_dir goes through SIGKILL during the first steps, SIGKILL during validation,
SIGTERM (preemption) and SIGKILL while an asynchronous checkpoint is being written; each
time the same command is run again. Its final metrics and parameters must equal, bit for
bit, those of a run that was never interrupted (same data order, same dropout).
Kill points are found by watching what the run writes (metrics.jsonl, checkpoints/).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm.training.checkpoint import Checkpoints
from lm.config import load_config
from lm.training.runtime import build
from lm.data.tokenizers import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP_MARK = "orbax-checkpoint-tmp"
TIMEOUT_S = 180


class Run:
    """`python train.py --config configs/tiny.yaml ...` on one run_dir; stdout goes to a log file."""

    def __init__(self, run_dir: pathlib.Path, text_file: pathlib.Path):
        self.run_dir = run_dir
        self.argv = [sys.executable, "train.py", "--config", "configs/tiny.yaml", f"data.text_file={text_file}",
                     f"run_dir={run_dir}", "model.dropout=0.1", "train.steps=30", "checkpoint.every=10",
                     "eval.every=15", "log.every=5"]
        self.starts = 0

    def start(self) -> subprocess.Popen:
        self.starts += 1
        self.log = self.run_dir.parent / f"{self.run_dir.name}.{self.starts}.log"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        return subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written right now
                pass
        return out

    def temp_checkpoints(self) -> list[str]:
        ckpt = self.run_dir / "checkpoints"
        return [name for name in os.listdir(ckpt) if TMP_MARK in name] if ckpt.exists() else []


def wait_for(proc: subprocess.Popen, run: Run, condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}:\n{run.output()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


def kill_when(run: Run, condition, what: str) -> None:
    proc = run.start()
    wait_for(proc, run, condition, what)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def logged(run: Run, step: int, key: str) -> bool:
    return any(r["step"] == step and key in r for r in run.records())


def comparable(records: list[dict]) -> dict[tuple[int, str], dict]:
    """Records keyed by (step, kind), without wall-clock fields; duplicates are an error."""
    out = {}
    for r in records:
        key = (r["step"], "val" if "val_loss" in r else "train")
        assert key not in out, f"step {key} logged twice"
        out[key] = {k: v for k, v in r.items() if k not in ("tokens_per_sec", "eta_sec", "mfu")}
    return out


def final_params(run_dir: pathlib.Path):
    rt = build(load_config(run_dir / "config.yaml"), load_tokenizer(run_dir))
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True)
    params, _ = ckpts.restore_params(30, rt.restore_target.params)
    ckpts.close()
    return params


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_exactly(tmp_path, shakespeare):
    reference = Run(tmp_path / "reference", shakespeare)
    ref_proc = reference.start()  # runs alongside the interrupted one
    run = Run(tmp_path / "run", shakespeare)

    # 1. SIGKILL during the first steps.
    kill_when(run, lambda: run.records(), "the first logged step")

    # 2. SIGKILL during the step-15 validation (its train record is written, its val_loss is not).
    kill_when(run, lambda: logged(run, 15, "loss") and not logged(run, 15, "val_loss"), "validation at step 15")
    assert not logged(run, 15, "val_loss")

    # 3. SIGTERM after that validation: checkpoint at the current step, exit 0.
    proc = run.start()
    wait_for(proc, run, lambda: logged(run, 15, "val_loss"), "validation at step 15")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT_S) == 0, run.output()
    preempted = [line for line in run.output().splitlines() if line.startswith("preempted: checkpoint at step ")]
    assert len(preempted) == 1, run.output()
    step = int(preempted[0].split()[4])
    assert 15 <= step < 30
    assert Checkpoints(run.run_dir / "checkpoints", read_only=True).latest() == step

    # 4. SIGKILL while the next checkpoint (step 20 or 30) is being written asynchronously.
    kill_when(run, lambda: run.temp_checkpoints(), "an asynchronous checkpoint write")
    assert run.temp_checkpoints(), "the write finished before the kill landed"

    # 5. The same command again: resumes from the preemption checkpoint, never the partial one.
    proc = run.start()
    assert proc.wait(timeout=TIMEOUT_S) == 0, run.output()
    assert f"resumed from {run.run_dir / 'checkpoints'}/{step}" in run.output()
    assert not run.temp_checkpoints()
    assert ref_proc.wait(timeout=TIMEOUT_S) == 0, reference.output()

    expected, got = comparable(reference.records()), comparable(run.records())
    assert (30, "train") in expected and (30, "val") in expected
    for key, record in expected.items():
        assert got.get(key) == record, key
    for a, b in zip(jax.tree.leaves(final_params(reference.run_dir)), jax.tree.leaves(final_params(run.run_dir))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ctrl_c_checkpoints_the_step_reached_and_says_how_to_resume(tmp_path, shakespeare):
    """Ctrl-C (SIGINT) while checkpoints are being written: the write completes, the step reached is
    checkpointed, one line says how to resume, exit code 130, no traceback, no temporary directory."""
    run = Run(tmp_path / "run", shakespeare)
    run.argv += ["train.steps=3000", "checkpoint.every=1", "eval.every=0"]  # later overrides win
    proc = run.start()
    wait_for(proc, run, lambda: run.temp_checkpoints(), "an asynchronous checkpoint write")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=TIMEOUT_S) == 130, run.output()
    out = run.output()
    assert "Traceback" not in out and "orbax" not in out.lower(), out
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(r"interrupted: checkpoint at step \d+ written; run the same command to resume\.", last), out
    assert Checkpoints(run.run_dir / "checkpoints", read_only=True).latest() == int(last.split()[4])
    assert not run.temp_checkpoints()


def test_a_second_ctrl_c_stops_at_once_in_one_line():
    code = ("import os, signal, time\n"
            "from lm.training.guards import Preemption\n"
            "p = Preemption(30.0)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "assert p.reached(1) and p.interrupted\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(30)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines() == [
        "interrupt: stopping at the next safe point, after this step and a checkpoint of it (Ctrl-C again stops "
        "at once)",
        "error: interrupted again: stopped at once; the run resumes from its newest complete checkpoint when you "
        "run the same command."]
