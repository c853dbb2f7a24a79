"""A pretrained model's own tokenizer, carried into a run: HF `tokenizer.json` or SentencePiece `tokenizer.model`.

`lm.hf import` copies the file into the run directory as `hf_tokenizer.json` or
`hf_tokenizer.model` and records `{"kind": "hf", "file": ..., "eos_ids": [...]}` in `tokenizer.json`
(the model's end ids, which the import reads from the model's generation_config.json / config.json).
Both files are data (JSON, protobuf); loading them executes nothing.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from lm import storage
from lm.errors import LMError

SOURCE_FILES = ("tokenizer.json", "tokenizer.model")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _import_error(package: str) -> LMError:
    return LMError(f"this run's tokenizer needs the '{package}' package; install it with pip install -e '.[hf]'.")


class HFTokenizer:
    """Wraps a `tokenizers.Tokenizer` (tokenizer.json) or a `sentencepiece` model (tokenizer.model)."""

    kind = "hf"

    def __init__(self, path: str | pathlib.Path, eos_ids: tuple[int, ...] = ()):
        self.path = storage.path(path)  # read as bytes: it may be in a bucket
        self.file = self.path.name
        self.eos_ids = tuple(eos_ids)  # the model's end ids (lm.hf import records them)
        try:
            if self.path.suffix == ".json":
                try:
                    from tokenizers import Tokenizer
                except ImportError:
                    raise _import_error("tokenizers") from None
                text = self.path.read_text(encoding="utf-8")
                self._tok = Tokenizer.from_str(text)
                self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
                pieces = [self._tok.id_to_token(i) or "" for i in range(self.vocab_size)]
                special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
                byte_level = '"ByteLevel"' in text
            else:
                try:
                    import sentencepiece
                except ImportError:
                    raise _import_error("sentencepiece") from None
                self._tok = sentencepiece.SentencePieceProcessor(model_proto=self.path.read_bytes())
                self.vocab_size = self._tok.get_piece_size()
                pieces = [self._tok.id_to_piece(i) for i in range(self.vocab_size)]
                special = {p for i, p in enumerate(pieces) if self._tok.is_control(i) or self._tok.is_unknown(i)}
                byte_level = False
        except LMError:
            raise
        except Exception as e:  # the libraries raise their own types for unreadable files
            raise LMError(f"cannot read tokenizer '{self.path}' ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                          "pass a valid tokenizer.json or SentencePiece tokenizer.model.") from None
        self._bytes_V = np.array([_piece_bytes(p, p in special, byte_level) for p in pieces], np.int64)

    def encode(self, text: str) -> np.ndarray:
        if self.path.suffix == ".json":
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self._tok.encode(text)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tok.decode(ids)

    def byte_lengths(self, ids) -> np.ndarray:
        """UTF-8 bytes of text each id stands for (0 for special ids), from the token's piece."""
        return self._bytes_V[np.clip(np.asarray(ids), 0, self.vocab_size - 1)]

    @property
    def bos_id(self) -> int | None:
        """The id the tokenizer begins a text with (a tokenizer.json's post-processor, e.g. Llama's
        <|begin_of_text|>; a SentencePiece model's bos id), or None."""
        if self.path.suffix != ".json":
            return self._tok.bos_id() if self._tok.bos_id() >= 0 else None
        ids = self._tok.encode("", add_special_tokens=True).ids
        return ids[0] if ids and ids[0] not in self.eos_ids else None

    def declared_eos_ids(self) -> tuple[int, ...]:
        """The EOS token the tokenizer files name: `eos_token` of the tokenizer_config.json beside a
        tokenizer.json, or a SentencePiece model's eos id; () when they name none."""
        if self.path.suffix != ".json":
            return (self._tok.eos_id(),) if self._tok.eos_id() >= 0 else ()
        try:
            token = json.loads((self.path.parent / "tokenizer_config.json").read_text(encoding="utf-8"))["eos_token"]
        except (OSError, ValueError, KeyError, TypeError):
            return ()
        token = token.get("content") if isinstance(token, dict) else token
        eos = self._tok.token_to_id(token) if isinstance(token, str) else None
        return () if eos is None else (eos,)

    def to_json(self) -> dict:
        return {"kind": self.kind, "file": self.file, "vocab_size": self.vocab_size, "eos_ids": list(self.eos_ids)}


def _piece_bytes(piece: str, special: bool, byte_level: bool) -> int:
    if special:
        return 0
    if byte_level:  # GPT-2 style: each character of a piece stands for one byte
        return len(piece)
    if _BYTE_PIECE.match(piece):  # SentencePiece byte fallback
        return 1
    return len(piece.replace("\u2581", " ").encode("utf-8"))


def find_source(hf_dir: pathlib.Path) -> pathlib.Path | None:
    """The tokenizer file shipped in a Hugging Face model directory, if any."""
    for name in SOURCE_FILES:
        if (hf_dir / name).is_file():
            return hf_dir / name
    return None


def install(tokenizer: HFTokenizer, run_dir: pathlib.Path) -> HFTokenizer:
    """Copies the tokenizer's file into run_dir as hf_tokenizer.json / .model and returns the copy."""
    target = run_dir / f"hf_tokenizer{tokenizer.path.suffix}"
    target.write_bytes(tokenizer.path.read_bytes())
    return HFTokenizer(target, tokenizer.eos_ids)


def load(run_dir: pathlib.Path, spec: dict) -> HFTokenizer:
    """Reopens the tokenizer a run recorded in its tokenizer.json."""
    file, eos_ids = spec.get("file"), spec.get("eos_ids", [])
    if not isinstance(file, str) or "/" in file or not (run_dir / file).is_file():
        raise LMError(f"run '{run_dir}' names tokenizer file {file!r}, which is missing; "
                      "import the model again with python -m lm.hf import.")
    if not isinstance(eos_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
        raise LMError(f"run '{run_dir}' records eos_ids {eos_ids!r} in tokenizer.json, not a list of ids; "
                      "restore the file or import the model again.")
    return HFTokenizer(run_dir / file, tuple(eos_ids))
