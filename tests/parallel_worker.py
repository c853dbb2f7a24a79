"""Cases of tests/test_parallel.py, each run in its own process with fake CPU devices.

Usage: python tests/parallel_worker.py CASE JSON_ARGS. XLA_FLAGS (set by the caller)
fixes the device count before JAX starts. Prints one line `RESULT {json}` at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import shutil
import sys

import jax
import numpy as np

from lm.cli import main as cli_main
from lm.config import load_config
from lm.errors import LMError
from lm.tools.evaluate import evaluate
from lm.training.runtime import build
from lm.data.text import TRAIN_STREAM, TextData, random_windows
from lm.data.tokenizers import ByteTokenizer, make_tokenizer
from lm.rundir import CHECKPOINT_DIR, METRICS_FILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4


def tiny(args: dict, *overrides: str, run_dir: str = "unused"):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"data.text_file={args['text_file']}", f"run_dir={run_dir}", *overrides])


def runtime_losses(cfg, steps: int = STEPS, params=None):
    """(runtime, final state, losses) of `steps` train steps, batches loaded as the trainer does.

    `params` (optional) replaces the initial parameters.
    """
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    data = TextData.load(cfg.data, tokenizer, cfg.train.seq_len)
    rt = build(cfg, tokenizer)
    state, losses = rt.init(jax.random.key(cfg.seed)), []
    if params is not None:
        params = jax.device_put(params, rt.state_sharding.params)
        state = state.replace(params=params, opt_state=jax.jit(rt.tx.init)(params))
    batch_size = cfg.train.batch_size
    for step in range(steps):
        local = random_windows(data.train, cfg.seed, step, TRAIN_STREAM, batch_size, cfg.train.seq_len,
                               rt.host_rows(batch_size))
        state, metrics = rt.train_step(state, rt.place_batch(local))
        losses.append(float(metrics["loss"]))
    return rt, state, losses


def stacked_init(cfg) -> dict:
    """The unscanned model's initial parameters, blocks stacked the way model.scan_layers holds them."""
    rt = build(cfg, make_tokenizer(cfg.data.tokenizer))
    params = dict(jax.device_get(rt.init(jax.random.key(cfg.seed)).params))
    blocks = [params.pop(f"block_{i}") for i in range(cfg.model.n_layers)]
    return {**params, "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}


def layout_of(state) -> dict[str, list]:
    """keystr(path) -> [partition spec, shape of the first device's shard] for every state leaf."""
    return {jax.tree_util.keystr(path): [str(x.sharding.spec), list(x.addressable_shards[0].data.shape)]
            for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def error_of(cfg) -> str:
    try:
        build(cfg, make_tokenizer(cfg.data.tokenizer))
    except LMError as e:
        return str(e)
    return ""


def metrics_losses(run_dir: str) -> dict[int, float]:
    lines = (pathlib.Path(run_dir) / METRICS_FILE).read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def train_args(args: dict, run_dir: str, *overrides: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.text_file={args['text_file']}",
            f"run_dir={run_dir}", f"train.steps={STEPS + 1}", "log.every=1", "eval.every=0",
            "checkpoint.every=3", "checkpoint.async_save=false", *overrides]


def case_one_device(args: dict) -> dict:
    """Baseline losses and the precision/memory variants."""
    out = {name: runtime_losses(tiny(args, *ov), steps)[2] for name, ov, steps in (
        ("baseline", (), STEPS + 1), ("bfloat16", ("model.dtype=bfloat16",), STEPS),
        ("remat", ("model.remat=block",), STEPS))}
    out["scan"] = runtime_losses(tiny(args, "model.scan_layers=true"), params=stacked_init(tiny(args)))[2]
    return out


def case_evaluate(args: dict) -> dict:
    """eval.py --json on the run in run_dir."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli_main(["eval", "--run_dir", args["run_dir"], "--json"])
    return {**json.loads(stdout.getvalue().splitlines()[-1]), "devices": jax.device_count()}


def case_eight_devices(args: dict) -> dict:
    """Every layout's losses and state layouts, the layout errors, and a checkpointed train.py run."""
    out = {}
    for name, ov in (("data8", ()), ("fsdp4_tensor2", ("parallel.fsdp=4", "parallel.tensor=2")),
                     ("pmap", ("parallel.mode=pmap",)),
                     ("accum4", ("train.grad_accum_steps=4", "parallel.data=2", "parallel.tensor=4")),
                     ("chunked", ("parallel.cpu_chunk_tokens=32", "parallel.data=2", "parallel.tensor=4"))):
        rt, state, losses = runtime_losses(tiny(args, *ov))
        out[name] = {"losses": losses, "layout": layout_of(state), "mesh": dict(rt.mesh.shape),
                     "passes": rt.train_passes}
        if name in ("data8", "fsdp4_tensor2"):
            hlo = rt.train_step.lower(rt.restore_target, rt.abstract_batch()).compile().as_text()
            out[name]["all_reduces"] = hlo.count("all-reduce(")
    out["errors"] = {name: error_of(tiny(args, *ov)) for name, ov in (
        ("batch", ("train.batch_size=12",)), ("heads", ("parallel.tensor=8", "parallel.data=1")),
        ("mesh", ("parallel.data=16",)), ("pmap_fsdp", ("parallel.mode=pmap", "parallel.fsdp=2")),
        ("pmap_batch", ("parallel.mode=pmap", "train.batch_size=12")))}
    out["memory"] = {name: compiled_memory(tiny(args, "model.d_model=256", "train.batch_size=64", *ov))
                     for name, ov in (("data8", ()), ("fsdp8", ("parallel.data=1", "parallel.fsdp=8")))}
    cli_main(["train", *train_args(args, args["run_dir"], "parallel.fsdp=4", "parallel.tensor=2")])
    return out


def compiled_memory(cfg) -> dict[str, int]:
    """The compiler's per-device bytes for the train step (arguments and temporaries)."""
    rt = build(cfg, ByteTokenizer())
    analysis = rt.train_step.lower(rt.restore_target, rt.abstract_batch()).compile().memory_analysis()
    return {"arguments": analysis.argument_size_in_bytes, "temporaries": analysis.temp_size_in_bytes}


def case_resume(args: dict) -> dict:
    """Drops the newest checkpoint of a mesh run and resumes it here in pmap mode."""
    checkpoints = pathlib.Path(args["run_dir"]) / CHECKPOINT_DIR
    before = metrics_losses(args["run_dir"])
    shutil.rmtree(checkpoints / str(STEPS + 1))
    cli_main(["train", *train_args(args, args["run_dir"], "parallel.mode=pmap")])
    return {"before": before, "after": metrics_losses(args["run_dir"]), "devices": jax.device_count(),
            "eval": evaluate(args["run_dir"])}


def case_train(args: dict) -> dict:
    """A train.py run (optionally one of several processes); each process reports what it saw."""
    out = {}
    for name, ov in (("mesh", ("parallel.fsdp=2", "parallel.tensor=2")), ("pmap", ("parallel.mode=pmap",))):
        run_dir = f"{args['run_dir']}_{name}"
        cli_main(["train", *train_args(args, run_dir, *ov, *args.get("overrides", ()))])
        out[name] = {"losses": metrics_losses(run_dir) if jax.process_index() == 0 else None,
                     "checkpoints": sorted(p.name for p in (pathlib.Path(run_dir) / CHECKPOINT_DIR).iterdir())}
    out.update(process_index=jax.process_index(), process_count=jax.process_count(),
               devices=jax.device_count())
    return out


if __name__ == "__main__":
    result = globals()[f"case_{sys.argv[1]}"](json.loads(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)
