"""JSON every parser accepts: non-finite floats become null, and a `nonfinite` field says which were what.

Python's json writes NaN and Infinity, which are not JSON (JavaScript's JSON.parse, Go and Rust reject
them). Everything lm prints with --json and every metrics.jsonl line goes through `dumps`:

    dumps({"step": 7, "loss": float("nan")})  ->  {"step": 7, "loss": null, "nonfinite": {"loss": "nan"}}

A nested value is named by its dotted path ("sources.web.loss", "rows.0.with_cache").
"""

from __future__ import annotations

import json
import math

NONFINITE = "nonfinite"  # {dotted path: "nan" | "inf" | "-inf"}, present only when something was replaced


def without_nonfinite(value, found: dict[str, str], path: str = ""):
    """`value` with every non-finite float, in dicts and lists at any depth, replaced by None;
    each replacement recorded in `found` under its dotted path."""
    if isinstance(value, float) and not math.isfinite(value):
        found[path] = str(value)  # "nan", "inf", "-inf"
        return None
    if isinstance(value, dict):
        return {k: without_nonfinite(v, found, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nonfinite(v, found, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    return value


def dumps(record: dict) -> str:
    """One line of strict JSON for `record` (non-finite floats as null, listed under `nonfinite`)."""
    found: dict[str, str] = {}
    clean = without_nonfinite(record, found)
    if found:
        clean[NONFINITE] = found
    return json.dumps(clean, allow_nan=False)  # a non-finite float that slipped past fails here, loudly
