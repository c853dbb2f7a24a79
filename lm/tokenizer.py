"""Tokenizers, saved beside each run as `tokenizer.json` so evaluation never guesses.

Byte-level ids: 0 PAD, 1 BOS, 2 EOS, then byte b is id b + 3 (vocabulary 259).
SentencePiece (lm/sp_tokenizer.py) keeps the same PAD/BOS/EOS ids and saves its model
as `tokenizer.model` beside `tokenizer.json`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from lm.errors import LMError
from lm.fileio import write_atomic

TOKENIZER_FILE = "tokenizer.json"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids; every string round-trips exactly."""

    kind = "byte"
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        data = (ids[ids >= self.offset] - self.offset).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def byte_lengths(self, ids) -> np.ndarray:
        """Bytes of original text each id stands for (0 for special ids)."""
        return (np.asarray(ids) >= self.offset).astype(np.int64)

    def to_json(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


def make_tokenizer(kind: str) -> ByteTokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        raise LMError("data.tokenizer=hf is a pretrained model's tokenizer; create the run with "
                      "python -m lm.hf import HF_DIR RUN_DIR, then train with --config RUN_DIR/config.yaml.")
    raise LMError(f"unknown tokenizer '{kind}'; set data.tokenizer=byte or sentencepiece.")


def save_tokenizer(tokenizer: ByteTokenizer, run_dir: str | pathlib.Path) -> None:
    path = pathlib.Path(run_dir) / TOKENIZER_FILE
    if tokenizer.kind == "sentencepiece":
        tokenizer.save(run_dir)
    write_atomic(path, json.dumps(tokenizer.to_json(), indent=2))


def load_tokenizer(run_dir: str | pathlib.Path) -> ByteTokenizer:
    """Reads `run_dir/tokenizer.json` (plain JSON; nothing in it is executed)."""
    path = pathlib.Path(run_dir) / TOKENIZER_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        kind = spec["kind"]
    except FileNotFoundError:
        raise LMError(f"'{path}' is missing; train.py writes it, so pass the run_dir of a training run.") from None
    except (ValueError, KeyError, TypeError):
        raise LMError(f"'{path}' is not a valid tokenizer file; restore it from the run that wrote it.") from None
    if kind == "hf":
        from lm import hf_tokenizer

        return hf_tokenizer.load(pathlib.Path(run_dir), spec)
    if kind == "sentencepiece":
        from lm.sp_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer.from_file(path.parent / spec.get("model_file", ""))
    return make_tokenizer(kind)
