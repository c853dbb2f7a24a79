"""How many passes a CPU step takes over each device's rows: chunks that fit the caches.

Taken whole, a 64 x 256 shakespeare_char batch holds [tokens, 4*d_model] activations and
[rows, heads, T, T] attention scores far larger than a CPU's caches. The same step walked
in chunks, summing gradients like `train.grad_accum_steps`, gives the same update (to float
rounding; dropout draws other masks) about 1.4x faster on 2 cores (README, "Against
PyTorch on CPU"). `parallel.cpu_chunk_tokens` bounds the tokens one device holds per pass;
GPU and TPU steps take the batch whole.
"""

from __future__ import annotations

from lm.config import Config


def chunks(rows: int, seq_len: int, max_tokens: int) -> int:
    """Fewest equal passes over `rows` rows with at most `max_tokens` tokens each (one row at least).

    `max_tokens=0` means one pass.
    """
    if max_tokens <= 0:
        return 1
    return next(n for n in range(1, rows + 1)
                if rows % n == 0 and (rows // n * seq_len <= max_tokens or n == rows))


def step_passes(cfg: Config, platform: str, batch_ways: int) -> tuple[int, int]:
    """(train passes, eval passes) for a batch split `batch_ways` ways over devices of `platform`.

    Train passes include `train.grad_accum_steps`: each of its micro-batches is chunked too.
    """
    t = cfg.train
    accum = t.grad_accum_steps
    if platform != "cpu":
        return accum, 1
    budget = cfg.parallel.cpu_chunk_tokens
    train_rows = t.batch_size // accum // batch_ways
    eval_rows = (cfg.eval.batch_size or t.batch_size) // batch_ways
    return accum * chunks(train_rows, t.seq_len, budget), chunks(eval_rows, t.seq_len, budget)
