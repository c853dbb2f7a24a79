"""Benchmark the exact train step of a config: tokens/s, step time, compile time, MFU, memory.

    lm bench --config configs/shakespeare_char.yaml [key=value ...] [--json]
             [--steps 10] [--warmup 2] [--max_seconds 120]
    lm data bench --config C    the input pipeline alone, next to the train step

The step is `lm.training.runtime.build(cfg).train_step`, the one train.py runs, compiled once,
warmed up, then timed step by step (each waits for the device) until --steps steps or
--max_seconds of timed steps (at least 3 steps), whichever comes first. The input pipeline is
timed on its own (host-side batch assembly), so the two can be compared.

Batches: random windows of data.text_file's training split for a byte-tokenized text file
(a file that cannot be read is an error); otherwise random token ids in the model's vocabulary,
said so: a step's time does not depend on the ids, and a SentencePiece tokenizer is trained
only on a run's first start. Packed-document configs get rows of one document each, so the
step compiled is the one that run trains (segment ids and all).
"""

from __future__ import annotations

import pathlib
import resource
import tempfile
import time
import types

import jax
import numpy as np

from lm.config import Config
from lm.data import make_data, run_tokenizer
from lm.data.text import TRAIN_STREAM, TextData, random_windows
from lm.data.tokenizers import ByteTokenizer, make_tokenizer
from lm.errors import LMError
from lm.observe.flops import flops_per_token, mfu, peak_flops
from lm.parallel.cpu import split_cpu
from lm.parallel.mesh import host_rows
from lm.tools.info import processor
from lm.training.runtime import build

SYNTHETIC_TOKENS = 1 << 20


def load_tokens(cfg: Config) -> tuple[np.ndarray, int, str]:
    """(token ids to cut windows from, the model's vocabulary, what they are): the training split of
    data.text_file for a byte-tokenized text file, else random ids (see the module docstring)."""
    d = cfg.data
    if d.source == "text_file" and d.tokenizer == "byte" and d.text_file:
        tokenizer = ByteTokenizer()
        return TextData.load(d, tokenizer, cfg.train.seq_len).train, tokenizer.vocab_size, d.text_file
    if d.packed:
        why = f"data.source={d.source} packs documents; lm data bench times that pipeline"
    elif not d.text_file:
        why = "no data.text_file is set"
    else:
        why = f"data.tokenizer={d.tokenizer} is trained on a run's first start, or imported"
    vocab = cfg.model.vocab_size or _tokenizer_vocabulary(d)
    tokens = np.random.default_rng(0).integers(3, vocab, SYNTHETIC_TOKENS, dtype=np.int32)
    return tokens, vocab, f"random token ids below {vocab}: {why}; a step's time does not depend on the ids"


def _tokenizer_vocabulary(d) -> int:
    """The vocabulary data.tokenizer will have, without training it."""
    if d.tokenizer != "sentencepiece":
        return make_tokenizer(d.tokenizer).vocab_size  # data.tokenizer=hf (model.vocab_size unset): its message
    if not d.tokenizer_model:
        return d.vocab_size
    from lm.data.tokenizers.sentencepiece import SentencePieceTokenizer

    return SentencePieceTokenizer.from_file(d.tokenizer_model).vocab_size


def pipeline_tokens_per_sec(tokens: np.ndarray, cfg: Config, seconds: float = 0.5) -> float:
    """This host's batch assembly speed (random_windows alone), in global-batch tokens/s."""
    rows, count, start = host_rows(cfg.train.batch_size), 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        random_windows(tokens, cfg.seed, count, TRAIN_STREAM, cfg.train.batch_size, cfg.train.seq_len, rows)
        count += 1
    return count * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - start)


def peak_memory(devices) -> tuple[int | None, str]:
    """(largest peak bytes in use on any device, source); host peak RSS on CPU."""
    stats = [d.memory_stats() for d in devices if d.process_index == jax.process_index()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    if peaks:
        return max(peaks), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (CPU: no device memory stats)"


def bench(cfg: Config, steps: int = 10, warmup: int = 2, max_seconds: float = float("inf")) -> dict:
    """Compiles and times `steps` steady-state train steps of `cfg`; returns the figures."""
    if steps < 1 or warmup < 0:
        raise LMError(f"--steps must be at least 1 and --warmup at least 0 (got {steps}, {warmup}).")
    split_cpu(cfg)
    tokens, vocab, source = load_tokens(cfg)
    rt = build(cfg, types.SimpleNamespace(vocab_size=vocab))  # build reads only the tokenizer's vocabulary
    cfg = rt.cfg
    devices = list(rt.mesh.devices.flat)

    def batch(i):
        local = random_windows(tokens, cfg.seed, i, TRAIN_STREAM, cfg.train.batch_size, cfg.train.seq_len,
                               host_rows(cfg.train.batch_size))
        if cfg.data.packed:  # what packed rows carry (lm.data.pipeline.to_batch): here one document each
            ones = np.ones_like(local["inputs"])
            local.update(positions=np.broadcast_to(np.arange(cfg.train.seq_len, dtype=np.int32), ones.shape),
                         segment_ids=ones, weights=ones)
        return rt.place_batch(local)

    dtype = rt.model_cfg.dtype  # model.dtype resolved for the platform
    peak_flops(devices, dtype)  # on CPU: probed before and after the timed steps, best kept
    state = rt.init(jax.random.key(cfg.seed))
    start = time.perf_counter()
    compiled = rt.train_step.lower(state, batch(0)).compile()
    compile_sec = time.perf_counter() - start
    times = []
    for i in range(warmup + steps):
        placed = jax.block_until_ready(batch(i))
        start = time.perf_counter()
        state, metrics = compiled(state, placed)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if sum(times) > max_seconds and len(times) >= 3:
                break
    if not np.isfinite(float(metrics["loss"])):
        raise LMError(f"the benchmarked step produced a non-finite loss ({float(metrics['loss'])}); "
                      "fix the config (e.g. lower optim.lr) before timing it.")

    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    median = float(np.median(times))
    tokens_per_sec = tokens_per_step / median
    flops_per_tok = flops_per_token(cfg.model, cfg.train.seq_len)
    total_peak, peak_source = peak_flops(devices, dtype, refresh=True)
    memory, memory_source = peak_memory(devices)
    return {
        "platform": devices[0].platform, "device_kind": devices[0].device_kind, "n_devices": len(devices),
        "processor": processor(),
        "dtype": dtype, "attention": rt.model.kernels.attention_name,
        "attention_dropout": cfg.model.attention_dropout,
        "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
        "passes": rt.train_passes,
        "tokens_per_sec": tokens_per_sec, "tokens_per_sec_per_device": tokens_per_sec / len(devices),
        "step_sec_median": median, "step_sec_p10": float(np.percentile(times, 10)),
        "step_sec_p90": float(np.percentile(times, 90)), "steps": len(times), "warmup": warmup,
        "compile_sec": compile_sec, "flops_per_token": flops_per_tok,
        "model_flops_per_sec": tokens_per_sec * flops_per_tok,
        "peak_flops_per_sec": total_peak, "peak_source": peak_source,
        "mfu": mfu(tokens_per_sec, flops_per_tok, total_peak),
        "peak_memory_bytes": memory, "memory_source": memory_source,
        "pipeline_tokens_per_sec": None if cfg.data.packed else pipeline_tokens_per_sec(tokens, cfg), "data": source,
        "cpu_options": rt.cpu_options(),
    }


def format_table(result: dict) -> str:
    def number(value, fmt):
        return "n/a" if value is None else fmt.format(value)

    rows = [
        ("device", f"{result['n_devices']} x {result['device_kind']} ({result['platform']}), {result['dtype']}"),
        ("attention", result["attention"] + (f" with dropout {result['attention_dropout']:g} on its probabilities"
                                             if result["attention_dropout"] else "")),
        ("batch", f"{result['batch_size']} x {result['seq_len']} tokens in {result['passes']} "
                  f"{'pass' if result['passes'] == 1 else 'passes'}"),
        ("tokens/s", f"{result['tokens_per_sec']:,.0f} ({result['tokens_per_sec_per_device']:,.0f} per device)"),
        ("step time", f"median {result['step_sec_median'] * 1e3:.1f} ms, p10 {result['step_sec_p10'] * 1e3:.1f}, "
                      f"p90 {result['step_sec_p90'] * 1e3:.1f} ({result['steps']} steps after {result['warmup']})"),
        ("compile", f"{result['compile_sec']:.1f} s"),
        ("FLOPs/token", f"{result['flops_per_token'] / 1e6:,.1f} M (6N + causal attention)"),
        ("MFU", number(result["mfu"], "{:.2%}") + f" of {number(result['peak_flops_per_sec'], '{:.3g}')} "
                f"FLOP/s ({result['peak_source']})"),
        ("peak memory", f"{result['peak_memory_bytes'] / 2**20:,.0f} MiB ({result['memory_source']})"),
        ("data", result["data"]),
        ("input pipeline", number(result["pipeline_tokens_per_sec"], "{:,.0f} tokens/s (random windows)")),
    ]
    if result["cpu_options"]:
        o = result["cpu_options"]
        rows.insert(1, ("processor", result["processor"]))
        rows.insert(2, ("CPU options", f"{o['devices']} device(s), passes of <= {o['pass_tokens']} tokens, "
                                       f"{o['matmuls']} matmuls, {o['min_max']} max/min, "
                                       f"attention {o['attention_query_block'] or 'all'} queries at a time, "
                                       f"gradients summed by the {o['gradient_sum']}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def data_bench(cfg: Config, batches: int = 50) -> dict:
    """Tokens/s of the input pipeline alone (`batches` batches) next to tokens/s of the train step."""
    split_cpu(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = run_tokenizer(cfg, pathlib.Path(tmp))
    rt = build(cfg, tokenizer)
    data = make_data(rt.cfg, tokenizer, rt.host_rows)
    data.batch(0)  # start workers, open files
    start, tokens = time.perf_counter(), 0
    for step in range(1, batches + 1):
        batch = data.batch(step)
        tokens += int(np.asarray(batch.get("weights", np.ones_like(batch["targets"]))).sum())
    pipeline_rate = tokens / (time.perf_counter() - start)

    state = rt.init(jax.random.key(cfg.seed))
    placed = [rt.place_batch(data.batch(step)) for step in range(4)]
    state, metrics = rt.train_step(state, placed[0])  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in placed[1:]:
        state, metrics = rt.train_step(state, batch)
    jax.block_until_ready(metrics)
    step_rate = 3 * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - start)
    return {"pipeline_tokens_per_sec": pipeline_rate, "batches": batches, "workers": cfg.data.workers,
            "sources": list(data.source_names),
            "step_tokens_per_sec": step_rate, "n_devices": rt.mesh.size,
            "platform": rt.mesh.devices.flat[0].platform}
