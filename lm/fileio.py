"""Small files a run rewrites (config.yaml, tokenizer.json, metrics.jsonl), replaced atomically.

A process killed mid-write leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import pathlib
import tempfile


def write_atomic(path: str | pathlib.Path, text: str) -> None:
    """Writes `text` (UTF-8) to a temporary file beside `path`, syncs it, and renames it over `path`."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
