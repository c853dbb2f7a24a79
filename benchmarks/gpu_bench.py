"""lm on one GPU beside PyTorch, in one call: the stages of benchmarks/gpu.sh, in order of importance.

    bash benchmarks/gpu.sh [STAGE ...]       # all stages by default; names select some
    LM_GPU_BENCH_DRY=1 bash benchmarks/gpu.sh  # CPU dry run: tiny shapes, 1-2 steps, torch without compile

Each stage is a fresh process (its own XLA_FLAGS and peak memory): `lm bench` on gpt2_124m at
batch 32 (vocab 50304, the PyTorch reference's model), the PyTorch reference
(benchmarks/torch_reference.py: CUDA, bf16 autocast, torch.compile, fused AdamW), gpt2_124m and
llama_1b as configured, A/B variants (loss tiling, unrolled layers, remat, XLA flag sets), and
last the shakespeare_char recipe end to end (train.py, then eval.py --json on the newest kept
checkpoint). Step counts, timeouts and the stage list fit GPU_BENCH_BUDGET_S (default 460 s,
compiles included, estimated from one H200's figures); a stage that would not fit is skipped
(said so), keeping the recipe's share. Every stage appends one JSON line to
$OUT/gpu_bench.jsonl (default: the working directory) as it ends, so a timeout keeps the
figures already taken; one table at the end.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRY = os.environ.get("LM_GPU_BENCH_DRY", "") not in ("", "0")
BUDGET_S = float(os.environ.get("GPU_BENCH_BUDGET_S", "460"))
OUT = pathlib.Path(os.environ.get("OUT") or ".")
RESULTS = OUT / "gpu_bench.jsonl"

GPT2 = "configs/gpt2_124m.yaml"
LLAMA = "configs/llama_1b.yaml"
B32 = ["train.batch_size=32", "train.grad_accum_steps=1", "model.vocab_size=50304"]  # the reference's model
TORCH_GPT2 = ["--n_layers", "12", "--d_model", "768", "--n_heads", "12", "--vocab_size", "50304", "--seq_len", "1024",
              "--batch_size", "32", "--bias"]
# XLA's own defaults for the flags lm.parallel.gpu adds: naming them keeps lm from adding its own.
XLA_DEFAULTS = "--xla_gpu_enable_latency_hiding_scheduler=false"
# MaxText's GPU recipes (configs/gpu/a3/llama_2_7b/1vm.sh), in this XLA's flag names.
MAXTEXT = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false "
           "--xla_gpu_enable_command_buffer= --xla_gpu_enable_highest_priority_async_stream=true "
           "--xla_gpu_all_reduce_combine_threshold_bytes=134217728 "
           "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
           "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864 --xla_gpu_enable_pipelined_all_gather=true "
           "--xla_gpu_enable_pipelined_reduce_scatter=true --xla_gpu_enable_pipelined_all_reduce=true "
           "--xla_gpu_enable_while_loop_double_buffering=true --xla_gpu_enable_all_gather_combine_by_dim=false "
           "--xla_gpu_enable_reduce_scatter_combine_by_dim=false --xla_disable_hlo_passes=rematerialization")
# Dry run: every config shrunk to a few seconds on a CPU (later overrides win).
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
        "model.max_seq_len=64", "model.vocab_size=512", "train.seq_len=32", "train.batch_size=8"]
TINY_TORCH = ["--n_layers", "2", "--d_model", "64", "--n_heads", "4", "--vocab_size", "512", "--seq_len", "32",
              "--batch_size", "8", "--bias"]


@dataclasses.dataclass
class Stage:
    name: str
    title: str
    kind: str  # "lm" (lm bench), "torch" (torch_reference.py) or "recipe" (train.py + eval.py)
    args: list[str]  # lm: config and overrides; torch: shape flags; recipe: config and overrides
    est_s: float  # on one H200, start to exit, compile included (h200-2026-12-04 figures)
    timeout_s: float
    steps: tuple[int, int] = (10, 2)  # lm bench --steps, --warmup (torch: the same)
    xla_flags: str | None = None  # None: the caller's XLA_FLAGS (lm adds its defaults)
    versus_torch: bool = False  # the reference's model and batch: show lm / torch
    dump_hlo: bool = False  # keep XLA's optimized program, memory report and autotuning choices in $OUT/hlo-NAME


def ab(name: str, title: str, *overrides: str, xla_flags: str | None = None, est_s: float = 17,
       timeout_s: float = 60) -> Stage:
    """An A/B variant of the batch-32 GPT-2 step."""
    return Stage(name, title, "lm", [GPT2, *B32, *overrides], est_s, timeout_s, xla_flags=xla_flags,
                 versus_torch=True)


STAGES = [
    Stage("lm_gpt2_b32", "lm, GPT-2 124M batch 32 (vocab 50304, as the reference)", "lm", [GPT2, *B32], 20, 90,
          steps=(20, 3), versus_torch=True),
    Stage("torch_gpt2_b32", "PyTorch reference: compile, bf16 autocast, fused AdamW, flash SDPA", "torch",
          ["--compile", "--bf16", "--fused_adamw", *TORCH_GPT2], 50, 150, steps=(20, 3)),
    Stage("lm_gpt2_shipped", "configs/gpt2_124m.yaml as shipped (512 in 8 micro-batches)", "lm", [GPT2], 22, 90,
          steps=(3, 1)),
    Stage("lm_llama_1b_shipped", "configs/llama_1b.yaml as shipped (256 x 2048 in 4, remat=block)", "lm", [LLAMA],
          45, 120, steps=(2, 1)),
    ab("ab_whole_loss", "A/B: whole cross-entropy (train.loss_chunk_tokens=0)", "train.loss_chunk_tokens=0"),
    Stage("hlo_gpt2_b32", "the batch-32 GPT-2 step's compiled program, kept (benchmarks/hlo_traffic.py reads it)",
          "lm", [GPT2, *B32], 17, 60, steps=(1, 0), dump_hlo=True),
    ab("ab_unrolled", "A/B: layers unrolled (model.scan_layers=false)", "model.scan_layers=false", est_s=45,
       timeout_s=90),
    Stage("ab_llama_save_qkv_attn", "A/B: llama_1b with model.remat=save_qkv_attn", "lm",
          [LLAMA, "model.remat=save_qkv_attn"], 45, 90, steps=(2, 1)),
    ab("ab_xla_defaults", "A/B: XLA's defaults (lm's GPU flags off)", xla_flags=XLA_DEFAULTS),
    ab("ab_cublas", "A/B: cuBLAS GEMMs (--xla_gpu_enable_triton_gemm=false)",
       xla_flags="--xla_gpu_enable_triton_gemm=false"),
    ab("ab_maxtext_flags", "A/B: MaxText's GPU XLA flags", xla_flags=MAXTEXT),
    ab("ab_no_command_buffers", "A/B: no CUDA graphs (--xla_gpu_enable_command_buffer=)",
       xla_flags="--xla_gpu_enable_command_buffer="),
    ab("ab_tiled_loss", "A/B: tiled cross-entropy (train.loss_chunk_tokens=-1)", "train.loss_chunk_tokens=-1"),
    ab("ab_vocab_50257", "A/B: GPT-2's own vocabulary, 50257 (as configured)", "model.vocab_size=50257"),
    ab("ab_unrolled_whole_cublas", "A/B: unrolled, whole loss, cuBLAS", "model.scan_layers=false",
       "train.loss_chunk_tokens=0", xla_flags="--xla_gpu_enable_triton_gemm=false", est_s=45, timeout_s=90),
    ab("ab_double_buffering", "A/B: --xla_gpu_enable_while_loop_double_buffering=true",
       xla_flags="--xla_gpu_enable_while_loop_double_buffering=true"),
    Stage("ab_gpt2_shipped_unrolled", "A/B: configs/gpt2_124m.yaml as shipped, model.scan_layers=false", "lm",
          [GPT2, "model.scan_layers=false"], 60, 120, steps=(3, 1)),
    Stage("ab_llama_micro16_no_remat", "A/B: llama_1b, 16 micro-batches of 16, model.remat=none", "lm",
          [LLAMA, "train.grad_accum_steps=16", "model.remat=none"], 50, 90, steps=(2, 1)),
    Stage("shakespeare_char", "configs/shakespeare_char.yaml end to end (train.py, eval.py --json)", "recipe",
          ["configs/shakespeare_char.yaml"], 180, 180),
]
RECIPE_EVAL_S = 20  # eval.py on the kept checkpoint, start to exit


def lm_command(stage: Stage) -> list[str]:
    config, *overrides = stage.args
    steps, warmup = (1, 1) if DRY else stage.steps
    return [sys.executable, "-m", "lm.bench", "--config", config, *overrides, *(TINY if DRY else []),
            "--steps", str(steps), "--warmup", str(warmup), "--json"]


def torch_command(stage: Stage) -> list[str]:
    steps, warmup = (1, 1) if DRY else stage.steps
    args = ["--device", "cpu", "--bf16", *TINY_TORCH] if DRY else ["--device", "cuda", *stage.args]
    return [sys.executable, str(ROOT / "benchmarks" / "torch_reference.py"), *args, "--steps", str(steps),
            "--warmup", str(warmup)]


def run(command: list[str], timeout: float, xla_flags: str | None, log: pathlib.Path | None = None) -> dict:
    """rc, wall seconds and stdout of a fresh process (its output to `log` when given)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = 124, _text(e.stdout), _text(e.stderr)
    if log:
        log.write_text(stdout + stderr)
    return {"rc": rc, "wall_s": round(time.perf_counter() - start, 1), "stdout": stdout, "stderr": stderr}


def keep(dump: pathlib.Path, to: pathlib.Path) -> None:
    """The optimized program, its memory report and the autotuner's picks from an XLA dump (not its LLVM IR or PTX)."""
    to.mkdir(parents=True, exist_ok=True)
    for pattern in ("*after_optimizations.txt", "*memory-usage-report.txt", "*autotune_results.pbtxt"):
        for path in dump.glob(pattern):
            shutil.copy(path, to / path.name)
    shutil.rmtree(dump, ignore_errors=True)


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def last_json(stdout: str) -> dict | None:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run_recipe(stage: Stage, timeout: float) -> tuple[dict, dict]:
    """train.py with the recipe (killed at `timeout`), then eval.py --json on its newest checkpoint."""
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="lm-gpu-bench-"))
    config, *overrides = stage.args
    if DRY:
        overrides += [*TINY, "train.steps=2", "eval.every=2", "eval.batches=1", "checkpoint.every=2", "log.every=1"]
    train = run([sys.executable, "train.py", "--config", config, *overrides, f"run_dir={run_dir}",
                 "log.tensorboard=false"], timeout - RECIPE_EVAL_S, stage.xla_flags, OUT / f"{stage.name}-train.log")
    evaluate = run([sys.executable, "eval.py", "--run_dir", str(run_dir), "--json"], RECIPE_EVAL_S * 3,
                   stage.xla_flags)
    from lm.config import load_config  # not at the top: `import lm` adds lm's XLA flags to os.environ

    cfg = load_config(config, overrides)
    metrics_path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    if metrics_path.exists():
        shutil.copy(metrics_path, OUT / f"{stage.name}-metrics.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)
    rates = [r for r in records if "tokens_per_sec" in r][2:] or [r for r in records if "tokens_per_sec" in r]
    tokens_per_sec = statistics.median(r["tokens_per_sec"] for r in rates) if rates else None
    result = {
        "train_rc": train["rc"], "train_wall_s": train["wall_s"], "eval_rc": evaluate["rc"],
        "steps_done": max((r["step"] for r in records), default=0),
        "tokens_per_sec": tokens_per_sec,
        "step_sec_median": cfg.train.batch_size * cfg.train.seq_len / tokens_per_sec if tokens_per_sec else None,
        "mfu": statistics.median(r["mfu"] for r in rates) if rates and rates[0].get("mfu") is not None else None,
        "val_loss": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
        "eval": last_json(evaluate["stdout"]) if evaluate["rc"] == 0 else None,
    }
    ok = train["rc"] in (0, 124) and evaluate["rc"] == 0
    wall_s = round(train["wall_s"] + evaluate["wall_s"], 1)
    return {"rc": 0 if ok else (train["rc"] or evaluate["rc"]), "wall_s": wall_s,
            "stderr": train["stderr"] + evaluate["stderr"]}, result


def machine() -> dict:
    """What the figures were taken on: the GPU (nvidia-smi), the packages, the code."""
    def output(command: list[str]) -> str | None:
        try:
            return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            return None

    versions = {}
    for package in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
                    "torch", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"stage": "machine", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "gpu": output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                           "--format=csv,noheader"]),
            "commit": output(["git", "rev-parse", "--short", "HEAD"]), "python": sys.version.split()[0],
            "versions": versions, "xla_flags": os.environ.get("XLA_FLAGS"), "dry_run": DRY, "budget_s": BUDGET_S}


def main(selected: list[str]) -> None:
    unknown = sorted(set(selected) - {s.name for s in STAGES})
    if unknown:
        sys.exit(f"error: unknown stage(s) {', '.join(unknown)}; the stages are: {' '.join(s.name for s in STAGES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    records = [machine()]
    append(records[0])
    print(f"{records[0]['gpu'] or 'no GPU (nvidia-smi)'} | {records[0]['versions']} | results: {RESULTS}", flush=True)
    start = time.perf_counter()
    for stage in STAGES:
        record = {"stage": stage.name, "title": stage.title, "kind": stage.kind, "xla_flags": stage.xla_flags}
        later_recipe = [s for s in STAGES[STAGES.index(stage) + 1:]
                        if s.kind == "recipe" and (not selected or s.name in selected)]
        left = BUDGET_S - (time.perf_counter() - start) - sum(s.est_s for s in later_recipe)
        if selected and stage.name not in selected:
            record["status"] = "not selected"
        elif stage.est_s > left and not DRY:
            record["status"] = f"skipped: {stage.est_s:.0f} s estimated, {max(left, 0):.0f} s of the budget left"
        else:
            print(f"== {stage.name}: {stage.title}", flush=True)
            done, result = run_stage(stage, stage.timeout_s if DRY else min(stage.timeout_s, left), record)
            record.update(rc=done["rc"], wall_s=done["wall_s"], result=result,
                          status="ok" if done["rc"] == 0 and result else ("timeout" if done["rc"] == 124 else "failed"))
            if record["status"] != "ok":
                record["error"] = done["stderr"][-1500:]
            print(f"   {record['status']} in {done['wall_s']} s" + (f": {record['error'][-400:]}" if "error" in record
                                                                    else ""), flush=True)
        records.append(record)
        if record["status"] != "not selected":
            append(record)
    print(table(records[1:]), flush=True)


def run_stage(stage: Stage, timeout: float, record: dict) -> tuple[dict, dict | None]:
    """(the process's rc, wall_s and stderr; its result) for one stage, its command noted in `record`."""
    if stage.kind == "recipe":
        return run_recipe(stage, timeout)
    command = lm_command(stage) if stage.kind == "lm" else torch_command(stage)
    record["command"] = " ".join(command[1:])
    if not stage.dump_hlo:
        done = run(command, timeout, stage.xla_flags)
    else:
        dump = pathlib.Path(tempfile.mkdtemp(prefix="lm-gpu-hlo-"))
        done = run(command, timeout, f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text "
                                     "--xla_dump_hlo_module_re=jit_train_step")
        keep(dump, OUT / f"hlo-{stage.name}")
    return done, last_json(done["stdout"]) if done["rc"] == 0 else None


def append(record: dict) -> None:
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


def table(records: list[dict]) -> str:
    """One row per stage: tokens/s, step ms, MFU, peak memory, lm / PyTorch reference, and a note."""
    by_name = {r["stage"]: r for r in records}
    reference = (by_name.get("torch_gpt2_b32") or {}).get("result")
    lm_b32 = (by_name.get("lm_gpt2_b32") or {}).get("result") or {}
    rows = [("stage", "tokens/s", "step ms", "MFU", "peak GiB", "x torch", "note")]
    for r in records:
        stage = next(s for s in STAGES if s.name == r["stage"])
        result = r.get("result") or {}
        if r["status"] != "ok":
            why = (r.get("error") or "").strip().splitlines()[-1:] or [""]
            rows.append((r["stage"], "", "", "", "", "", f"{r['status']}{' (rc %s)' % r['rc'] if 'rc' in r else ''} "
                                                         f"{why[0][:100]}"))
            continue
        tokens_per_sec, note = result.get("tokens_per_sec"), stage.title
        step_ms = 1e3 * result["step_sec_median"] if result.get("step_sec_median") else None
        mfu = result.get("mfu")
        memory = result.get("peak_memory_bytes") if stage.kind != "recipe" else None
        if stage.kind == "torch" and lm_b32.get("peak_flops_per_sec"):
            mfu = tokens_per_sec * result["flops_per_token"] / lm_b32["peak_flops_per_sec"]
        if stage.kind == "recipe":
            ev = result["eval"] or {}
            note = (f"{result['steps_done']} steps, train.py {result['train_wall_s']} s (rc {result['train_rc']}); "
                    f"eval.py loss {ev.get('loss', float('nan')):.3f} at step {ev.get('step')}")
        ratio = tokens_per_sec / reference["tokens_per_sec"] if stage.versus_torch and reference and tokens_per_sec \
            else (1.0 if stage.kind == "torch" else None)
        rows.append((r["stage"], _fmt(tokens_per_sec, "{:,.0f}"), _fmt(step_ms, "{:.1f}"), _fmt(mfu, "{:.1%}"),
                     _fmt(memory and memory / 2**30, "{:.1f}"), _fmt(ratio, "{:.2f}"), note))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row[:6], widths))) + "  " + row[6] for row in rows)


def _fmt(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


if __name__ == "__main__":
    main(sys.argv[1:])
