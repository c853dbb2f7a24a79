"""Training data behind one small interface, and the tokenizer a run uses.

`make_data(cfg, tokenizer)` returns a source with:
  batch(step) -> this host's rows of global batch `step` (numpy dict),
  state() -> JSON position saved in every checkpoint, restore(state),
  val_batches(batch_size) -> the fixed batches of the in-training validation estimate.

`data.source=text_file` samples random windows of one file (stateless: a batch is a
function of seed and step); `data.source=tfds` packs documents of a TFDS dataset (own
corpus or named) through grain (lm/data/pipeline.py), resuming from the saved state.
tensorflow-datasets, grain and sentencepiece are imported only when used.
"""

from __future__ import annotations

import pathlib
from typing import Iterator

import jax
import numpy as np

from lm import sharding
from lm.config import Config, DataConfig
from lm.errors import LMError
from lm.text_data import TRAIN_STREAM, VAL_STREAM, TextData, random_windows, read_text, split_text
from lm.tokenizer import TOKENIZER_FILE, load_tokenizer, make_tokenizer

SAMPLE_CHARS = 10_000_000  # SentencePiece trains on at most this much training text


class WindowData:
    """data.source=text_file: random windows of one text file."""

    def __init__(self, cfg: Config, tokenizer, host_rows):
        self.cfg, self.tokenizer, self.host_rows = cfg, tokenizer, host_rows
        self.text = TextData.load(cfg.data, tokenizer, cfg.train.seq_len)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        t = self.cfg.train
        return random_windows(self.text.train, self.cfg.seed, step, TRAIN_STREAM, t.batch_size, t.seq_len,
                              self.host_rows(t.batch_size))

    def state(self) -> dict:
        return {}

    def restore(self, state: dict | None) -> None:
        pass

    def val_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.cfg.eval.batches):
            yield random_windows(self.text.val, self.cfg.seed, i, VAL_STREAM, batch_size, self.cfg.train.seq_len,
                                 self.host_rows(batch_size))


class PackedData:
    """data.source=tfds: shuffled, packed documents of the train split; this host's share."""

    def __init__(self, cfg: Config, tokenizer, host_rows):
        from lm.data.corpus import open_split
        from lm.data.pipeline import packed_dataset

        self.cfg, self.tokenizer, self.host_rows = cfg, tokenizer, host_rows
        self.dataset = packed_dataset(
            open_split(cfg.data, cfg.data.train_split), tokenizer, cfg.data.text_key, cfg.train.seq_len,
            len(host_rows(cfg.train.batch_size)), seed=cfg.seed,
            shard=(jax.process_index(), jax.process_count()), workers=cfg.data.workers)
        self.iterator = iter(self.dataset)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def state(self) -> dict:
        return self.iterator.get_state()

    def restore(self, state: dict | None) -> None:
        from lm.data.pipeline import from_json_state

        if state is None:
            raise LMError("this run's checkpoint holds no data position (it was trained with data.source=text_file); "
                          "use that source or a new run_dir.")
        self.iterator.set_state(from_json_state(state))

    def val_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """The first eval.batches batches of the eval split, in order (the same every time)."""
        for i, batch in enumerate(eval_batches(self.cfg.data, self.tokenizer, self.cfg.train.seq_len, batch_size)):
            if i == self.cfg.eval.batches:
                return
            yield {k: v[self.host_rows(batch_size)] for k, v in batch.items()}


def eval_batches(cfg: DataConfig, tokenizer, seq_len: int, batch_size: int,
                 split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every document of a split once, packed as in training, in full global batches."""
    from lm.data.corpus import open_split
    from lm.data.pipeline import packed_dataset, padded

    source = open_split(cfg, split or cfg.eval_split)
    return padded(packed_dataset(source, tokenizer, cfg.text_key, seq_len, batch_size), batch_size)


def make_data(cfg: Config, tokenizer, host_rows=sharding.host_rows) -> WindowData | PackedData:
    """The configured source; `host_rows(batch_size)` gives the rows of a global batch this host loads."""
    source = PackedData if cfg.data.source == "tfds" else WindowData
    return source(cfg, tokenizer, host_rows)


def training_sample(cfg: Config) -> Iterator[str]:
    """Up to SAMPLE_CHARS of training text: documents in a seeded random order."""
    if cfg.data.source == "text_file":
        yield split_text(read_text(cfg.data), cfg.data.val_fraction)[0][:SAMPLE_CHARS]
        return
    from lm.data.corpus import document_text, open_split

    source = open_split(cfg.data, cfg.data.train_split)
    total = 0
    for i in np.random.default_rng(cfg.seed).permutation(len(source)):
        text = document_text(source[int(i)], cfg.data.text_key)
        yield text
        total += len(text)
        if total >= SAMPLE_CHARS:
            return


def run_tokenizer(cfg: Config, run_dir: pathlib.Path):
    """The run's tokenizer: the one saved in run_dir (resume or import), else made now (not saved yet)."""
    saved = run_dir / TOKENIZER_FILE
    if saved.is_file():
        tokenizer = load_tokenizer(run_dir)
        if tokenizer.kind == cfg.data.tokenizer:
            return tokenizer
    if cfg.data.tokenizer == "sentencepiece":
        from lm import sp_tokenizer

        if cfg.data.tokenizer_model:
            tokenizer = sp_tokenizer.SentencePieceTokenizer.from_file(cfg.data.tokenizer_model)
        else:
            tokenizer = sp_tokenizer.train(training_sample(cfg), cfg.data.vocab_size, cfg.data.spm_algorithm)
    else:
        tokenizer = make_tokenizer(cfg.data.tokenizer)
    return tokenizer
