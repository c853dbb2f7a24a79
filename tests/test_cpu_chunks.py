"""lm.cpu_chunks: a CPU step walked in chunks makes the update and evaluation of the whole batch."""

import jax
import numpy as np
import pytest

from lm.parallel.cpu import pass_count, train_passes
from lm.training.runtime import build
from lm.data.text import TRAIN_STREAM, TextData, random_windows
from lm.data.tokenizers import ByteTokenizer


@pytest.mark.parametrize("rows, seq_len, max_tokens, expected", [
    (32, 256, 1024, 8),  # shakespeare_char on 2 devices: 4 rows of 256 per pass
    (6, 64, 1024, 1),  # shakespeare_cpu on 2 devices fits in one pass
    (12, 256, 1000, 4),  # 3 rows would be 768 tokens; 4 rows (1024) are over the bound
    (4, 2048, 1024, 4),  # a row longer than the bound still goes one row at a time
    (7, 256, 1024, 7),  # a prime count of rows: 7 passes of one row, not uneven ones
    (32, 256, 0, 1),  # 0 turns chunking off
])
def test_pass_counts(rows, seq_len, max_tokens, expected):
    assert pass_count(rows, seq_len, max_tokens) == expected


def test_train_passes_chunk_only_on_cpu_and_multiply_accumulation(tiny_config):
    cfg = tiny_config("train.batch_size=64", "train.seq_len=64", "train.grad_accum_steps=2",
                      "parallel.cpu_chunk_tokens=256")
    # 64 rows / 2 micro-batches / 2 devices = 16 rows of 64 tokens: 4 passes of 4 rows each.
    assert train_passes(cfg, "cpu", batch_ways=2) == 2 * 4
    assert train_passes(cfg, "gpu", batch_ways=2) == 2
    assert train_passes(cfg, "tpu", batch_ways=1) == 2


def run_one_step(cfg, eval_rows: int = 8):
    """(runtime, loss, grad norm, params after one update, eval sums of the first `eval_rows` rows)."""
    tokenizer = ByteTokenizer()
    rt = build(cfg, tokenizer)
    tokens = TextData.load(cfg.data, tokenizer, cfg.train.seq_len).train
    rows = rt.host_rows(cfg.train.batch_size)
    local = random_windows(tokens, cfg.seed, 0, TRAIN_STREAM, cfg.train.batch_size, cfg.train.seq_len, rows)
    state = rt.init(jax.random.key(cfg.seed))
    sums = rt.eval_step(state.params, rt.place_batch({k: v[:eval_rows] for k, v in local.items()}))
    state, metrics = rt.train_step(state, rt.place_batch(local))
    return rt, float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params), sums


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_chunked_step_matches_the_whole_batch(tiny_config, mode):
    whole = run_one_step(tiny_config(f"parallel.mode={mode}", "parallel.cpu_chunk_tokens=0"))
    chunked = run_one_step(tiny_config(f"parallel.mode={mode}", "parallel.cpu_chunk_tokens=64"))  # 8 x 32: 4 passes
    assert (whole[0].train_passes, chunked[0].train_passes) == (1, 4)
    assert "passes" not in whole[0].describe()
    assert chunked[0].describe().endswith(" | 4 passes of 2 x 32 tokens per device")
    np.testing.assert_allclose(chunked[1:3], whole[1:3], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), chunked[3], whole[3])
    np.testing.assert_allclose(chunked[4], whole[4], rtol=1e-5)
    assert float(whole[4][1]) == 8 * 32  # every target counted once


def test_passes_are_in_the_compiled_steps(tiny_config):
    """Dropout shows the train passes (each draws its own masks); the eval step's loop shows its own."""
    def losses(*overrides):
        return run_one_step(tiny_config("model.dropout=0.1", *overrides))[1]

    chunked = losses("parallel.cpu_chunk_tokens=64")
    assert chunked == losses("parallel.cpu_chunk_tokens=0", "train.grad_accum_steps=4")
    assert chunked != losses("parallel.cpu_chunk_tokens=0")
    rt = build(tiny_config("parallel.cpu_chunk_tokens=64"), ByteTokenizer())
    params = rt.init(jax.random.key(0)).params
    for rows, loops in ((8, True), (2, False)):  # 8 x 32 tokens: 4 passes of 64; 2 x 32 fit one pass
        batch = {name: np.zeros((rows, 32), np.int32) for name in ("inputs", "targets")}
        assert ("stablehlo.while" in rt.eval_step.lower(params, batch).as_text()) == loops, rows


def test_eval_step_takes_batches_of_any_size(tiny_config):
    """The eval pass count follows the batch it is given, not only eval.batch_size."""
    chunked = run_one_step(tiny_config("parallel.cpu_chunk_tokens=64", "eval.batch_size=12"), eval_rows=6)
    whole = run_one_step(tiny_config("parallel.cpu_chunk_tokens=0"), eval_rows=6)
    np.testing.assert_allclose(chunked[4], whole[4], rtol=1e-5)
    assert float(chunked[4][1]) == 6 * 32
