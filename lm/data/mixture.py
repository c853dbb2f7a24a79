"""data.source=mixture: packed rows of several sources, each source's share of training tokens set by its weight.

Every source is packed on its own, as data.source=tfds packs one (lm/data/pipeline.py: one
tokenizer, BOS/EOS, segment ids, shuffled and repeated forever), so every training row is
seq_len tokens of one source and a source's share of rows is its share of tokens. Row g of
this host (g = step * rows + r) comes from the source whose slice of [0, 1), cut in the
normalised weights, holds frac(u + g * phi): a golden-ratio sequence with a seeded offset u.
Each row is source i with probability w_i, and after n rows every source's count stays within
a few rows of w_i * n (a low-discrepancy sequence, not independent draws). The row sources are
a pure function of (seed, step); the position of every source's iterator, and the tokens
drawn from each, are the saved state, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Callable, Iterator

import jax
import numpy as np

from lm.config import Config, DataConfig
from lm.errors import LMError

GOLDEN = (5 ** 0.5 - 1) / 2  # phi - 1: the fractional step of the row sequence
MIXTURE_STREAM = 2  # the seed stream of the row sequence (0, 1: training and validation windows)


@contextlib.contextmanager
def naming(name: str):
    """Prefixes an LMError raised inside with the mixture source it concerns (none when `name` is empty)."""
    try:
        yield
    except LMError as e:
        if not name:
            raise
        raise LMError(f"data.mixture source '{name}': {e}") from None


def source_configs(data: DataConfig) -> dict[str, DataConfig]:
    """Each mixture source as a single-source (tfds) DataConfig; every named file is checked first."""
    from lm.data.corpus import corpus_files

    configs = {}
    for i, e in enumerate(data.mixture):
        configs[e.name] = dataclasses.replace(
            data, source="tfds", text_file="", sha256="", files=e.files, doc_separator=e.doc_separator,
            text_key=e.text_key, tfds_name=e.tfds_name, train_split=e.train_split, eval_split=e.eval_split,
            mixture=())
        if e.files:
            with naming(e.name):
                corpus_files(configs[e.name], f"data.mixture[{i}].files")
    return configs


def shares(data: DataConfig) -> np.ndarray:
    """The weights normalised to sum to 1: each source's expected share of the training tokens."""
    weights = np.array([e.weight for e in data.mixture], np.float64)
    return weights / weights.sum()


def row_sources(shares_S: np.ndarray, seed: int, step: int, rows: int) -> np.ndarray:
    """The source index of each of this host's `rows` rows of batch `step` (see the module docstring)."""
    offset = np.random.default_rng([seed, MIXTURE_STREAM]).random()
    x_R = (offset + (step * rows + np.arange(rows, dtype=np.float64)) * GOLDEN) % 1.0
    return np.minimum(np.searchsorted(np.cumsum(shares_S), x_R, side="right"), len(shares_S) - 1)


def source_seed(seed: int, name: str) -> int:
    """The shuffle seed of one source: from the run's seed and the source's name (not its place in the list)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


class MixtureData:
    """data.source=mixture: this host's rows, each packed from the source the row sequence picks."""

    def __init__(self, cfg: Config, tokenizer, host_rows: Callable[[int], np.ndarray]):
        from lm.data.corpus import open_split
        from lm.data.pipeline import in_workers, packed_rows, to_batch

        self.cfg, self.tokenizer, self.host_rows = cfg, tokenizer, host_rows
        self.configs = source_configs(cfg.data)
        self.source_names = cfg.data.source_names
        self.shares_S = shares(cfg.data)
        self.rows = len(host_rows(cfg.train.batch_size))
        self.iterators = {}
        for name, data in self.configs.items():
            with naming(name):
                open_split(data, data.eval_split)  # a missing validation split fails now, not at the first eval
                rows = packed_rows(open_split(data, data.train_split), tokenizer, data.text_key, cfg.train.seq_len,
                                   seed=source_seed(cfg.seed, name), shard=(jax.process_index(), jax.process_count()))
                self.iterators[name] = iter(in_workers(rows.map(to_batch), cfg.data.workers))
        self.tokens_by_source = {name: 0 for name in self.source_names}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        sources_R = row_sources(self.shares_S, self.cfg.seed, step, self.rows)
        rows = [next(self.iterators[self.source_names[s]]) for s in sources_R]
        batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        tokens_R = batch["weights"].sum(axis=1)
        for s, name in enumerate(self.source_names):
            # Every host reads the same row pattern (and training rows are full): global = local x hosts.
            self.tokens_by_source[name] += int(tokens_R[sources_R == s].sum()) * jax.process_count()
        return batch

    def state(self) -> dict:
        return {"sources": {name: it.get_state() for name, it in self.iterators.items()},
                "tokens": dict(self.tokens_by_source)}

    def restore(self, state: dict | None) -> None:
        from lm.data.pipeline import from_json_state

        if not isinstance(state, dict) or "sources" not in state:
            raise LMError("this run's checkpoint holds no mixture position (it was trained with another "
                          "data.source); use that source or a new run_dir.")
        if sorted(state["sources"]) != sorted(self.source_names):
            raise LMError(f"this run's checkpoint holds the data.mixture sources {', '.join(state['sources'])}, "
                          f"but this config names {', '.join(self.source_names)}; a resume continues each source "
                          "where it stopped, so use the run's source names or a new run_dir.")
        for name, it in self.iterators.items():
            it.set_state(from_json_state(state["sources"][name]))
        self.tokens_by_source = {name: int(state["tokens"][name]) for name in self.source_names}

    def val_batches(self, batch_size: int, source: str | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The first eval.batches batches of each source's eval split (of `source` only, when named)."""
        from lm.data.pipeline import leading_eval_batches

        for name in [source] if source else self.source_names:
            with naming(name):
                yield from leading_eval_batches(self.configs[name], self.tokenizer, self.cfg.train.seq_len,
                                                batch_size, self.cfg.eval.batches, self.host_rows)


def training_sample(cfg: Config, limit: int) -> Iterator[str]:
    """About `limit` characters of training text, each source's part in proportion to its weight:
    its documents in a seeded random order, repeated when the source is smaller than its part."""
    from lm.data.corpus import document_text, open_split

    for (name, data), share in zip(source_configs(cfg.data).items(), shares(cfg.data)):
        with naming(name):
            source = open_split(data, data.train_split)
        quota, total, rng = share * limit, 0, np.random.default_rng([cfg.seed, source_seed(cfg.seed, name)])
        while total < quota:
            before = total
            for i in rng.permutation(len(source)):
                text = document_text(source[int(i)], data.text_key)[:int(quota - total) + 1]
                yield text
                total += len(text)
                if total >= quota:
                    break
            if total == before:  # only empty documents
                break
