"""Corpora shipped inside the package, named in configs as `data.text_file=builtin:NAME`.

They are package data, so they are there after `pip install .` as after `pip install -e .`,
with no network. `lm data list` prints them. Each is checked against its SHA-256 when read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import pathlib

from lm.errors import LMError

SCHEME = "builtin:"


@dataclasses.dataclass(frozen=True)
class Corpus:
    file: str  # in lm/data/corpora/
    size: int  # bytes
    sha256: str
    description: str
    source: str


CORPORA = {
    "tinyshakespeare": Corpus(
        "tinyshakespeare.txt", 1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "Shakespeare's plays, 40,000 lines (the char-level benchmark of char-rnn and nanoGPT); public domain",
        "karpathy/char-rnn data/tinyshakespeare/input.txt"),
    "grimm_tales": Corpus(
        "grimm_tales.txt", 502_703, "44b717f3768ac6f2eaeb0442d1a22d227ac81bc1fab07c25c1118707fd2b3782",
        "Grimm's Fairy Tales, ed. Frances Jenkins Olcott (Penn Publishing, 1922); public domain",
        "Project Gutenberg eBook #52521, plain text"),
}


def is_packaged(text_file: str) -> bool:
    return text_file.startswith(SCHEME)


def path(text_file: str) -> pathlib.Path:
    """The file of `builtin:NAME`, checked against its recorded SHA-256."""
    name = text_file[len(SCHEME):]
    if name not in CORPORA:
        raise LMError(f"data.text_file={text_file} names no packaged corpus; choose one of "
                      f"{', '.join(SCHEME + n for n in CORPORA)} (lm data list).")
    return _checked(name)


@functools.cache
def _checked(name: str) -> pathlib.Path:
    corpus = CORPORA[name]
    file = pathlib.Path(str(importlib.resources.files("lm.data") / "corpora" / corpus.file))
    if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != corpus.sha256:
        raise LMError(f"the packaged corpus {file} is missing or damaged (its SHA-256 differs); reinstall lm "
                      "(pip install --force-reinstall -e .).")
    return file
