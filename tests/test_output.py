"""What lm prints and logs: strict JSON (non-finite figures as null), no warning per NaN step, a
quiet exit on a closed pipe, distinct plot labels, lm's own version, and the warmup warning."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import sys

import pytest

import lm
from lm import jsonsafe
from lm.cli import main as cli_main
from lm.config import OptimConfig
from lm.tools import info
from lm.tools.plot import plot_runs, run_labels
from lm.training.optim import warmup_warning
from tests.conftest import ROOT


def strict(line: str):
    """json.loads that refuses NaN and Infinity, as every other language's parser does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_dumps_writes_nonfinite_figures_as_null_and_says_which():
    record = {"step": 3, "loss": math.nan, "mfu": 0.5, "sources": {"web": {"loss": math.inf}},
              "rows": [{"with_cache": -math.inf}, {"with_cache": 2.0}]}
    out = strict(jsonsafe.dumps(record))
    assert out == {"step": 3, "loss": None, "mfu": 0.5, "sources": {"web": {"loss": None}},
                   "rows": [{"with_cache": None}, {"with_cache": 2.0}],
                   "nonfinite": {"loss": "nan", "sources.web.loss": "inf", "rows.0.with_cache": "-inf"}}
    assert strict(jsonsafe.dumps({"loss": 1.5})) == {"loss": 1.5}  # nothing to say: no field
    assert record["loss"] is math.nan  # the caller's record is left as it was


DIVERGED = {"loss": math.nan, "perplexity": math.nan, "bits_per_byte": math.inf, "tokens": 10, "step": 5}


@pytest.mark.parametrize("argv, module, function", [
    (["eval", "--run_dir", "x", "--json"], "lm.tools.evaluate", "evaluate"),
    (["bench", "--config", "configs/tiny.yaml", "--json"], "lm.tools.bench", "bench"),
    (["aot", "--config", "configs/tiny.yaml", "--topology", "v5e:2x4", "--json"], "lm.tools.aot", "analyse"),
    (["aot", "--config", "configs/tiny.yaml", "--topology", "v5e:2x4", "--fit", "--json"], "lm.tools.fit", "fit"),
    (["info", "--json"], "lm.tools.info", "info"),
])
def test_every_json_flag_prints_strict_json_for_nonfinite_figures(argv, module, function, monkeypatch, capsys):
    monkeypatch.setattr(importlib.import_module(module), function,
                        lambda *args, **kwargs: {**DIVERGED, "fits": True})  # lm aot reads "fits" for its exit code
    monkeypatch.chdir(ROOT)
    cli_main(argv)
    out = strict(capsys.readouterr().out)
    assert out["loss"] is None and out["bits_per_byte"] is None and out["tokens"] == 10
    assert out["nonfinite"] == {"loss": "nan", "perplexity": "nan", "bits_per_byte": "inf"}


def test_a_diverged_run_logs_and_evaluates_as_json_without_a_warning_per_step_and_warns_once_of_its_warmup(
        tiny_config, tmp_path, capsys, caplog):
    from lm.training.loop import train

    # lr 1e30 blows the weights up after one update; skipped steps keep the run going with NaN losses.
    cfg = tiny_config("model.n_layers=1", "model.d_model=32", "train.seq_len=16", "train.batch_size=4",
                      "optim.lr=1e30", "optim.grad_clip=0", "train.skip_nonfinite=true", "train.steps=4",
                      "optim.warmup_steps=4", "log.every=1", "eval.every=0", "checkpoint.async_save=false")
    with caplog.at_level(logging.WARNING):
        records = train(cfg)
    lines = [strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bad = [line for line in lines if line.get("nonfinite")]
    assert bad and all(line["loss"] is None and line["nonfinite"]["loss"] in ("nan", "inf") for line in bad)
    assert sum(not math.isfinite(r["loss"]) for r in records) == len(bad)  # the run's own records keep the NaN
    assert not [r for r in caplog.records if r.name.startswith("tensorboardX")]
    captured = capsys.readouterr()
    assert f"loss {bad[0]['nonfinite']['loss']}" in captured.out  # the console line still shows it
    assert captured.err.count("warning: optim.warmup_steps=4 does not end before the last step") == 1

    # The first update left the weights ~1e29 (every later one was skipped): eval.py's figures are NaN.
    cli_main(["eval", "--run_dir", str(tmp_path / "run"), "--json"])
    captured = capsys.readouterr()
    scored = strict(captured.out)
    assert scored["loss"] is None and scored["nonfinite"]["loss"] == "nan" and scored["tokens"] > 0
    assert "warning" not in captured.err  # eval does not warn of the warmup


def test_the_warmup_warning_follows_the_schedules_warmup():
    def warning(warmup, steps, decay=0):
        return warmup_warning(OptimConfig(warmup_steps=warmup, decay_steps=decay), steps)

    assert warning(100, 100) and warning(150, 100) and warning(150, 100, decay=200)
    assert "set optim.warmup_steps below 100" in warning(100, 100) and "\n" not in warning(100, 100)
    assert warning(99, 100) is None and warning(0, 1) is None
    assert warning(150, 100, decay=50) is None  # the schedule caps warmup at the decay's 50 steps


def test_plot_labels_runs_by_their_shortest_distinguishing_path(tmp_path, monkeypatch):
    assert run_labels(["runs/a/r", "runs/b/r"]) == ["a/r", "b/r"]
    assert run_labels(["runs/a/r/", "runs/b/r", "other/x"]) == ["a/r", "b/r", "x"]
    assert run_labels(["runs/a/r", "a/r"]) == ["runs/a/r", "a/r"]  # one is the other's suffix: given whole
    assert run_labels(["gs://bucket/a/r", "gs://other/a/r"]) == ["bucket/a/r", "other/a/r"]

    import matplotlib.figure

    for name in ("a", "b"):
        (tmp_path / name / "r").mkdir(parents=True)
        (tmp_path / name / "r" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "tokens_per_sec": 9.0}\n')
    legends = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: legends.append(
        [text.get_text() for text in fig.axes[1].get_legend().get_texts()]))
    monkeypatch.chdir(tmp_path)
    plot_runs(["a/r", "b/r"], tmp_path / "c.png")
    assert legends == [["a/r", "b/r"]]


def test_a_closed_stdout_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) has gone before lm writes
    try:
        done = subprocess.run([sys.executable, "-m", "lm.data", "list"], cwd=ROOT, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr


def test_lm_version_comes_from_the_source_tree(monkeypatch):
    installed = importlib.metadata.version

    def version(name):
        if name == "lm":  # a checkout that was never pip-installed
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert info.installed_versions()["lm"] == lm.__version__
    assert info.format_info(info.info()).startswith(f"lm {lm.__version__} |")
