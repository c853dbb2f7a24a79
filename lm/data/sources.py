"""Training data behind one Protocol: random windows of one text, packed documents of a TFDS dataset, or a mixture.

`data.source=text_file` samples random windows of one file (stateless: a batch is a
function of seed and step); `data.source=tfds` packs documents of a TFDS dataset (own
corpus or named) through grain (lm/data/pipeline.py), resuming from the saved state;
`data.source=mixture` packs several such sources and draws each row from one of them by
weight (lm/data/mixture.py). tensorflow-datasets and grain are imported only when used.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import jax
import numpy as np

from lm.config import Config
from lm.data.mixture import MixtureData
from lm.data.pipeline import leading_eval_batches
from lm.data.text import TRAIN_STREAM, VAL_STREAM, TextData, random_windows
from lm.data.tokenizers import Tokenizer
from lm.errors import LMError

Batch = dict[str, np.ndarray]
HostRows = Callable[[int], np.ndarray]  # global batch size -> the rows this host loads


class DataSource(Protocol):
    """What the training loop reads batches from."""

    tokenizer: Tokenizer
    source_names: tuple[str, ...]  # a mixture's sources; () for a single source
    tokens_by_source: dict[str, int]  # cumulative training tokens per source name, all hosts ({}: single source)

    def batch(self, step: int) -> Batch:
        """This host's rows of global batch `step`: inputs, targets (and weights, positions, segment_ids)."""
        ...

    def state(self) -> dict:
        """The position to save in a checkpoint (JSON)."""
        ...

    def restore(self, state: dict | None) -> None:
        """Continues from a position `state()` returned."""
        ...

    def val_batches(self, batch_size: int, source: str | None = None) -> Iterator[Batch]:
        """The fixed batches of the in-training validation estimate (this host's rows); of one source when named."""
        ...


class WindowData:
    """data.source=text_file: random windows of one text file."""

    source_names, tokens_by_source = (), {}

    def __init__(self, cfg: Config, tokenizer: Tokenizer, host_rows: HostRows):
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

    def val_batches(self, batch_size: int, source: str | None = None) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.cfg.eval.batches):
            yield random_windows(self.text.val, self.cfg.seed, i, VAL_STREAM, batch_size, self.cfg.train.seq_len,
                                 self.host_rows(batch_size))


class PackedData:
    """data.source=tfds: shuffled, packed documents of the train split; this host's share."""

    source_names, tokens_by_source = (), {}

    def __init__(self, cfg: Config, tokenizer: Tokenizer, host_rows: HostRows):
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

    def val_batches(self, batch_size: int, source: str | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The first eval.batches batches of the eval split, in order (the same every time)."""
        return leading_eval_batches(self.cfg.data, self.tokenizer, self.cfg.train.seq_len, batch_size,
                                    self.cfg.eval.batches, self.host_rows)


def make_data(cfg: Config, tokenizer: Tokenizer, host_rows: HostRows = np.arange) -> DataSource:
    """The configured source; `host_rows(batch_size)` gives the rows of a global batch this host loads
    (the runtime's `host_rows`; by default all of them, as in a single process)."""
    source = {"text_file": WindowData, "tfds": PackedData, "mixture": MixtureData}[cfg.data.source]
    return source(cfg, tokenizer, host_rows)
