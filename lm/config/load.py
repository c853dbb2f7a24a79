"""Reading a config: YAML (`yaml.safe_load`) and dotted `key=value` overrides, each value checked against its type."""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import typing
from typing import Any

import yaml

from lm import storage
from lm.config.checks import validate
from lm.config.sections import Config, MixtureSource, flatten, to_dict
from lm.errors import LMError


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: type) -> Any:
    """Returns `value` as type `tp`, or raises LMError naming `key`."""
    if typing.get_origin(tp) is tuple:
        return _entries(key, value, typing.get_args(tp)[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    article = "an" if tp is int else "a"
    raise LMError(f"config key '{key}' must be {article} {tp.__name__}, got {value!r}; fix its value.")


def _unknown_key(key: str, known: list[str]) -> LMError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(known))}."
    return LMError(f"unknown config key '{key}'.{hint}")


def _entries(key: str, value: Any, cls: type) -> tuple:
    """A list of mappings (YAML, or a YAML/JSON list given as an override) as a tuple of `cls` entries."""
    types = _field_types(cls)
    if value is None or value == "":
        return ()
    if not isinstance(value, (list, tuple)):
        raise LMError(f"config key '{key}' must be a list of entries with keys {', '.join(types)}, got {value!r}; "
                      "see docs/data.md#mixtures.")
    entries = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise LMError(f"{where} must be a mapping with keys {', '.join(types)}, got {item!r}; fix that entry.")
        for name in item:
            if name not in types:
                raise _unknown_key(f"{where}.{name}", [f"{where}.{known}" for known in types])
        entries.append(cls(**{name: _coerce(f"{where}.{name}", v, types[name]) for name, v in item.items()}))
    return tuple(entries)


def _edit_entries(flat: dict[str, Any], key: str, entry_type: type) -> None:
    """Applies overrides `KEY.NAME.FIELD=value` to the entry (of type `entry_type`) of list `key` called NAME
    (in place)."""
    prefix = key + "."
    edits = {k: flat.pop(k) for k in [k for k in flat if k.startswith(prefix)]}
    if not edits:
        return
    entries = [dict(e) if isinstance(e, dict) else e for e in (flat.get(key) or [])]
    fields = list(_field_types(entry_type))
    for dotted, value in edits.items():
        name, _, field = dotted[len(prefix):].partition(".")
        matches = [e for e in entries if isinstance(e, dict) and e.get("name") == name]
        if not matches:
            names = ", ".join(str(e.get("name")) for e in entries if isinstance(e, dict)) or "none"
            raise LMError(f"override '{dotted}' names no entry of {key} (its names: {names}); "
                          f"use {key}.NAME.KEY=VALUE with one of those names.")
        if not field:
            raise LMError(f"override '{dotted}' names the entry '{name}' of {key} but none of its keys; "
                          f"use {key}.{name}.KEY=VALUE (KEY: {', '.join(fields)}).")
        if field not in fields:
            raise _unknown_key(f"{key}.{name}.{field}", [f"{key}.{name}.{known}" for known in fields])
        matches[0][field] = value
    flat[key] = entries


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of `cls`, e.g. 'model.d_model'."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys




def _build(cls: type, flat: dict[str, Any], prefix: str = "") -> Any:
    kwargs = {}
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        if _is_section(tp):
            kwargs[name] = _build(tp, flat, f"{key}.")
        elif key in flat:
            kwargs[name] = _coerce(key, flat[key], tp)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parses ['model.d_model=256', ...] into {'model.d_model': 256, ...}."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LMError(f"override '{item}' is not of the form key=value (e.g. train.steps=100).")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


def from_flat(flat: dict[str, Any]) -> Config:
    """Builds and validates a Config from dotted keys; unknown keys are errors."""
    flat = dict(flat)
    _edit_entries(flat, "data.mixture", MixtureSource)
    known = all_keys()
    for key in flat:
        if key not in known:
            raise _unknown_key(key, known)
    config = _build(Config, flat)
    validate(config)
    return config


def read_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a YAML mapping safely; a missing or malformed file is an LMError."""
    path = storage.path(path, "config file")
    if path.is_dir():
        inside = path / "config.yaml"
        hint = f"did you mean {inside}?" if inside.is_file() else "pass a YAML file such as configs/tiny.yaml."
        raise LMError(f"config file '{path}' is a directory; {hint}")
    if not path.is_file():
        raise LMError(f"config file '{path}' does not exist; pass an existing YAML file such as configs/tiny.yaml.")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LMError(f"config file '{path}' is not valid YAML (not UTF-8: bad byte at offset {e.start}); "
                      "fix the file.") from None
    except yaml.YAMLError as e:
        raise LMError(f"config file '{path}' is not valid YAML{_where(e)} ({_problem(e)}); fix the file.") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise LMError(f"config file '{path}' must hold a mapping of sections (model:, train:, ...).")
    return tree


def _where(e: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error (1-based), or '' when PyYAML gives no position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _problem(e: yaml.YAMLError) -> str:
    """What PyYAML says is wrong, in a few words."""
    words = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    context = getattr(e, "context", None)
    return f"{words}, {context}" if context else words


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Loads a YAML config (or the defaults when `path` is None) and applies overrides."""
    flat = flatten(read_yaml(path)) if path else {}
    flat.update(parse_overrides(list(overrides)))
    return from_flat(flat)




def replace(config: Config, **dotted: Any) -> Config:
    """Returns a copy with dotted keys replaced, e.g. replace(c, **{'train.steps': 5})."""
    flat = flatten(to_dict(config))
    flat.update(dotted)
    return from_flat(flat)
