"""data.source=mixture: token shares follow the weights, a split run resumes bit for bit, each source is
evaluated on its own, the tokenizer sample is weighted, and resumes that would mix up sources are refused."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from lm import rundir
from lm.cli import main as cli_main
from lm.config import load_config
from lm.data import make_data
from lm.data.corpus import open_split
from lm.data.mixture import row_sources, shares, source_configs, training_sample
from lm.data.tokenizers import ByteTokenizer
from lm.errors import LMError
from lm.tools.evaluate import evaluate
from lm.training.loop import train
from tests.conftest import ROOT
from tests.test_observe import read_events

EXAMPLE = ROOT / "configs" / "mixture_example.yaml"  # shakespeare 0.75, grimm 0.25; 8 x 32 tokens a step
SAME_RUN = ["optim.decay_steps=40", "checkpoint.every=20", "eval.every=20", "log.every=1", "log.sample_tokens=0",
            "checkpoint.async_save=false", "train.steps=40"]


def _cfg(tmp_path, name: str, *overrides: str):
    return load_config(EXAMPLE, [f"run_dir={tmp_path / name}", f"data.tfds_data_dir={tmp_path / 'tfds'}",
                                 *SAME_RUN, *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The example mixture for 40 steps, and the same run killed after its checkpoint at step 20 and restarted."""
    tmp = tmp_path_factory.mktemp("mixture")
    full = train(_cfg(tmp, "full"))
    shutil.copytree(tmp / "full", tmp / "split")
    shutil.rmtree(tmp / "split" / rundir.CHECKPOINT_DIR / "40")
    second = train(_cfg(tmp, "split"))
    return tmp, full, second


@pytest.mark.parametrize("weights", [(0.75, 0.25), (0.5, 0.3, 0.2), (0.97, 0.01, 0.02)])
def test_row_sources_keep_every_prefix_near_its_share(weights):
    shares_S = np.array(weights) / sum(weights)
    rows = 8
    sources = np.concatenate([row_sources(shares_S, 3, step, rows) for step in range(500)])
    counts_NxS = np.cumsum(sources[:, None] == np.arange(len(weights)), axis=0)
    expected_NxS = np.arange(1, len(sources) + 1)[:, None] * shares_S
    assert np.abs(counts_NxS - expected_NxS).max() < 4  # rows, over every prefix of 4,000 rows
    np.testing.assert_array_equal(row_sources(shares_S, 3, 7, rows), sources[56:64])  # a function of (seed, step)
    other_seed = np.concatenate([row_sources(shares_S, 4, step, rows) for step in range(500)])
    assert (other_seed != sources).any()


@pytest.mark.slow
def test_token_shares_follow_the_weights(runs):
    tmp, full, _ = runs
    logged = [json.loads(line) for line in (tmp / "full" / rundir.METRICS_FILE).read_text().splitlines()]
    assert logged and all("tokens_by_source" in r for r in logged)  # every line
    steps = [r for r in logged if "loss" in r]
    for r in steps:
        assert sum(r["tokens_by_source"].values()) == r["step"] * 8 * 32  # cumulative, every row full
    final = steps[-1]["tokens_by_source"]
    assert final["shakespeare"] / (8 * 32 * 40) == pytest.approx(0.75, abs=0.02)
    assert final["grimm"] / (8 * 32 * 40) == pytest.approx(0.25, abs=0.02)
    vals = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in vals] == [20, 40]
    for r in vals:
        losses = r["val_loss_by_source"]
        assert set(losses) == {"shakespeare", "grimm"} and losses["shakespeare"] != losses["grimm"]
        assert min(losses.values()) <= r["val_loss"] <= max(losses.values())  # their token-weighted mean
    (events,) = (tmp / "full").glob("events.out.tfevents.*")
    tags = {}
    for event in read_events(events):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(event.step)
    assert tags["val_loss/shakespeare"] == tags["val_loss/grimm"] == [20, 40]
    assert sorted(tags["tokens/grimm"]) == sorted(r["step"] for r in logged)


@pytest.mark.slow
def test_a_split_run_logs_the_same_losses_bit_for_bit(runs):
    tmp, full, second = runs
    assert [r["step"] for r in second if "loss" in r] == list(range(21, 41))
    resumed = {(r["step"], "loss" in r): r for r in second}
    assert [r for r in full if (r["step"], "loss" in r) in resumed] == [
        {**resumed[(r["step"], "loss" in r)], **{k: r[k] for k in ("tokens_per_sec", "mfu", "eta_sec") if k in r}}
        for r in full if (r["step"], "loss" in r) in resumed]  # every figure but the timings, bit for bit
    metrics = [json.loads(line) for line in (tmp / "split" / rundir.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 41))  # the records past step 20 replaced


@pytest.mark.slow
def test_eval_scores_each_source_on_its_own(runs, capsys, monkeypatch):
    tmp, _, _ = runs
    result = evaluate(str(tmp / "full"))
    assert set(result["sources"]) == {"shakespeare", "grimm"}
    configs = source_configs(_cfg(tmp, "full").data)
    total_bytes = 0
    for name, figures in result["sources"].items():
        docs = [d["text"].decode() for d in open_split(configs[name], "validation")]
        assert figures["tokens"] == sum(len(d.encode()) + 1 for d in docs)  # bytes and EOS, each once
        n_bytes = sum(len(d.encode()) for d in docs)
        total_bytes += n_bytes
        assert figures["bits_per_byte"] == pytest.approx(figures["loss"] * figures["tokens"] / math.log(2) / n_bytes)
        assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]))
    sources = result["sources"].values()
    assert result["tokens"] == sum(s["tokens"] for s in sources)
    assert result["loss"] == pytest.approx(sum(s["loss"] * s["tokens"] for s in sources) / result["tokens"])
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / total_bytes)
    assert result["sources"]["shakespeare"]["bits_per_byte"] != result["sources"]["grimm"]["bits_per_byte"]

    monkeypatch.setattr("lm.tools.evaluate.evaluate", lambda *args: result)  # the printing alone
    capsys.readouterr()
    cli_main(["eval", "--run_dir", str(tmp / "full"), "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    cli_main(["eval", "--run_dir", str(tmp / "full")])
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["source", "loss", "perplexity", "bits/byte", "tokens"]
    assert table[2].split()[0] == "shakespeare" and table[3].split()[0] == "grimm"
    assert table[3].split()[3] == f"{result['sources']['grimm']['bits_per_byte']:.4f}"


@pytest.mark.slow
def test_prepare_lists_every_source(runs, capsys):
    tmp, _, _ = runs
    cli_main(["data", "prepare", "--config", str(EXAMPLE), f"data.tfds_data_dir={tmp / 'tfds'}"])
    out = capsys.readouterr().out
    for name in ("shakespeare", "grimm"):
        assert f"{name}: corpus: " in out and f"{name}: lm_text [train]" in out and f"{name}: lm_text [validation]" in out


@pytest.mark.slow
def test_data_bench_times_the_mixed_pipeline(runs, capsys):
    tmp, _, _ = runs
    capsys.readouterr()
    cli_main(["data", "bench", "--config", str(EXAMPLE), f"data.tfds_data_dir={tmp / 'tfds'}", "--batches", "4"])
    out = capsys.readouterr().out
    assert "(mixture of shakespeare, grimm, 4 batches, data.workers=0) | train step: " in out
    rates = [float(word.replace(",", "")) for word in out.split() if word.replace(",", "").isdigit()]
    assert rates[0] > 0 and rates[-2] > 0  # pipeline and step tokens/s (the last number is the device count)


@pytest.mark.slow
def test_resume_with_other_source_names_is_refused_and_with_other_weights_continues(runs):
    tmp, _, _ = runs
    copy = tmp / "renamed"
    shutil.copytree(tmp / "full", copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    renamed = _cfg(tmp, "renamed", "train.steps=60", "data.mixture.grimm.name=tales")
    with pytest.raises(LMError, match="sources shakespeare, grimm but this config names shakespeare, tales"):
        train(renamed)
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    reweighted = _cfg(tmp, "renamed", "train.steps=60", "data.mixture.grimm.weight=3")
    rundir.check_resumable(rundir.read_config(copy), reweighted, copy)  # weights may change
    # Without a config.yaml to compare, the data position saved in the checkpoint refuses other names too.
    data = make_data(_cfg(tmp, "full"), ByteTokenizer())
    [data.batch(step) for step in range(5)]
    state = json.loads(json.dumps(data.state()))
    with pytest.raises(LMError, match="checkpoint holds the data.mixture sources shakespeare, grimm"):
        make_data(renamed, ByteTokenizer()).restore(state)
    with pytest.raises(LMError, match="holds no mixture position"):
        make_data(renamed, ByteTokenizer()).restore({"parent_state": {}})
    # With other weights (shares 0.2, 0.8 now) each source continues where it stopped.
    again = make_data(reweighted, ByteTokenizer())
    again.restore(state)
    later = {step: again.batch(step) for step in range(5, 45)}
    gained = again.tokens_by_source["grimm"] - state["tokens"]["grimm"]
    assert gained / (40 * 8 * 32) == pytest.approx(0.8, abs=0.02)
    grimm_rows = [later[step]["inputs"][r] for step in later
                  for r in np.flatnonzero(row_sources(shares(reweighted.data), 0, step, 8) == 1)]
    np.testing.assert_array_equal(grimm_rows, [next(data.iterators["grimm"])["inputs"] for _ in grimm_rows])


def test_tokenizer_sample_is_weighted_and_repeats_a_small_source(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join("a" * 200 for _ in range(100)))  # 20,000 a's
    (tmp_path / "b.txt").write_text("\n\n".join("b" * 50 for _ in range(20)))  # 1,000 b's
    cfg = load_config(None, [f"data.tfds_data_dir={tmp_path / 'tfds'}", "data.source=mixture", "data.val_fraction=0.1",
                             f"data.mixture=[{{name: a, files: '{tmp_path / 'a.txt'}', doc_separator: '\\n\\n', "
                             f"weight: 1}}, {{name: b, files: '{tmp_path / 'b.txt'}', doc_separator: '\\n\\n', "
                             "weight: 3}]"])
    sample = "".join(training_sample(cfg, 8000))
    assert sample.count("a") == pytest.approx(2000, abs=10) and sample.count("b") == pytest.approx(6000, abs=10)
    assert set(sample) == {"a", "b"}  # training documents only: no separators, nothing else
