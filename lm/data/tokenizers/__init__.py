"""Tokenizers behind one Protocol, saved beside each run as `tokenizer.json` so evaluation never guesses.

- `byte` (byte.py): UTF-8 bytes, ids 0 PAD, 1 BOS, 2 EOS, byte b = id b + 3 (vocabulary 259).
- `sentencepiece` (sentencepiece.py): BPE or unigram trained on the run's data, the same
  PAD/BOS/EOS ids, its model saved as `tokenizer.model` beside `tokenizer.json`.
- `hf` (hf.py): an imported model's own tokenizer.json or tokenizer.model.

Every file is read as data (JSON, protobuf); loading a tokenizer executes nothing.
"""

from __future__ import annotations

import json
import pathlib
from typing import Protocol

import numpy as np

from lm import storage
from lm.data.tokenizers.byte import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer
from lm.errors import LMError
from lm.rundir import TOKENIZER_FILE

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "ByteTokenizer", "Tokenizer", "load_tokenizer", "make_tokenizer",
           "save_tokenizer"]


class Tokenizer(Protocol):
    """What the data pipeline, evaluation and generation need of a tokenizer."""

    kind: str  # data.tokenizer: byte, sentencepiece or hf
    vocab_size: int
    eos_ids: tuple[int, ...]  # ids that end a document (and stop generation); () if it has none
    bos_id: int | None  # the id that begins a document (an empty prompt starts there); None if it has none

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def byte_lengths(self, ids) -> np.ndarray:
        """UTF-8 bytes of original text each id stands for (0 for special ids): bits-per-byte."""
        ...

    def to_json(self) -> dict:
        """The `tokenizer.json` record (kind, vocab_size, and the file it reads)."""
        ...


def make_tokenizer(kind: str) -> ByteTokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        raise LMError("data.tokenizer=hf is a pretrained model's tokenizer; create the run with "
                      "python -m lm.hf import HF_DIR RUN_DIR, then train with --config RUN_DIR/config.yaml.")
    raise LMError(f"unknown tokenizer '{kind}'; set data.tokenizer=byte or sentencepiece.")


def save_tokenizer(tokenizer: Tokenizer, run_dir: str | pathlib.Path) -> None:
    if tokenizer.kind == "sentencepiece":
        tokenizer.save(run_dir)
    storage.write_atomic(storage.path(run_dir, "run_dir") / TOKENIZER_FILE, json.dumps(tokenizer.to_json(), indent=2))


def load_tokenizer(run_dir: str | pathlib.Path) -> Tokenizer:
    """Reads `run_dir/tokenizer.json` (plain JSON; nothing in it is executed)."""
    run_dir = storage.path(run_dir, "run_dir")
    path = run_dir / TOKENIZER_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        kind = spec["kind"]
    except FileNotFoundError:
        raise LMError(f"'{path}' is missing; train.py writes it, so pass the run_dir of a training run.") from None
    except (ValueError, KeyError, TypeError):
        raise LMError(f"'{path}' is not a valid tokenizer file; restore it from the run that wrote it.") from None
    if kind == "hf":
        from lm.data.tokenizers import hf

        return hf.load(run_dir, spec)
    if kind == "sentencepiece":
        from lm.data.tokenizers.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer.from_file(path.parent / spec.get("model_file", ""))
    return make_tokenizer(kind)
