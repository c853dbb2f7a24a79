"""One text file as data (packaged, local or fetched): a 90/10 character split and random training windows.

A training batch is a pure function of (seed, step): `seq_len + 1`-token windows at
random offsets. Resuming needs no iterator state and never repeats or skips data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import urllib.parse
import urllib.request

import numpy as np

from lm.config import DataConfig
from lm.data import packaged
from lm.errors import LMError

TRAIN_STREAM, VAL_STREAM = 0, 1


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, sha256: str, cache_dir: str) -> pathlib.Path:
    """Downloads `url` once into `cache_dir` (atomically), checking its SHA-256 when given (either case)."""
    sha256 = sha256.lower()
    name = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name or "data.txt"
    key = sha256[:16] if sha256 else hashlib.sha256(url.encode()).hexdigest()[:16]
    cache = pathlib.Path(cache_dir).expanduser() / key
    target = cache / name
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                out.write(response.read())
            os.replace(tmp, target)
        except OSError as e:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise LMError(f"could not download data.text_file={url} ({e}); "
                          "check the address or pass a local file with data.text_file=PATH.") from None
    if sha256 and _sha256(target) != sha256:
        raise LMError(f"{target} (from {url}) does not match data.sha256={sha256}; "
                      "delete it to download again, or fix data.sha256.")
    return target


def text_path(text_file: str, sha256: str = "", cache_dir: str = "~/.cache/lm") -> pathlib.Path:
    """The local file behind a data.text_file: a packaged corpus (builtin:NAME), a fetched URL, or a path."""
    if packaged.is_packaged(text_file):
        return packaged.path(text_file)
    if urllib.parse.urlparse(text_file).scheme in ("http", "https", "file"):
        return fetch(text_file, sha256, cache_dir)
    return pathlib.Path(text_file).expanduser()


def read_text(cfg: DataConfig) -> str:
    """Reads data.text_file (packaged, a path or a URL) as UTF-8, rejecting missing, empty or binary files."""
    if not cfg.text_file:
        raise LMError("no training data: set data.text_file=PATH to a UTF-8 text file "
                      "(or builtin:tinyshakespeare, see lm data list).")
    path = text_path(cfg.text_file, cfg.sha256, cfg.cache_dir)
    return read_utf8(path, f"data.text_file '{path}'")


def read_utf8(path: pathlib.Path, what: str) -> str:
    """The UTF-8 text of `path` (`what` names it in the message when it is missing, empty or binary)."""
    if not path.is_file():
        raise LMError(f"{what} does not exist or is not a file; pass a UTF-8 text file.")
    raw = path.read_bytes()
    if not raw.strip():
        raise LMError(f"{what} is empty; pass a file with text in it.")
    if b"\x00" in raw:
        raise LMError(f"{what} looks binary (it holds NUL bytes); pass a UTF-8 text file.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LMError(f"{what} is not UTF-8 (bad byte at offset {e.start}); convert it to UTF-8 first.") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters train, the rest validate (nanoGPT's split)."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def random_windows(tokens: np.ndarray, seed: int, step: int, stream: int, batch_size: int,
                   seq_len: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Batch `step` of a stream: `batch_size` random windows; `rows` picks this host's share."""
    rng = np.random.default_rng([seed, stream, step])
    starts_B = rng.integers(0, len(tokens) - seq_len, size=batch_size)[rows]
    windows = tokens[starts_B[:, None] + np.arange(seq_len + 1)]
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


@dataclasses.dataclass(frozen=True)
class TextData:
    """Token arrays of the train and validation splits of one text file."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def load(cls, cfg: DataConfig, tokenizer, seq_len: int) -> "TextData":
        train_text, val_text = split_text(read_text(cfg), cfg.val_fraction)
        data = cls(tokenizer.encode(train_text), tokenizer.encode(val_text))
        shortest = min(len(data.train), len(data.val))
        if shortest <= seq_len + 1:
            raise LMError(f"data.text_file '{cfg.text_file}' is too short: its smaller split has {shortest} tokens, "
                          f"but train.seq_len={seq_len} needs more than {seq_len + 1}; "
                          "use a longer file or a smaller train.seq_len.")
        return data
