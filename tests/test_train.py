import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm.training.checkpoint import Checkpoints
from lm.config import load_config
from lm.parallel.cpu import auto_count, usable_cores
from lm.tools.evaluate import eval_windows, evaluate
from lm.training.runtime import build
from lm.training.step import token_losses
from lm.data.tokenizers import ByteTokenizer, load_tokenizer
from lm.training.loop import train
from tests.conftest import ROOT, SHAKESPEARE


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir, cfg, step):
    rt = build(cfg, ByteTokenizer())
    params, _ = Checkpoints(run_dir / "checkpoints", read_only=True).restore_params(step, rt.restore_target.params)
    return jax.device_get(params)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare):
    """One tiny 30-step run shared by the tests below, with dropout on (so resuming checks its masks too)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.text_file={shakespeare}", f"run_dir={run_dir}",
                                                      "model.dropout=0.1", "model.attention_dropout=0.1"])
    records = train(cfg)
    return cfg, run_dir, records


def test_training_writes_the_run_and_the_loss_falls(trained):
    cfg, run_dir, records = trained
    assert {"config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    logged = read_metrics(run_dir)
    assert logged == json.loads(json.dumps(records))
    steps = [r for r in logged if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(steps[0])
    assert [r["step"] for r in steps] == [1, 5, 10, 15, 20, 25, 30]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.5  # from ~ln(259)=5.56 to well below
    vals = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in vals] == [15, 30] and vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert Checkpoints(run_dir / "checkpoints", read_only=True).steps() == [20, 30]  # keep=2
    assert load_tokenizer(run_dir).vocab_size == 259
    saved = load_config(run_dir / "config.yaml").model  # what the user wrote; the runtime resolves it per platform
    assert (saved.dtype, saved.attention, saved.attention_dropout) == ("auto", "auto", 0.1)


def test_a_resume_may_change_how_the_model_runs_but_not_what_it_is(trained, tmp_path):
    """A run saved with model.dtype/attention=auto continues under explicit float32/xla and other dropout."""
    from lm.config import replace
    from lm.errors import LMError

    cfg, run_dir, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    changed = replace(cfg, run_dir=str(copy), **{"train.steps": 31, "model.dtype": "float32", "model.attention": "xla",
                                                 "model.dropout": 0.0, "model.attention_dropout": 0.2})
    assert [r["step"] for r in train(changed) if "loss" in r] == [31]
    with pytest.raises(LMError, match="holds a run with model.norm_eps=1e-05"):
        train(replace(changed, **{"train.steps": 32, "model.norm_eps": 1e-6}))


def test_resume_continues_exactly(trained, tmp_path):
    cfg, run_dir, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    expected = final_params(run_dir, cfg, 30)
    shutil.rmtree(copy / "checkpoints" / "30")  # as if killed between the checkpoints at 20 and 30
    from lm.config import replace

    records = train(replace(cfg, run_dir=str(copy)))
    assert [r["step"] for r in records if "loss" in r] == [21, 25, 30]
    original = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    resumed = {r["step"]: r for r in read_metrics(copy) if "loss" in r}
    # Records past the checkpoint were dropped and logged again (plus the first step after resuming).
    assert sorted(resumed) == sorted(set(original) | {21})
    for step in (25, 30):
        assert resumed[step]["loss"] == original[step]["loss"]
        assert resumed[step]["grad_norm"] == original[step]["grad_norm"]
    assert read_metrics(copy)[-1] == read_metrics(run_dir)[-1]  # the final val_loss record
    got = final_params(copy, cfg, 30)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_finished_run_rerun_does_nothing_and_model_change_is_refused(trained):
    cfg, run_dir, _ = trained
    from lm.config import replace
    from lm.errors import LMError

    assert train(cfg) == []
    with pytest.raises(LMError, match="model.d_model"):
        train(replace(cfg, **{"model.d_model": 32}))


def test_eval_scores_every_token_once(trained, tmp_path):
    cfg, run_dir, _ = trained
    result = evaluate(str(run_dir))
    text = SHAKESPEARE.read_text()
    val_chars = len(text) - int(len(text) * 0.9)
    assert result["tokens"] == val_chars - 1 and result["step"] == 30
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))  # one byte per token
    val_loss = [r for r in read_metrics(run_dir) if "val_loss" in r][-1]["val_loss"]
    assert abs(result["loss"] - val_loss) < 0.15  # the random-window estimate is close to the exact value

    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.")
    exact = evaluate(str(run_dir), step=20, text_file=str(short))
    rt = build(cfg, ByteTokenizer())
    params = final_params(run_dir, cfg, 20)
    ids = ByteTokenizer().encode(short.read_text())
    windows = [ids[i:i + 33] for i in range(0, len(ids) - 1, 32)]
    losses = np.concatenate([np.asarray(token_losses(params, rt.model, {"inputs": w[None, :-1], "targets": w[None, 1:]}))[0]
                             for w in windows])
    assert exact["tokens"] == len(ids) - 1 and exact["step"] == 20
    assert exact["loss"] == pytest.approx(losses.mean(), rel=1e-5)


def test_keep_best_keeps_the_lowest_validation_loss_and_step_best_picks_it(tiny_config, monkeypatch, capsys):
    """checkpoint.keep_best: each validation that beats the best so far is checkpointed, and that step is kept
    beside the newest; --step best evaluates it and says which it is. (Validation losses scripted.)"""
    import lm.training.loop
    from lm.cli import main
    from lm.training.restore import open_run

    scripted = iter([3.0, 2.0, 2.5, 2.8])  # steps 2, 4, 6, 8
    monkeypatch.setattr(lm.training.loop, "validation_loss", lambda *args: (next(scripted), {}))
    cfg = tiny_config("train.steps=8", "eval.every=2", "checkpoint.every=100", "checkpoint.keep=1",
                      "checkpoint.keep_best=true", "log.sample_tokens=0")
    train(cfg)
    ckpts = Checkpoints(pathlib.Path(cfg.run_dir) / "checkpoints", read_only=True)
    assert ckpts.steps() == [4, 8] and ckpts.best() == (4, 2.0) and ckpts.latest() == 8  # 2: saved, then dropped
    capsys.readouterr()
    main(["eval", "--run_dir", cfg.run_dir, "--step", "best", "--json"])
    out = capsys.readouterr()
    assert out.err == "best checkpoint: step 4 (val_loss 2.0000)\n" and json.loads(out.out)["step"] == 4
    opened = open_run(cfg.run_dir, "best")  # the Python API's step="best"
    opened.checkpoints.close()
    assert opened.step == 4


def test_step_best_needs_a_validated_checkpoint(tmp_path, tiny_config, capsys):
    from lm.cli import main
    from lm.rundir import save_config
    from lm.training.step import TrainState

    run, hf = tmp_path / "run", tmp_path / "hf"
    run.mkdir()
    save_config(tiny_config(), run)
    ckpts = Checkpoints(run / "checkpoints", async_save=False)
    ckpts.save(TrainState(step=np.int32(1), params={"w": np.ones(2)}, opt_state={"m": np.ones(2)}), {"step": 1})
    ckpts.close()
    for args in (["eval", "--run_dir", str(run)], ["generate", "--run_dir", str(run), "--prompt", "a"],
                 ["hf", "export", str(run), str(hf)]):
        with pytest.raises(SystemExit) as exit_info:
            main(args + ["--step", "best"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        assert err.startswith("error: ") and "keeps no checkpoint saved at a validation step" in err
    assert not (tmp_path / "hf").exists()


def test_new_model_flags_train_from_scratch(tiny_config):
    """Qwen3's per-head q/k RMSNorm and explicit head width (4 x 24 != d_model 64) with GQA, and Gemma 3's
    (1 + w) RMSNorm, sandwich norms, GeGLU, scaled embeddings and a window of 8 (of 32) on every other
    layer with its own RoPE base, in one tiny model trained from scratch."""
    cfg = tiny_config("model.position=rope", "model.use_bias=false", "model.qk_norm=head", "model.d_head=24",
                      "model.n_kv_heads=2", "model.norm=rmsnorm_plus_one", "model.norm_placement=sandwich",
                      "model.mlp=geglu", "model.scale_embeddings=true", "model.sliding_window=8",
                      "model.sliding_layers=1,0", "model.rope_local_theta=1000", "train.steps=12", "eval.every=0",
                      "checkpoint.every=12", "log.every=4")
    losses = [r["loss"] for r in train(cfg) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5  # from ~ln(259) = 5.56


@pytest.mark.parametrize("n, seq_len, stride", [(100, 16, None), (100, 16, 4), (17, 16, None), (5, 16, 3), (64, 8, 8)])
def test_eval_windows_weight_each_target_once(n, seq_len, stride):
    tokens = np.arange(n)
    counts = np.zeros(n, int)
    for w in eval_windows(tokens, seq_len, stride):
        assert w["inputs"].shape == (seq_len,)
        np.add.at(counts, w["targets"][w["weights"] == 1], 1)
        valid = w["weights"] == 1
        np.testing.assert_array_equal(w["targets"][valid], w["inputs"][valid] + 1)
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_cli_end_to_end(tmp_path, shakespeare):
    run_dir = tmp_path / "cli"
    base = [sys.executable, "train.py", "--config", "configs/tiny.yaml", f"data.text_file={shakespeare}",
            f"run_dir={run_dir}", "train.steps=6", "checkpoint.every=3", "log.every=3", "eval.every=0"]
    # With the user's environment: JAX's compilation cache lands in ~/.cache/lm/jax.
    home = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")} | {"HOME": str(tmp_path)}
    done = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300, env=home)
    assert done.returncode == 0, done.stderr
    assert "step      6/6" in done.stdout
    assert any((tmp_path / ".cache" / "lm" / "jax").iterdir())
    devices = auto_count(load_config(ROOT / "configs" / "tiny.yaml"), usable_cores())  # one per core the batch allows
    assert f"{devices} x cpu (cpu) | mesh data={devices} fsdp=1 tensor=1 |" in done.stdout.splitlines()[0]
    out = subprocess.run([sys.executable, "eval.py", "--run_dir", str(run_dir), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"loss", "perplexity", "bits_per_byte", "tokens", "step"}
    bad = subprocess.run(base + ["model.n_heds=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: unknown config key 'model.n_heds'. Did you mean 'model.n_heads'?"]
