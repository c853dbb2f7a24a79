"""Byte-level tokenizer: UTF-8 bytes shifted past the special ids (0 PAD, 1 BOS, 2 EOS), vocabulary 259."""

from __future__ import annotations

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids; every string round-trips exactly."""

    kind = "byte"
    offset = 3
    vocab_size = 256 + offset
    eos_ids = (EOS_ID,)
    bos_id = BOS_ID

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
