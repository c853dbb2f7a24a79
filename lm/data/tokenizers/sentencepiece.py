"""SentencePiece subword tokenizer (BPE or unigram), trained on a sample of the training text.

Ids are fixed: 0 PAD, 1 BOS, 2 EOS, 3 UNK (as the byte tokenizer: PAD 0, BOS 1, EOS 2).
Text is not normalised (identity rule, no dummy prefix, whitespace kept) and unknown
characters fall back to bytes, so every string round-trips exactly and each id stands for
a known number of bytes of the original text (what bits-per-byte needs).
"""

from __future__ import annotations

import io
import pathlib
from typing import Iterable

import numpy as np

from lm import storage
from lm.errors import LMError

MODEL_FILE = "tokenizer.model"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHUNK_CHARS = 4096  # SentencePiece trains on "sentences"; long texts are cut at line ends


def _chunks(texts: Iterable[str]) -> Iterable[str]:
    """Cuts texts into pieces of about CHUNK_CHARS characters at line boundaries."""
    for text in texts:
        piece = []
        size = 0
        for line in text.splitlines(keepends=True):
            piece.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                yield "".join(piece)
                piece, size = [], 0
        if piece:
            yield "".join(piece)


class SentencePieceTokenizer:
    """Wraps a SentencePiece model held as bytes (so it pickles into grain workers)."""

    kind = "sentencepiece"
    eos_ids = (EOS_ID,)
    bos_id = BOS_ID

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        special = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
        if special != (PAD_ID, BOS_ID, EOS_ID):
            raise LMError(f"the SentencePiece model has PAD/BOS/EOS ids {special}, but lm needs "
                          f"{(PAD_ID, BOS_ID, EOS_ID)}; train it with pad_id=0 bos_id=1 eos_id=2 unk_id=3, "
                          "or leave data.tokenizer_model empty to train one.")
        self.vocab_size = self._sp.vocab_size()
        self._bytes_V = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int64)

    def _piece_bytes(self, i: int) -> int:
        sp = self._sp
        if sp.is_control(i) or sp.is_unknown(i):
            return 0
        if sp.is_byte(i):
            return 1
        return len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    def __getstate__(self):
        return {"model_proto": self.model_proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def byte_lengths(self, ids) -> np.ndarray:
        """Bytes of original text each id stands for (0 for special ids)."""
        return self._bytes_V[np.asarray(ids)]

    def to_json(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "model_file": MODEL_FILE}

    def save(self, run_dir: str | pathlib.Path) -> None:
        (storage.path(run_dir, "run_dir") / MODEL_FILE).write_bytes(self.model_proto)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "SentencePieceTokenizer":
        path = storage.path(path).expanduser()
        if not path.is_file():
            raise LMError(f"SentencePiece model '{path}' does not exist; pass an existing .model file "
                          "or leave data.tokenizer_model empty to train one.")
        try:
            return cls(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise LMError(f"'{path}' is not a SentencePiece model ({str(e)[:100]}); pass a .model file.") from None


def train(texts: Iterable[str], vocab_size: int, algorithm: str) -> SentencePieceTokenizer:
    """Trains a lossless BPE or unigram model on `texts` (deterministic: one thread)."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_chunks(texts)), model_writer=model, vocab_size=vocab_size,
            model_type=algorithm, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=4 * CHUNK_CHARS, character_coverage=0.9995, num_threads=1,
            minloglevel=2)
    except RuntimeError as e:
        raise LMError(f"SentencePiece training failed ({str(e).splitlines()[0][:160]}); "
                      "lower data.vocab_size or use more training text.") from None
    return SentencePieceTokenizer(model.getvalue())

