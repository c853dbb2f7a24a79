"""What a new user meets on a first try of every command (issue 34), each case checked where it is cheapest:
in this process through lm.cli.main, a subprocess only where the process itself is the point.

Refusals that must leave files untouched are in tests/test_bad_input.py's catalogue; Ctrl-C is in
tests/test_interrupt.py.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import pytest

from lm import cli, storage
from lm.config import all_keys, load_config
from lm.data.tokenizers import BOS_ID, ByteTokenizer
from lm.errors import LMError
from lm.tools.generate import encode_prompt
from lm.training import loop
from lm.training.checkpoint import Checkpoints
from lm.training.guards import NonfiniteWatch
from tests.conftest import ROOT, SHAKESPEARE

TINY = str(ROOT / "configs" / "tiny.yaml")
TRAINED = ["train.steps=4", "checkpoint.every=2", "eval.every=0", "log.every=2", "checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """A 4-step tiny run (checkpoints at 2 and 4): copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("first_use") / "run"
    loop.train(load_config(TINY, [f"run_dir={run_dir}", *TRAINED]))
    return run_dir


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """lm.cli.main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -- 2. key=value overrides anywhere among the flags

@pytest.mark.parametrize("argv, handler, overrides", [
    (["train", "--config", TINY, "train.steps=1", "--debug", "run_dir=R"], "train_command", ["train.steps=1", "run_dir=R"]),
    (["train", "train.steps=1", "--config", TINY, "run_dir=R"], "train_command", ["train.steps=1", "run_dir=R"]),  # train.py
    (["bench", "--config", TINY, "train.steps=2", "--steps", "3", "train.seq_len=16"], "bench_command",
     ["train.steps=2", "train.seq_len=16"]),
    (["hf", "import", "HF", "RUN", "--tokenizer", "byte", "train.seq_len=64"], "hf_import_command", ["train.seq_len=64"]),
    (["data", "prepare", "--config", TINY, "a=1", "--debug", "b=2"], "data_prepare_command", ["a=1", "b=2"]),
    (["aot", "--config", TINY, "a=1", "--topology", "v5e:2x4", "b=2"], "aot_command", ["a=1", "b=2"]),
])
def test_overrides_are_taken_anywhere_among_the_flags(monkeypatch, argv, handler, overrides):
    seen = []
    monkeypatch.setattr(cli.commands, handler, lambda args: seen.append(args.overrides))
    cli.main(argv)
    assert seen == [overrides]


def test_commands_without_overrides_say_so(capsys):
    code, _, err = run_cli(["eval", "--run_dir", "R", "data.text_file=x"], capsys)
    assert code == 2 and "takes no key=value config overrides" in err


# -- 4, 13. keys that take 0; validation gaps

def test_zero_values_mean_what_docs_config_md_says(tmp_path, monkeypatch, capsys):
    """checkpoint.every=0: one checkpoint, at the end; log.sample_tokens=0: validation without a sample.
    The same run: the first step's rate excludes compiling (15) and the profiler says where it wrote (15)."""
    real_build = loop.build

    def slow_compile(cfg, tokenizer):  # the first call of the step takes 3 s longer, as a slow compile would
        rt = real_build(cfg, tokenizer)
        calls = []

        def step(state, batch):
            if not calls:
                time.sleep(3)
            calls.append(1)
            return rt.train_step(state, batch)
        return dataclasses.replace(rt, train_step=step)

    monkeypatch.setattr(loop, "build", slow_compile)
    run_dir = tmp_path / "run"
    records = loop.train(load_config(TINY, [f"run_dir={run_dir}", "train.steps=3", "checkpoint.every=0",
                                            "eval.every=2", "log.every=1", "log.sample_tokens=0",
                                            "profile.start_step=1", "profile.steps=1"]))
    assert Checkpoints(run_dir / "checkpoints", read_only=True).steps() == [3]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 3]  # every 2 steps and at the end
    first = next(r for r in records if "loss" in r)
    assert first["step"] == 1 and 256 / first["tokens_per_sec"] < 3  # 8 x 32 tokens in under the 3 s "compile"
    out = capsys.readouterr().out
    assert re.search(rf"profile: steps 2-2 traced into {re.escape(str(run_dir / 'profile'))} .*"
                     r"perfetto_trace\.json\.gz at ui\.perfetto\.dev", out)
    with pytest.raises(LMError, match="'eval.batches' must be positive, got 0; to turn in-training validation "
                                      "off, set eval.every=0"):
        load_config(TINY, ["eval.batches=0"])


def test_keep_best_needs_a_validation():
    with pytest.raises(LMError, match="checkpoint.keep_best=true keeps the checkpoint with the lowest validation "
                                      "loss, but eval.every=0 runs no validation"):
        load_config(TINY, ["checkpoint.keep_best=true", "eval.every=0"])
    assert load_config(TINY, ["checkpoint.keep_best=true", "eval.every=5"]).checkpoint.keep_best


@pytest.mark.parametrize("override, message", [
    ("optim.b2=1.5", r"optim.b2=1.5 must be in \[0, 1\)"),
    ("optim.b1=-0.1", r"optim.b1=-0.1 must be in \[0, 1\)"),
    ("data.sha256=abc123", "is not a SHA-256 digest"),
    ("train.max_consecutive_skips=-1", "must not be negative"),
    ("data.mixture.grimm=1", r"names the entry 'grimm' of data.mixture but none of its keys; use "
                             r"data.mixture.grimm.KEY=VALUE \(KEY: name, weight,"),
    ("data.mixture.grimm.wieght=1", "Did you mean 'data.mixture.grimm.weight'?"),
])
def test_values_and_hints_a_user_gets_wrong(override, message):
    with pytest.raises(LMError, match=message):
        load_config(ROOT / "configs" / "mixture_example.yaml", [override])
    assert load_config(TINY, ["data.sha256=" + "aB" * 32, "checkpoint.every=0", "log.every=0"])


def test_config_files_that_are_no_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n n_heads: 2\n")
    with pytest.raises(LMError, match="is not valid YAML at line 3, column 2"):
        load_config(bad)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(LMError, match=f"'{run}' is a directory; pass a YAML file"):
        load_config(run)
    (run / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(LMError, match=f"is a directory; did you mean {run / 'config.yaml'}"):
        load_config(run)


def test_every_config_key_is_in_the_reference():
    reference = (ROOT / "docs" / "config.md").read_text()
    missing = [key for key in all_keys() if f"`{key}`" not in reference]
    assert not missing, f"docs/config.md lacks {missing}"


# -- 5, 14. lm bench and lm info

def test_bench_runs_any_config_and_names_its_data(capsys):
    small = ["model.n_layers=1", "model.d_model=32", "train.batch_size=2", "--steps", "1", "--warmup", "0"]
    code, out, err = run_cli(["bench", "--config", str(ROOT / "configs" / "grimm_spm.yaml"), *small], capsys)
    assert code == 0, err
    assert "random token ids below 2048: data.source=tfds packs documents" in out
    assert "attention 64 queries at a time" in out  # 128 positions: blocked by 64 (32: not; tests/test_observe.py)
    code, out, err = run_cli(["bench", "--config", TINY, "data.text_file=tinyshakespaere.txt"], capsys)
    assert code == 2 and "data.text_file 'tinyshakespaere.txt' does not exist" in err


# -- 6. the README's Python API in one process, quietly

def test_python_api_restores_in_one_process_without_warnings(trained, tmp_path):
    sample = tmp_path / "sample.txt"
    sample.write_text(SHAKESPEARE.read_text()[:1000])
    code = f"""
import lm
import lm.parallel.cpu as cpu
cpu.usable_cores = lambda *a: 2  # split as on a 2-core machine, whatever this one has
lm.evaluate({str(trained)!r}, text_file={str(sample)!r})
assert lm.generate({str(trained)!r}, "ROMEO:", 4)
cfg = lm.load_config({TINY!r}, ["run_dir={tmp_path / 'new'}", "train.steps=2", "eval.every=0"])
lm.train(cfg)
import jax
assert jax.device_count() == 2
print(repr(lm.generate(cfg.run_dir, "", 4)))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr and "absl" not in result.stderr, result.stderr


# -- 8. train.steps at, below and above the saved step

def test_resuming_at_or_past_train_steps(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = (run / "config.yaml").read_bytes()
    assert loop.train(load_config(TINY, [f"run_dir={run}", *TRAINED])) == []
    assert f"run_dir '{run}' is already at step 4 = train.steps: nothing to train" in capsys.readouterr().out
    assert (run / "config.yaml").read_bytes() == config
    with pytest.raises(LMError, match="is at step 4, past train.steps=3; raise train.steps above 4"):
        loop.train(load_config(TINY, [f"run_dir={run}", *TRAINED, "train.steps=3"]))
    loop.train(load_config(TINY, [f"run_dir={run}", *TRAINED, "train.steps=5"]))
    assert ("note: the learning rate of step 5 is 0.003 under this config, 0.0003 under the run's config.yaml "
            "(train.steps 4 -> 5; optim.decay_steps=0 follows train.steps: set optim.decay_steps=4 to keep the "
            "run's schedule).") in capsys.readouterr().out


def test_a_mixture_resume_is_refused_before_any_dataset_is_built(trained, tmp_path):
    cfg = load_config(TINY, [f"run_dir={trained}", *TRAINED, "data.source=mixture", f"data.tfds_data_dir={tmp_path}",
                             "data.mixture=[{name: grimm, files: 'builtin:grimm_tales', weight: 1}]"])
    with pytest.raises(LMError, match="holds a run on the data.mixture sources none"):
        loop.train(cfg)
    assert not list(tmp_path.iterdir())


# -- 9, 15. Hugging Face import and export, file modes

def test_hf_export_writes_the_tokenizer_and_import_names_the_eval_that_works(trained, tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer

    with monkeypatch.context() as without:  # no `tokenizers`: one line, and no model a retry would refuse
        without.setitem(sys.modules, "tokenizers", None)
        code, out, err = run_cli(["hf", "export", str(trained), str(tmp_path / "hf")], capsys)
    assert code == 2 and err.startswith("error: exporting a byte-level run's tokenizer needs the 'tokenizers'"), err
    assert not any((tmp_path / "hf" / name).exists() for name in ("config.json", "model.safetensors"))
    code, out, err = run_cli(["hf", "export", str(trained), str(tmp_path / "hf")], capsys)
    assert code == 0, err
    assert "(config.json, model.safetensors, tokenizer.json, tokenizer_config.json)" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    text = "ROMEO: héllo \n\t日本 <s>"
    exported = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert exported.encode(text, add_special_tokens=False).ids == ByteTokenizer().encode(text).tolist()
    assert exported.decode(ByteTokenizer().encode(text).tolist()) == text

    mode = storage.new_file_mode()
    for path in [trained / "config.yaml", trained / "tokenizer.json", trained / "metrics.jsonl",
                 *(tmp_path / "hf").iterdir()]:
        assert path.stat().st_mode & 0o777 == mode, path

    imported = tmp_path / "imported"
    code, out, err = run_cli(["hf", "import", str(tmp_path / "hf"), str(imported), "train.seq_len=32"], capsys)
    assert code == 0, err
    assert out.strip().endswith(f"evaluate with python eval.py --run_dir {imported} --text_file FILE")
    code, out, err = run_cli(["eval", "--run_dir", str(imported)], capsys)
    assert code == 2 and "pass --text_file FILE to score a UTF-8 text file" in err
    sample = tmp_path / "sample.txt"
    sample.write_text(SHAKESPEARE.read_text()[:2000])
    code, out, err = run_cli(["eval", "--run_dir", str(imported), "--text_file", str(sample), "--json"], capsys)
    assert code == 0 and json.loads(out)["tokens"] == 1999, err


# -- 10. eval flags that would change nothing

def test_eval_refuses_flags_that_do_not_apply(trained, tmp_path, capsys):
    code, _, err = run_cli(["eval", "--run_dir", str(trained), "--split", "test"], capsys)
    assert code == 2 and "--split picks a split of a data.source=tfds or mixture run, but this run reads " \
                          "data.source=text_file" in err
    packed = tmp_path / "packed"
    shutil.copytree(trained, packed)
    (packed / "config.yaml").write_text((packed / "config.yaml").read_text().replace("source: text_file",
                                                                                      "source: tfds"))
    code, _, err = run_cli(["eval", "--run_dir", str(packed), "--stride", "8"], capsys)
    assert code == 2 and "--stride slides over one text, but this run's data.source=tfds" in err


# -- 12. skipping non-finite steps gives up after a bounded run of them

def test_a_run_of_skipped_steps_stops_the_run(tmp_path):
    blow_up = ["model.n_layers=1", "model.d_model=32", "train.seq_len=16", "train.batch_size=4", "optim.lr=1e30",
               "optim.grad_clip=0", "train.steps=8", "checkpoint.every=1", "log.every=1", "eval.every=0",
               "train.skip_nonfinite=true", "train.max_consecutive_skips=2", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(LMError, match=r"training diverged: steps (\d+)-(\d+) all had NaN or Inf loss or gradients "
                                      r"and were skipped \(train.max_consecutive_skips=2\)") as caught:
        loop.train(load_config(TINY, blow_up))
    last = int(re.search(r"steps \d+-(\d+)", str(caught.value)).group(1))
    assert Checkpoints(tmp_path / "run" / "checkpoints", read_only=True).latest() < last
    # Resumed, the streak its newest checkpoint was in still counts: the run stops at the same step.
    with pytest.raises(LMError, match=r"training diverged: steps (\d+)-(\d+)") as again:
        loop.train(load_config(TINY, blow_up))
    assert again.value.args == caught.value.args

    watch = NonfiniteWatch(skip=True, max_consecutive=3)
    for step, flag in enumerate([1, 1, 0, 1, 1], 1):
        watch.add(step, jax.numpy.int32(flag))
    watch.check(5)
    assert (watch.skipped, watch.consecutive) == (4, 2)


# -- 15. lm data prepare of a text file; TFDS's notices; generation from BOS

def test_data_prepare_builds_only_what_the_config_reads(tmp_path, capsys):
    code, out, _ = run_cli(["data", "prepare", "--config", TINY], capsys)
    assert code == 0 and out.startswith("nothing to build: data.source=text_file reads ") and \
        not (tmp_path / "tfds").exists()
    text = tmp_path / "docs.txt"
    text.write_text("first document\n\nsecond one\n\nthird\n")
    code, out, err = run_cli(["data", "prepare", "--config", TINY, "data.source=tfds", f"data.text_file={text}",
                              "data.doc_separator=\\n\\n", f"data.tfds_data_dir={tmp_path / 'tfds'}"], capsys)
    assert code == 0 and "lm_text [train]: 2 documents" in out
    assert "Downloading and preparing" not in out + err and "downloaded and prepared" not in out + err


def test_prompts_start_where_training_did():
    tokenizer = ByteTokenizer()
    assert encode_prompt(tokenizer, 259, "hi").tolist() == [107, 108]
    assert encode_prompt(tokenizer, 259, "hi", packed=True).tolist() == [BOS_ID, 107, 108]
    assert encode_prompt(tokenizer, 259, "").tolist() == [BOS_ID]  # an empty prompt: unconditional

