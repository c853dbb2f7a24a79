"""lm.cpu_chunks: a CPU step walked in chunks makes the update and evaluation of the whole batch."""

import jax
import numpy as np
import pytest

from lm.cpu_chunks import chunks, step_passes
from lm.runtime import build
from lm.text_data import TRAIN_STREAM, TextData, random_windows
from lm.tokenizer import ByteTokenizer


@pytest.mark.parametrize("rows, seq_len, max_tokens, expected", [
    (32, 256, 1024, 8),  # shakespeare_char on 2 devices: 4 rows of 256 per pass
    (6, 64, 1024, 1),  # shakespeare_cpu on 2 devices fits in one pass
    (12, 256, 1000, 4),  # 3 rows would be 768 tokens; 4 rows (1024) are over the bound
    (4, 2048, 1024, 4),  # a row longer than the bound still goes one row at a time
    (7, 256, 1024, 7),  # a prime count of rows: 7 passes of one row, not uneven ones
    (32, 256, 0, 1),  # 0 turns chunking off
])
def test_chunk_counts(rows, seq_len, max_tokens, expected):
    assert chunks(rows, seq_len, max_tokens) == expected


def test_passes_chunk_only_on_cpu_and_multiply_accumulation(tiny_config):
    cfg = tiny_config("train.batch_size=64", "train.seq_len=64", "train.grad_accum_steps=2",
                      "eval.batch_size=16", "parallel.cpu_chunk_tokens=256")
    # 64 rows / 2 micro-batches / 2 devices = 16 rows of 64 tokens: 4 passes of 4 rows each.
    assert step_passes(cfg, "cpu", batch_ways=2) == (2 * 4, 2)
    assert step_passes(cfg, "gpu", batch_ways=2) == (2, 1)
    assert step_passes(cfg, "tpu", batch_ways=1) == (2, 1)


def run_one_step(cfg):
    """(runtime, loss, grad norm, params after one update, eval sums) on the first training batch."""
    tokenizer = ByteTokenizer()
    rt = build(cfg, tokenizer)
    tokens = TextData.load(cfg.data, tokenizer, cfg.train.seq_len).train
    rows = rt.host_rows(cfg.train.batch_size)
    batch = rt.place_batch(random_windows(tokens, cfg.seed, 0, TRAIN_STREAM, cfg.train.batch_size,
                                          cfg.train.seq_len, rows))
    state = rt.init(jax.random.key(cfg.seed))
    sums = rt.eval_step(state.params, batch)
    state, metrics = rt.train_step(state, batch)
    return rt, float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params), sums


def test_chunked_step_matches_the_whole_batch(tiny_config):
    whole = run_one_step(tiny_config("parallel.cpu_chunk_tokens=0"))
    chunked = run_one_step(tiny_config("parallel.cpu_chunk_tokens=64"))  # 8 rows x 32 tokens -> 4 passes
    assert (whole[0].train_passes, chunked[0].train_passes, chunked[0].eval_passes) == (1, 4, 4)
    assert whole[0].describe_passes() == ""
    assert chunked[0].describe().endswith(" | 4 passes of 2 x 32 tokens per device")
    np.testing.assert_allclose(chunked[1:3], whole[1:3], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), chunked[3], whole[3])
    np.testing.assert_allclose(chunked[4], whole[4], rtol=1e-5)
    assert float(whole[4][1]) == 8 * 32  # every target counted once
