"""The data layer: corpora and tokenizers in, host-sharded [B, T] int32 batches out.

    text (a local file, a packaged corpus, an http(s) URL, TFDS) -> tokenizer -> source -> batches

- sources.py: the `DataSource` Protocol, random windows of one text, packed TFDS documents.
- mixture.py: several packed sources, each row drawn from one by weight; per-source accounting.
- text.py: reading one text (packaged, local or fetched), its split, random windows.
- corpus.py, pipeline.py: own files or named datasets as TFDS array_record; grain packing.
- tokenizers/: byte, SentencePiece and imported Hugging Face tokenizers behind one Protocol.
"""

from __future__ import annotations

import pathlib
from typing import Iterator

import numpy as np

from lm.config import Config
from lm.data.pipeline import eval_batches
from lm.data.sources import DataSource, make_data
from lm.data.text import read_text, split_text
from lm.data.tokenizers import Tokenizer, load_tokenizer, make_tokenizer
from lm.rundir import TOKENIZER_FILE

__all__ = ["DataSource", "eval_batches", "make_data", "run_tokenizer", "training_sample"]

SAMPLE_CHARS = 10_000_000  # SentencePiece trains on at most this much training text


def training_sample(cfg: Config) -> Iterator[str]:
    """Up to SAMPLE_CHARS of training text: documents in a seeded random order (of a mixture: SAMPLE_CHARS,
    each source's part in proportion to its weight)."""
    if cfg.data.source == "mixture":
        from lm.data import mixture

        yield from mixture.training_sample(cfg, SAMPLE_CHARS)
        return
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


def run_tokenizer(cfg: Config, run_dir: pathlib.Path) -> Tokenizer:
    """The run's tokenizer: the one saved in run_dir (resume or import), else made now (not saved yet)."""
    saved = run_dir / TOKENIZER_FILE
    if saved.is_file():
        tokenizer = load_tokenizer(run_dir)
        if tokenizer.kind == cfg.data.tokenizer:
            return tokenizer
    if cfg.data.tokenizer == "sentencepiece":
        from lm.data.tokenizers import sentencepiece

        if cfg.data.tokenizer_model:
            tokenizer = sentencepiece.SentencePieceTokenizer.from_file(cfg.data.tokenizer_model)
        else:
            tokenizer = sentencepiece.train(training_sample(cfg), cfg.data.vocab_size, cfg.data.spm_algorithm)
    else:
        tokenizer = make_tokenizer(cfg.data.tokenizer)
    return tokenizer
