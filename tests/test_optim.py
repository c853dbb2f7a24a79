"""optim.name: each optimizer's parameter groups, decay mask, config errors, exact resume, schedule-free's evaluation."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import rundir
from lm.config import load_config, replace
from lm.data import make_data
from lm.data.tokenizers import ByteTokenizer
from lm.errors import LMError
from lm.model.transformer import Transformer
from lm.training.checkpoint import Checkpoints
from lm.training.loop import train, validation_loss
from lm.training.optim import decay_mask, hidden_matrices, make_optimizer, make_schedule
from lm.training.restore import restore_run
from lm.training.runtime import build
from lm.training.step import init_params
from tests.conftest import ROOT

OPTIMIZERS = ("adamw", "muon", "lion", "schedule_free_adamw")
SMALL = ("model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.tie_embeddings=false",
         "train.seq_len=16", "model.max_seq_len=16")


def _params(cfg):
    return init_params(Transformer(cfg.model), jax.random.key(0), cfg.train.seq_len)


def _axes(params) -> dict:
    """keystr(path) -> the parameter's Muon dimension numbers (None: AdamW's)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        hidden_matrices(params), is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))[0]
    return {jax.tree_util.keystr(path): axes for path, axes in leaves}


def _config(name: str, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, "model.vocab_size=259", f"optim.name={name}",
                                                        *overrides])


def test_muon_orthogonalises_each_hidden_matrix_and_leaves_the_rest_to_adamw():
    """A Muon update of a [D, N, H] or [N, H, D] kernel, per layer of scanned blocks, is one orthogonalised
    [inputs, outputs] matrix: it shares the gradient's singular vectors. The rest moves as AdamW moves it."""
    cfg = _config("muon", "model.scan_layers=true", "model.mlp=swiglu")
    params = _params(cfg)
    unscanned = jax.eval_shape(lambda: _params(replace(cfg, **{"model.scan_layers": False})))
    per_block = {path.split("]", 1)[1]: axes for path, axes in _axes(unscanned).items() if path.startswith("['block_")}
    scanned = {path.split("]", 1)[1]: axes for path, axes in _axes(params).items() if path.startswith("['blocks']")}
    assert per_block == scanned  # axes count from the end: the same matrices with or without a layer axis
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    tx, _ = make_optimizer(cfg.optim, 10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    adamw, _ = make_optimizer(replace(cfg, **{"optim.name": "adamw"}).optim, 10)
    adamw_updates, _ = jax.jit(adamw.update)(grads, adamw.init(params), params)

    paths = _axes(params)
    flat = lambda tree: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}  # noqa: E731
    got, grad, theirs = flat(updates), flat(grads), flat(adamw_updates)
    hidden = {p for p, axes in paths.items() if axes is not None}
    assert {p.split("'")[-4] for p in hidden} == {"query", "key", "value", "out", "gate", "up", "down"}
    assert not {p for p in paths if "embed" in p or "norm" in p or p.startswith("['head']")} & hidden
    for path in paths:
        if path not in hidden:
            np.testing.assert_allclose(got[path], theirs[path], rtol=1e-6, atol=1e-9)
            continue
        D, NH, F = cfg.model.d_model, cfg.model.n_heads * cfg.model.head_dim, cfg.model.ff_dim
        fan_in, fan_out = {"query": (D, NH), "key": (D, NH), "value": (D, NH), "out": (NH, D),
                           "gate": (D, F), "up": (D, F), "down": (F, D)}[path.split("'")[-4]]
        layers_update, layers_grad = (x.reshape(cfg.model.n_layers, fan_in, fan_out) for x in (got[path], grad[path]))
        for update_IxO, grad_IxO in zip(layers_update, layers_grad):
            u, _, vt = np.linalg.svd(np.asarray(grad_IxO), full_matrices=False)
            inner = u.T @ np.asarray(update_IxO) @ vt.T  # diagonal iff the update keeps the gradient's singular vectors
            off = inner - np.diag(np.diag(inner))
            assert np.abs(off).max() < 1e-3 * np.abs(np.diag(inner)).max(), path
            scale = make_schedule(cfg.optim, 10, cfg.optim.muon.lr)(0) * max(1.0, np.sqrt(fan_out / fan_in))
            singular = np.abs(np.diag(inner))  # Newton-Schulz leaves them near 1 (0.5-1.5), times the rate
            assert 0.5 * scale < np.median(singular) and singular.max() < 1.6 * scale, path


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_touches_exactly_the_decay_mask(name):
    """With zero gradients an update is the decoupled decay alone: on kernels (and embeddings when asked), never
    on norms or biases; for muon on the hidden matrices at optim.muon.weight_decay, on the rest at optim's."""
    extra = ("optim.muon.weight_decay=0.1",) if name == "muon" else ()
    cfg = _config(name, "optim.decay_embeddings=true", "optim.weight_decay=0.5", "model.use_bias=true", *extra)
    params = _params(cfg)
    tx, _ = make_optimizer(cfg.optim, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == decay_mask(params, decay_embeddings=True)
    assert sum(jax.tree.leaves(moved)) < len(jax.tree.leaves(moved))  # norms and biases stay


@pytest.mark.parametrize("override, words", [
    ("optim.name=sgd", ["optim.name", "muon", "schedule_free_adamw"]),
    ("optim.muon.lr=0.05", ["optim.muon.lr", "optim.name=adamw", "muon"]),
    ("optim.lion.b2=0.9", ["optim.lion.b2", "lion"]),
    ("optim.schedule_free_adamw.b1=0.95", ["optim.schedule_free_adamw.b1", "schedule_free_adamw"]),
    ("optim.muon.betta=0.9", ["optim.muon.betta", "optim.muon.beta"]),
])
def test_another_optimizers_keys_and_unknown_names_are_one_line_errors(override, words):
    with pytest.raises(LMError) as info:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words)


def test_adamw_keys_are_refused_under_lion_and_the_sections_round_trip(tmp_path):
    with pytest.raises(LMError, match="'optim.b2' is set to 0.99, but optim.name=lion ignores it"):
        load_config(ROOT / "configs" / "shakespeare_cpu.yaml", ["optim.name=lion"])
    with pytest.raises(LMError, match="optim.muon.ns_steps"):
        load_config(None, ["optim.name=muon", "optim.muon.ns_steps=0"])
    with pytest.raises(LMError, match="'optim.muon.lr' must be finite and not negative, got inf"):
        load_config(None, ["optim.name=muon", "optim.muon.lr=inf"])
    with pytest.raises(LMError, match=r"optim.schedule_free_adamw.b1' must be in \(0, 1\]"):
        load_config(None, ["optim.name=schedule_free_adamw", "optim.schedule_free_adamw.b1=0"])
    cfg = load_config(None, ["optim.name=muon", "optim.muon.lr=0.05", "optim.muon.nesterov=false"])
    rundir.save_config(cfg, tmp_path)
    assert rundir.read_config(tmp_path) == cfg
    with pytest.raises(LMError, match="optim.name='muon' but this config has 'adamw'"):
        rundir.check_resumable(cfg, load_config(None), tmp_path)


def _metrics(run_dir):
    timing = ("tokens_per_sec", "mfu", "eta_sec")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> (cfg, run_dir) of an uninterrupted 12-step tiny run with that optimizer (trained once)."""
    runs = {}

    def get(name: str):
        if name not in runs:
            run_dir = tmp_path_factory.mktemp(name) / "run"
            cfg = _config(name, f"run_dir={run_dir}", "train.steps=12", "checkpoint.every=6", "eval.every=6",
                          "log.every=1", "log.tensorboard=false")
            train(cfg)
            runs[name] = cfg, run_dir
        return runs[name]

    return get


@pytest.mark.parametrize("name", OPTIMIZERS[1:])  # adamw: tests/test_train.py
def test_every_optimizer_resumes_exactly(trained, tmp_path, name):
    """Killed after the step-6 checkpoint and run again, the run logs the same losses, gradient norms and
    validation losses, bit for bit, and ends on the same parameters and optimizer state."""
    cfg, run_dir = trained(name)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "12")
    train(replace(cfg, run_dir=str(copy)))
    original, resumed = _metrics(run_dir), _metrics(copy)
    assert [r for r in resumed if r["step"] > 6] == [r for r in original if r["step"] > 6]
    rt = build(cfg, ByteTokenizer())
    states = [Checkpoints(d / "checkpoints", read_only=True).restore_state(12, rt.restore_target)[0]
              for d in (run_dir, copy)]
    jax.tree.map(np.testing.assert_array_equal, *(jax.device_get((s.params, s.opt_state)) for s in states))


def test_schedule_free_is_validated_evaluated_and_exported_at_its_average(trained):
    """In-training validation and restore_run (eval.py, generate, hf export) use schedule-free's average x,
    not the trained iterate y."""
    cfg, run_dir = trained("schedule_free_adamw")
    rt = build(cfg, ByteTokenizer())
    state, _ = Checkpoints(run_dir / "checkpoints", read_only=True).restore_state(12, rt.restore_target)
    average = optax.contrib.schedule_free_eval_params(state.opt_state, state.params)
    restored = restore_run(run_dir).params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12), jax.device_get(restored),
                 jax.device_get(average))  # jitted there, not here
    data = make_data(rt.cfg, ByteTokenizer(), rt.host_rows)
    logged = [r["val_loss"] for r in _metrics(run_dir) if r["step"] == 12 and "val_loss" in r]
    assert logged == [pytest.approx(validation_loss(rt, average, data)[0], rel=1e-6)]
    assert validation_loss(rt, state.params, data)[0] != pytest.approx(logged[0], rel=1e-4)


@pytest.mark.parametrize("name, note", [("adamw", True), ("schedule_free_adamw", False)])
def test_extending_a_run_notes_a_rate_that_changes_and_only_that(capsys, name, note):
    """A higher train.steps restretches the cosine decay (said in one line); schedule-free's rate is
    constant after warmup, so extending it changes nothing and says nothing."""
    from lm.training.loop import _note_schedule_change

    old = _config(name, "train.steps=100")
    _note_schedule_change(old, replace(old, **{"train.steps": 200}), 100)
    out = capsys.readouterr().out
    assert out.startswith("note: the learning rate of step 101") if note else out == "", out
