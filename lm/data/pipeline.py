"""The grain pipeline: tokenize documents, pack them into [B, T] rows, shuffle, shard, resume.

Each document becomes BOS + tokens + EOS; its inputs (all but the last id) and targets
(all but the first) are packed side by side into rows of T = seq_len by grain's
concat-then-split, so every target is scored exactly once, a document cut at a row end
continues in the next row (positions restarting at 0), and rows carry `segment_ids`
(attention never crosses documents) and `weights` (0 on padding).
"""

from __future__ import annotations

import signal
from typing import Any, Iterator

import numpy as np

from lm.config import DataConfig
from lm.data.corpus import document_text, open_split
from lm.data.tokenizers import BOS_ID, EOS_ID


class Tokenize:
    """Grain map: one record -> {"inputs", "targets"} of BOS + ids + EOS (picklable for workers)."""

    def __init__(self, tokenizer, text_key: str):
        self.tokenizer, self.text_key = tokenizer, text_key

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(document_text(record, self.text_key))
        seq = np.concatenate([[BOS_ID], ids, [EOS_ID]]).astype(np.int32)
        return {"inputs": seq[:-1], "targets": seq[1:]}


def to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed features -> the train step's batch keys."""
    return {"inputs": packed["inputs"], "targets": packed["targets"],
            "positions": packed["inputs_positions"], "segment_ids": packed["inputs_segment_ids"],
            "weights": (packed["targets_segment_ids"] != 0).astype(np.int32)}


def packed_rows(source, tokenizer, text_key: str, seq_len: int, *, seed: int | None = None,
                shard: tuple[int, int] = (0, 1)):
    """Packed rows of T = seq_len (grain's features); with a seed: shuffled, repeated forever; else one pass in order.

    `shard` = (index, count) keeps every count-th document (one share per host).
    """
    import grain

    ds = grain.MapDataset.source(source)[shard[0]::shard[1]]
    if seed is not None:
        ds = ds.seed(seed).shuffle().repeat()
    ds = ds.map(Tokenize(tokenizer, text_key)).to_iter_dataset()
    return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})


def packed_dataset(source, tokenizer, text_key: str, seq_len: int, batch_size: int, *,
                   seed: int | None = None, shard: tuple[int, int] = (0, 1), workers: int = 0):
    """Batches of packed rows (`packed_rows`), the last one short in a single pass;
    `workers` > 0 runs tokenization and packing in that many processes."""
    rows = packed_rows(source, tokenizer, text_key, seq_len, seed=seed, shard=shard)
    return in_workers(rows.batch(batch_size, drop_remainder=seed is not None).map(to_batch), workers)


def in_workers(ds, workers: int):
    """`ds` prefetched by `workers` processes (0: `ds` itself, run in this process)."""
    if not workers:
        return ds
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; take the defaults
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=ignore_interrupts)


def ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """In a worker process: Ctrl-C reaches the terminal's whole process group, but it is the trainer's to
    handle (it checkpoints, then ends the workers), not each worker's to die of."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def padded(batches, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Pads a short final batch with zero-weight rows, so every batch has batch_size rows."""
    for batch in batches:
        missing = batch_size - len(batch["inputs"])
        yield {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()} if missing else batch


def eval_batches(cfg: DataConfig, tokenizer, seq_len: int, batch_size: int,
                 split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every document of a split once, packed as in training, in full global batches."""
    source = open_split(cfg, split or cfg.eval_split)
    return padded(packed_dataset(source, tokenizer, cfg.text_key, seq_len, batch_size), batch_size)


def leading_eval_batches(cfg: DataConfig, tokenizer, seq_len: int, batch_size: int, count: int,
                         host_rows) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of the first `count` batches of `eval_batches` (the same every time)."""
    for i, batch in enumerate(eval_batches(cfg, tokenizer, seq_len, batch_size)):
        if i == count:
            return
        yield {k: v[host_rows(batch_size)] for k, v in batch.items()}


def from_json_state(state: Any) -> Any:
    """Undoes what JSON does to grain's iterator state: concat-then-split compares its
    `remainder_slices` with the tuple (-1, -1), so the lists JSON gives back become tuples."""
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else from_json_state(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [from_json_state(v) for v in state]
    return state
