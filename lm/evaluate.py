"""Exact evaluation: every token of a text scored once; loss, perplexity, bits-per-byte."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Iterator

import jax
import numpy as np

from lm import config as config_lib
from lm.checkpoint import Checkpoints
from lm.errors import LMError
from lm.runtime import build
from lm.sharding import host_rows
from lm.text_data import read_text, split_text
from lm.tokenizer import load_tokenizer
from lm.trainer import CHECKPOINT_DIR, CONFIG_FILE


def eval_windows(tokens: np.ndarray, seq_len: int, stride: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Windows of `seq_len` targets; each target after the first token is weighted once.

    With stride == seq_len (the default) windows do not overlap. A smaller stride gives
    sliding-window scoring: each later window scores only its last `stride` targets,
    each with up to seq_len - 1 tokens of context.
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise LMError(f"--stride={stride} must be between 1 and the model's seq_len {seq_len}.")
    n, start, scored_until = len(tokens), 0, 0
    while scored_until < n - 1:
        end = min(start + seq_len, n - 1)  # index of the last target in this window
        window = tokens[start:end + 1]
        target_index = np.arange(start + 1, end + 1)
        pad = seq_len - len(target_index)
        yield {
            "inputs": np.pad(window[:-1], (0, pad)),
            "targets": np.pad(window[1:], (0, pad)),
            "weights": np.pad((target_index > scored_until).astype(np.int32), (0, pad)),
        }
        scored_until, start = end, start + stride


def _batches(windows: Iterator[dict], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Stacks windows into full batches, padding the last with zero-weight rows."""
    rows = []
    for window in windows:
        rows.append(window)
        if len(rows) == batch_size:
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            rows = []
    if rows:
        blank = {k: np.zeros_like(v) for k, v in rows[0].items()}
        rows += [blank] * (batch_size - len(rows))
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _text_batches(cfg, tokenizer, text_file: str | None, stride: int | None, batch_size: int):
    if text_file:
        text = read_text(dataclasses.replace(cfg.data, text_file=text_file, sha256=""))
    else:
        text = split_text(read_text(cfg.data), cfg.data.val_fraction)[1]
    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise LMError("the evaluation text has fewer than 2 tokens; pass a longer --text_file.")
    return _batches(eval_windows(tokens, cfg.train.seq_len, stride), batch_size)


def evaluate(run_dir: str, step: int | None = None, text_file: str | None = None,
             stride: int | None = None, split: str | None = None) -> dict:
    """Scores the run's validation split (or `text_file`) with its checkpoint at `step` (default newest).

    With data.source=tfds the documents of `split` (default data.eval_split) are packed as
    in training and every token is scored once (`stride` does not apply).
    """
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise LMError(f"'{run_dir}' is not a run directory (no {CONFIG_FILE}); pass the run_dir train.py wrote.")
    cfg = config_lib.load_config(run_dir / CONFIG_FILE)
    tokenizer = load_tokenizer(run_dir)
    ckpts = Checkpoints(run_dir / CHECKPOINT_DIR, read_only=True)
    step = ckpts.latest() if step is None else step
    if step is None:
        raise LMError(f"'{run_dir}' has no checkpoints yet; train it first (python train.py ... run_dir={run_dir}).")
    # Evaluate on whatever devices are here, with a batch every device gets a share of.
    ways = jax.device_count()
    batch_size = -(-(cfg.eval.batch_size or cfg.train.batch_size) // ways) * ways
    cfg = config_lib.replace(cfg, **{"parallel.data": -1, "parallel.fsdp": 1, "parallel.tensor": 1,
                                     "train.batch_size": batch_size, "train.grad_accum_steps": 1})
    rt = build(cfg, tokenizer)
    params, _ = ckpts.restore_params(step, rt.restore_target.params)

    if cfg.data.source == "tfds" and not text_file:
        from lm.data import eval_batches

        batches = eval_batches(cfg.data, tokenizer, cfg.train.seq_len, batch_size, split)
    else:
        batches = _text_batches(cfg, tokenizer, text_file, stride, batch_size)

    total_loss, total_tokens, total_bytes = 0.0, 0.0, 0
    for batch in batches:
        total_bytes += int((tokenizer.byte_lengths(batch["targets"]) * batch["weights"]).sum())
        local = {k: v[host_rows(batch_size)] for k, v in batch.items()}
        loss_sum, weight_sum = rt.eval_step(params, rt.place_batch(local))
        total_loss, total_tokens = total_loss + float(loss_sum), total_tokens + float(weight_sum)
    ckpts.close()
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total_loss / math.log(2) / max(total_bytes, 1),
            "tokens": int(total_tokens), "step": int(step)}
