"""Exact evaluation: every token of a text scored once; loss, perplexity, bits-per-byte (of each mixture source too)."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from lm.data import eval_batches
from lm.data.mixture import naming, source_configs
from lm.data.text import read_text, split_text
from lm.errors import LMError
from lm.training.restore import load_params, open_run


def eval_windows(tokens: np.ndarray, seq_len: int, stride: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Windows of `seq_len` targets; each target after the first token is weighted once.

    With stride == seq_len (the default) windows do not overlap. A smaller stride gives
    sliding-window scoring: each later window scores only its last `stride` targets,
    each with up to seq_len - 1 tokens of context.
    """
    stride = seq_len if stride is None else stride
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
    elif not cfg.data.text_file:
        raise LMError(f"run '{cfg.run_dir}' names no text to score (its data.text_file is empty, as after lm hf "
                      "import); pass --text_file FILE to score a UTF-8 text file.")
    else:
        text = split_text(read_text(cfg.data), cfg.data.val_fraction)[1]
    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise LMError("the evaluation text has fewer than 2 tokens; pass a longer --text_file.")
    next(eval_windows(tokens, cfg.train.seq_len, stride))  # checks --stride now, before restoring anything
    return _batches(eval_windows(tokens, cfg.train.seq_len, stride), batch_size)


def evaluate(run_dir: str, step: int | str | None = None, text_file: str | None = None,
             stride: int | None = None, split: str | None = None) -> dict:
    """Scores the run's validation split (or `text_file`) with its checkpoint at `step` (default newest;
    "best": the lowest validation loss kept, lm.training.restore.open_run).

    With data.source=tfds the documents of `split` (default data.eval_split) are packed as
    in training and every token is scored once (`stride` does not apply). With
    data.source=mixture each source's split is scored so, and `sources` holds each one's
    figures beside the overall ones (all tokens together).
    """
    opened = open_run(run_dir, step)
    cfg, tokenizer = opened.cfg, opened.tokenizer
    _check_flags(cfg, text_file, stride, split)
    batch_size = cfg.train.batch_size
    if text_file or not cfg.data.packed:
        sets = {None: _text_batches(cfg, tokenizer, text_file, stride, batch_size)}  # checks text and stride first
    elif cfg.data.source == "mixture":
        sets = {}
        for name, data in source_configs(cfg.data).items():
            with naming(name):
                sets[name] = eval_batches(data, tokenizer, cfg.train.seq_len, batch_size, split)
    else:
        sets = {None: eval_batches(cfg.data, tokenizer, cfg.train.seq_len, batch_size, split)}
    run = load_params(opened)
    sums = {name: _score(run, batches, batch_size) for name, batches in sets.items()}
    result = {**_figures(*(sum(column) for column in zip(*sums.values()))), "step": int(run.step)}
    if None not in sums:
        result["sources"] = {name: _figures(*totals) for name, totals in sums.items()}
    return result


def _check_flags(cfg, text_file: str | None, stride: int | None, split: str | None) -> None:
    """Refuses a flag that would change nothing: --split scores a split of packed documents, --stride slides
    over one text."""
    if split is not None and text_file:
        raise LMError("--split picks a split of a run's documents, but --text_file scores the file given instead; "
                      "drop one of them.")
    if split is not None and not cfg.data.packed:
        raise LMError(f"--split picks a split of a data.source=tfds or mixture run, but this run reads "
                      f"data.source={cfg.data.source}, whose validation text is the last data.val_fraction of "
                      "data.text_file; drop --split (or pass --text_file FILE).")
    if stride is not None and not text_file and cfg.data.packed:
        raise LMError(f"--stride slides over one text, but this run's data.source={cfg.data.source} scores packed "
                      "documents, each token once; drop --stride, or pass --text_file FILE to score a text with it.")


def _score(run, batches, batch_size: int) -> tuple[float, float, int]:
    """(summed loss, tokens scored, UTF-8 bytes of their targets) over `batches`."""
    rt, params, tokenizer = run.runtime, run.params, run.tokenizer
    total_loss, total_tokens, total_bytes = 0.0, 0.0, 0
    for batch in batches:
        total_bytes += int((tokenizer.byte_lengths(batch["targets"]) * batch["weights"]).sum())
        local = {k: v[rt.host_rows(batch_size)] for k, v in batch.items()}
        loss_sum, weight_sum = rt.eval_step(params, rt.place_batch(local))
        total_loss, total_tokens = total_loss + float(loss_sum), total_tokens + float(weight_sum)
    return total_loss, total_tokens, total_bytes


def _figures(total_loss: float, total_tokens: float, total_bytes: int) -> dict:
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total_loss / math.log(2) / max(total_bytes, 1), "tokens": int(total_tokens)}
