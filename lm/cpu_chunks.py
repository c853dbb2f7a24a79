"""How many passes a CPU step takes over each device's rows: chunks that fit the caches.

Taken whole, a 64 x 256 shakespeare_char batch holds [tokens, 4*d_model] activations and
[rows, heads, T, T] attention scores far larger than a CPU's caches. The same step walked
in chunks, summing gradients like `train.grad_accum_steps`, gives the same update (to float
rounding; dropout draws other masks) faster (README, "Cache-sized passes on CPU").
`parallel.cpu_chunk_tokens` bounds the tokens one device holds per pass; GPU and TPU steps
are never chunked.
"""

from __future__ import annotations

from lm.config import Config


def pass_count(rows: int, seq_len: int, max_tokens: int) -> int:
    """Fewest equal whole-row passes over `rows` rows with at most `max_tokens` tokens each.

    A pass holds one row at least; `max_tokens=0` means one pass.
    """
    if max_tokens <= 0:
        return 1
    return next(n for n in range(1, rows + 1)
                if rows % n == 0 and (rows // n * seq_len <= max_tokens or n == rows))


def chunk_tokens(cfg: Config, platform: str) -> int:
    """The per-device token bound of one pass on `platform` (0: no chunking, off the CPU)."""
    return cfg.parallel.cpu_chunk_tokens if platform == "cpu" else 0


def train_passes(cfg: Config, platform: str, batch_ways: int) -> int:
    """Micro-batches per update: `train.grad_accum_steps`, each chunked on CPU.

    `batch_ways` is how many ways the batch is split over devices.
    """
    t = cfg.train
    rows = t.batch_size // t.grad_accum_steps // batch_ways
    return t.grad_accum_steps * pass_count(rows, t.seq_len, chunk_tokens(cfg, platform))
