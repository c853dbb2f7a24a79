"""The bad-input catalogue: every mistake ends with one `error: ...` line, exit code 2,
no traceback, and every file that existed before is byte-for-byte unchanged.

The CLIs run as subprocesses. Config mistakes fail before JAX is imported; the rest share
one tiny trained run (copied when a case needs to damage it).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest

from lm.config import load_config
from lm.training.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINED_OVERRIDES = ["train.steps=4", "checkpoint.every=2", "eval.every=0", "log.every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request) -> pathlib.Path:
    """A 4-step tiny run with checkpoints at steps 2 and 4."""
    from tests.conftest import SHAKESPEARE

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    text = SHAKESPEARE
    train(load_config(ROOT / "configs" / "tiny.yaml", [f"data.text_file={text}", f"run_dir={run_dir}",
                                                       *TRAINED_OVERRIDES]))
    return run_dir


@dataclass
class Ctx:
    tmp: pathlib.Path
    trained: pathlib.Path
    text: pathlib.Path

    def train(self, *overrides: str, run_dir: pathlib.Path | None = None, config: str = "configs/tiny.yaml"):
        return ["train.py", "--config", config, f"data.text_file={self.text}",
                f"run_dir={run_dir or self.tmp / 'new_run'}", *TRAINED_OVERRIDES, *overrides]

    def copy(self) -> pathlib.Path:
        target = self.tmp / "run"
        shutil.copytree(self.trained, target)
        return target

    def file(self, name: str, data: bytes | str) -> pathlib.Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def data(self, name: str, content: bytes | str) -> str:
        return f"data.text_file={self.file(name, content)}"

    def copy_with(self, relative: str, edit: Callable[[str], str]) -> pathlib.Path:
        """A copy of the trained run with one of its text files edited."""
        run = self.copy()
        path = run / relative
        path.write_text(edit(path.read_text()))
        return run


def _largest_params_file(run: pathlib.Path) -> pathlib.Path:
    return max((p for p in (run / "checkpoints" / "4" / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def truncated(ctx: Ctx) -> pathlib.Path:
    run = ctx.copy()
    path = _largest_params_file(run)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return run


def tampered(ctx: Ctx) -> pathlib.Path:
    run = ctx.copy()
    path = _largest_params_file(run)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return run


def checkpoints_only(ctx: Ctx) -> pathlib.Path:
    """A run_dir holding only the trained run's checkpoints (no config.yaml to compare against)."""
    shutil.copytree(ctx.trained / "checkpoints", ctx.tmp / "ckpts_only" / "checkpoints")
    return ctx.tmp / "ckpts_only"


def without_checkpoints(ctx: Ctx) -> pathlib.Path:
    run = ctx.tmp / "untrained"
    run.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copy(ctx.trained / name, run / name)
    return run


def eval_args(run, *extra) -> list[str]:
    return ["eval.py", "--run_dir", str(run), *extra]


def generate_args(run, *extra) -> list[str]:
    return ["-m", "lm.generate", "--run_dir", str(run), *extra]


PWNED = "pwned-by-yaml"
LLAMA_YARN_CONFIG = ('{"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4, '
                     '"num_hidden_layers": 1, "vocab_size": 300, "intermediate_size": 64, '
                     '"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}')
GPT2_CONFIG = ('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2, "n_embd": 32, '
               '"n_head": 4, "n_positions": 64, "vocab_size": 300}')


def hf_dir(ctx: Ctx, config: str, weights: dict[str, bytes]) -> pathlib.Path:
    """A Hugging Face-style model directory with this config.json and weight files."""
    directory = ctx.tmp / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(config)
    for name, data in weights.items():
        (directory / name).write_bytes(data)
    return directory


def evil_pickle(ctx: Ctx) -> bytes:
    """A pickle that would create the PWNED file if anything ever unpickled it."""
    return (b"cos\nsystem\n(S'touch " + str(ctx.tmp / PWNED).encode() + b"'\ntR.")


def hf_import(directory: pathlib.Path, ctx: Ctx) -> list[str]:
    return ["-m", "lm.hf", "import", str(directory), str(ctx.tmp / "imported"), "--tokenizer", "byte"]

def mixture(ctx: Ctx, entries: str, run_dir: pathlib.Path | None = None) -> list[str]:
    """train.py on data.source=mixture with these data.mixture entries (a YAML list)."""
    return ctx.train("data.source=mixture", f"data.tfds_data_dir={ctx.tmp / 'tfds'}", f"data.mixture={entries}",
                     run_dir=run_dir)


GRIMM_ENTRY = "{name: grimm, files: 'builtin:grimm_tales', weight: 1}"

META = "checkpoints/4/meta/metadata"
# id -> (function of the case context returning argv, a phrase the message must contain)
CASES: dict[str, tuple[Callable[[Ctx], list[str]], str]] = {
    # config keys and values (no JAX import)
    "misspelt_key": (lambda c: c.train("model.d_modle=64"), "Did you mean 'model.d_model'?"),
    "unknown_section": (lambda c: c.train("trainer.steps=5"), "unknown config key 'trainer.steps'"),
    "str_for_int": (lambda c: c.train("train.steps=many"), "'train.steps' must be an int"),
    "float_for_int": (lambda c: c.train("train.batch_size=2.5"), "'train.batch_size' must be an int"),
    "str_for_bool": (lambda c: c.train("model.tie_embeddings=maybe"), "must be a bool"),
    "str_for_skip_nonfinite": (lambda c: c.train("train.skip_nonfinite=sometimes"), "must be a bool"),
    "negative_steps": (lambda c: c.train("train.steps=-1"), "must be positive"),
    "zero_grace": (lambda c: c.train("train.preemption_grace_s=0"), "train.preemption_grace_s=0.0 must be positive"),
    "heads_do_not_divide_width": (lambda c: c.train("model.n_heads=3"), "not divisible by model.n_heads=3"),
    "kv_heads_do_not_divide_heads": (lambda c: c.train("model.n_kv_heads=3"), "n_kv_heads"),
    "seq_len_above_max": (lambda c: c.train("train.seq_len=128"), "above model.max_seq_len=64"),
    "batch_not_divisible_by_accum": (lambda c: c.train("train.grad_accum_steps=3"), "grad_accum_steps=3"),
    "unknown_choice": (lambda c: c.train("model.norm=batchnorm"), "choose one of layernorm, rmsnorm"),
    "dropout_out_of_range": (lambda c: c.train("model.dropout=1.5"), "model.dropout=1.5 must be in [0, 1)"),
    "layer_flags_not_flags": (lambda c: c.train("model.sliding_layers=1,2"), "must be comma-separated 0/1 flags"),
    "scan_of_differing_layers": (lambda c: c.train("model.position=rope", "model.rope_layers=1,0",
                                                   "model.scan_layers=true"), "stacks identical blocks"),
    "override_without_value": (lambda c: c.train("train.steps"), "is not of the form key=value"),
    # data.mixture entries (no JAX import), a missing file, a resume on other sources
    "mixture_without_entries": (lambda c: c.train("data.source=mixture"), "data.source=mixture needs data.mixture"),
    "mixture_weight_not_positive": (lambda c: mixture(c, "[{name: a, files: x.txt, weight: 0}]"),
                                    "data.mixture[0] (a) has weight 0.0; every weight must be a positive number"),
    "mixture_weight_not_a_number": (lambda c: mixture(c, "[{name: a, files: x.txt, weight: lots}]"),
                                    "'data.mixture[0].weight' must be a float, got 'lots'"),
    "mixture_duplicate_names": (lambda c: mixture(c, f"[{GRIMM_ENTRY}, {GRIMM_ENTRY}]"), "names 'grimm' twice"),
    "mixture_empty_name": (lambda c: mixture(c, "[{name: '', files: x.txt, weight: 1}]"),
                           "data.mixture[0] has no name"),
    "mixture_entry_without_source": (lambda c: mixture(c, "[{name: a, weight: 1}]"), "(a) names no data"),
    "mixture_entry_with_two_sources": (lambda c: mixture(c, "[{name: a, files: x.txt, tfds_name: lm1b, weight: 1}]"),
                                       "sets both files and tfds_name"),
    "mixture_misspelt_entry_key": (lambda c: mixture(c, "[{name: a, files: x.txt, wieght: 1}]"),
                                   "Did you mean 'data.mixture[0].weight'?"),
    "mixture_missing_file": (lambda c: mixture(c, f"[{GRIMM_ENTRY}, {{name: web, files: {c.tmp / 'no.txt'}, weight: 1}}]"),
                             "data.mixture source 'web': data.mixture[1].files entry"),
    "resume_on_a_mixture": (lambda c: mixture(c, f"[{GRIMM_ENTRY}]", run_dir=c.copy()),
                            "holds a run on the data.mixture sources none (data.source=text_file) but this config "
                            "names grimm"),
    "splash_tile_off_the_lanes": (lambda c: c.train("model.splash_block_q=100"), "must be a positive multiple of 128"),
    "splash_seq_len_off_the_tiles": (lambda c: c.train("model.attention=splash"),
                                     "needs train.seq_len a multiple of 128"),
    "loss_chunk_tokens_below_auto": (lambda c: c.train("train.loss_chunk_tokens=-2"), "must be -1 (auto), 0 (whole)"),
    # config files
    "missing_config_file": (lambda c: c.train(config=str(c.tmp / "nope.yaml")), "does not exist"),
    "malformed_yaml": (lambda c: c.train(config=str(c.file("bad.yaml", "model: [1, 2"))), "is not valid YAML"),
    "yaml_python_tag": (lambda c: c.train(config=str(c.file(
        "evil.yaml", f"model: !!python/object/apply:os.system ['touch {c.tmp / PWNED}']\n"))), "is not valid YAML"),
    "yaml_not_a_mapping": (lambda c: c.train(config=str(c.file("list.yaml", "- a\n- b\n"))), "must hold a mapping"),
    "config_not_utf8": (lambda c: c.train(config=str(c.file("latin1.yaml", b"model:\n  norm: \xe9\n"))),
                        "is not valid YAML"),
    "misspelt_key_in_file": (lambda c: c.train(config=str(c.file("typo.yaml", "train:\n  stesp: 3\n"))),
                             "Did you mean 'train.steps'?"),
    "splash_off_tpu": (lambda c: c.train("model.attention=splash", "model.max_seq_len=128", "train.seq_len=128"),
                       "model.attention=splash is a TPU kernel but this is cpu"),
    # data files
    "missing_data_file": (lambda c: c.train(f"data.text_file={c.tmp / 'none.txt'}"), "does not exist"),
    "data_file_is_a_directory": (lambda c: c.train(f"data.text_file={c.tmp}"), "is not a file"),
    "empty_data_file": (lambda c: c.train(c.data("empty.txt", "  \n")), "is empty"),
    "binary_data_file": (lambda c: c.train(c.data("b.bin", bytes(range(256)) * 8)),
                         "looks binary"),
    "non_utf8_data_file": (lambda c: c.train(c.data("l.txt", b"caf" + b"\xe9" * 99)),
                           "is not UTF-8"),
    "data_shorter_than_a_window": (lambda c: c.train(c.data("s.txt", "to be or not to be")),
                                   "is too short"),
    "no_data_file": (lambda c: c.train("data.text_file="), "no training data"),
    # run directories
    "run_dir_is_a_file": (lambda c: c.train(run_dir=c.file("run_file", "x")), "is a file"),
    "run_dir_unwritable": (lambda c: c.train(run_dir=c.file("blocker", "x") / "run"), "cannot create run_dir"),
    "resume_with_other_model": (lambda c: c.train("model.d_model=32", run_dir=c.copy()),
                                "holds a run with model.d_model=64"),
    # checkpoints
    "checkpoint_of_other_shape": (lambda c: c.train("model.d_model=32", run_dir=checkpoints_only(c)),
                                  "different model (d_model 64 there, 32 here)"),
    # (train.steps=6: a run resumed at its train.steps has nothing to train, and says so)
    "checkpoint_of_other_tokenizer": (lambda c: c.train("train.steps=6", run_dir=c.copy_with(
        META, lambda m: m.replace('"vocab_size": 259}', '"vocab_size": 32000}', 1))), "different tokenizer"),
    "truncated_checkpoint_train": (lambda c: c.train("train.steps=6", run_dir=truncated(c)), "is damaged"),
    "tampered_checkpoint_train": (lambda c: c.train("train.steps=6", run_dir=tampered(c)), "do not match the checksum"),
    "truncated_checkpoint_eval": (lambda c: eval_args(truncated(c)), "is damaged"),
    "tampered_checkpoint_eval": (lambda c: eval_args(tampered(c)), "do not match the checksum"),
    "damaged_checkpoint_meta": (lambda c: eval_args(c.copy_with(META, lambda m: m[: len(m) // 2])), "is damaged"),
    # eval.py
    "eval_missing_run_dir": (lambda c: eval_args(c.tmp / "nowhere"), "is not a run directory"),
    "eval_run_dir_is_a_file": (lambda c: eval_args(c.file("f", "x")), "is not a run directory"),
    "eval_without_checkpoints": (lambda c: eval_args(without_checkpoints(c)), "has no checkpoints yet"),
    "eval_step_that_does_not_exist": (lambda c: eval_args(c.trained, "--step", "3"),
                                      "no checkpoint at step 3"),
    "eval_stride_out_of_range": (lambda c: eval_args(c.trained, "--stride", "0"), "--stride=0 must be between"),
    "eval_missing_text_file": (lambda c: eval_args(c.trained, "--text_file", str(c.tmp / "none.txt")),
                               "does not exist"),
    "eval_binary_text_file": (lambda c: eval_args(c.trained, "--text_file", str(c.file("z.bin", b"\0" * 64))),
                              "looks binary"),
    "eval_broken_tokenizer_file": (lambda c: eval_args(c.copy_with("tokenizer.json", lambda t: "{not json")),
                                   "not a valid tokenizer file"),
    "eval_config_of_other_shape": (lambda c: eval_args(c.copy_with(
        "config.yaml", lambda t: t.replace("d_model: 64", "d_model: 32"))), "different model (d_model 64 there, 32 here)"),
    # lm generate
    "generate_empty_prompt_file": (lambda c: generate_args(c.trained, "--prompt_file", str(c.file(
        "p.txt", " \n"))), "is empty"),
    "generate_prompt_not_utf8": (lambda c: generate_args(c.trained, "--prompt", "caf\udce9"),
                                 "is not valid UTF-8 text"),
    "generate_num_samples_zero": (lambda c: generate_args(c.trained, "--prompt", "ROMEO:", "--num_samples", "0"),
                                  "--num_samples=0 must be at least 1"),
    "generate_without_checkpoints": (lambda c: generate_args(without_checkpoints(c), "--prompt", "ROMEO:"),
                                     "has no checkpoints yet"),
    # Hugging Face directories
    "hf_unsupported_architecture": (lambda c: hf_import(hf_dir(c, '{"architectures": ["MambaForCausalLM"]}', {
        "model.safetensors": b"x"}), c), "lm imports only GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM"),
    "hf_fused_phi3": (lambda c: hf_import(hf_dir(c, '{"architectures": ["Phi3ForCausalLM"]}', {
        "model.safetensors": b"x"}), c), "Phi-3 fuses q, k, v into qkv_proj"),
    "hf_yarn_rope": (lambda c: hf_import(hf_dir(c, LLAMA_YARN_CONFIG, {"model.safetensors": b"x"}), c),
                     "RoPE scaling 'yarn' (lm implements default, linear and llama3)"),
    "hf_only_pickle_weights": (lambda c: hf_import(hf_dir(c, GPT2_CONFIG, {
        "pytorch_model.bin": evil_pickle(c)}), c), "pickle files, which lm never loads"),
    "hf_missing_config": (lambda c: hf_import(c.tmp, c), "config.json' is missing"),
    "eval_config_with_python_tag": (lambda c: eval_args(c.copy_with(
        "config.yaml", lambda t: t + "seed: !!python/name:os.system\n")), "is not valid YAML"),
    # what a new user tried (issue 34)
    "adam_b2_of_one_or_more": (lambda c: c.train("optim.b2=1.5"), "optim.b2=1.5 must be in [0, 1)"),
    "eval_batches_zero": (lambda c: c.train("eval.every=2", "eval.batches=0"), "set eval.every=0"),
    "malformed_sha256": (lambda c: c.train("data.sha256=abc"), "is not a SHA-256 digest"),
    "yaml_error_line_and_column": (lambda c: c.train(config=str(c.file("indent.yaml", "model:\n  d_model: 64\n"
                                                                         " n_heads: 2\n"))), "at line 3, column 2"),
    "config_is_a_directory": (lambda c: c.train(config=str(c.tmp)), "is a directory"),
    "mixture_entry_without_key": (lambda c: c.train("data.mixture.grimm=1", config="configs/mixture_example.yaml"),
                                  "use data.mixture.grimm.KEY=VALUE"),
    "copied_run_config_names_the_original": (lambda c: ["train.py", "--config", str(c.copy() / "config.yaml")],
                                             "but names run_dir"),
    "train_steps_below_the_saved_step": (lambda c: c.train("train.steps=3", run_dir=c.copy()),
                                         "is at step 4, past train.steps=3"),
}


def _snapshot(*roots: pathlib.Path) -> dict[pathlib.Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, trained, shakespeare):
    make_argv, phrase = CASES[case]
    ctx = Ctx(tmp_path, trained, shakespeare)
    argv = make_argv(ctx)
    before = _snapshot(tmp_path, trained)
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert phrase in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    after = _snapshot(tmp_path, trained)
    assert {p: after.get(p) for p in before} == before, "a file that existed was changed or removed"
    assert not (tmp_path / PWNED).exists()


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--debug", "--config", "configs/tiny.yaml",
                             "model.d_modle=64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "LMError: unknown config key 'model.d_modle'" in result.stderr


def test_configs_are_read_with_safe_load_and_nothing_is_pickled():
    sources = [p.read_text() for p in (ROOT / "lm").rglob("*.py")]
    assert not any("import pickle" in s or "yaml.load(" in s or "yaml.unsafe_load" in s for s in sources)
