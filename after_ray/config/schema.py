"""Turning plain YAML data into typed dataclasses, with messages a user can act on.

This module is generic: it knows nothing about after-ray's sections. ``build(cls, data)`` walks the
dataclass fields, checks every value against the field's type hint, rejects unknown keys (with a
"did you mean" hint), and calls each section's ``validate()`` for value-level rules. Every problem
is collected, so a user sees all of them at once rather than one per attempt.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

from after_ray.errors import ConfigError

_MISSING = object()
# Integers must fit the 64-bit types they end up in (numpy seeds, torch, Ray resources); a
# bigger one is a typo, and failing here beats an OverflowError deep inside a stage.
_INT_LIMIT = 2**63
# Free-form values (``options``, ``strategy_params``) are copied into plain trees. YAML aliases
# can make a document refer to itself (a cycle) or expand exponentially ("billion laughs"):
# both are refused here instead of hanging or overflowing the stack when the config is printed.
_MAX_FREE_DEPTH = 32
_MAX_FREE_NODES = 100_000


def build(cls: type, data: Any, *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (a mapping), raising ConfigError listing all problems."""
    problems: list[str] = []
    obj = _build_dataclass(cls, data, prefix, problems)
    # Value rules run even when some keys were rejected, so every problem is reported at once
    # (a rejected key keeps its default, which its section's rules accept).
    _collect_validation(obj, prefix, problems)
    if problems:
        raise ConfigError(format_problems(problems))
    return obj


def format_problems(problems: list[str]) -> str:
    return "invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build_dataclass(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix or "the top level"
        problems.append(f"{where}: expected a mapping of keys, got {_describe(data)}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean '{_key(prefix, hint[0])}'?)" if hint else ""
            valid = ", ".join(sorted(fields))
            problems.append(
                f"{_key(prefix, str(key))}: unknown key{suggestion}; valid keys here: {valid}"
            )
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name not in data:
            continue
        value = _convert(hints[name], data[name], _key(prefix, name), problems)
        if value is not _MISSING:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default is missing
        problems.append(f"{prefix or 'config'}: {exc}")
        return None


def _convert(hint: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, key, problems)
    if hint is Any:
        return _free_form(value, key, problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for option in non_none:
            trial: list[str] = []
            converted = _convert(option, value, key, trial)
            if not trial:
                return converted
        expected = " or ".join(_type_name(a) for a in args)
        problems.append(f"{key}: expected {expected}, got {_describe(value)}")
        return _MISSING
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        problems.append(f"{key}: must be one of {choices}, got {value!r}")
        return _MISSING
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            problems.append(f"{key}: expected a list, got {_describe(value)}")
            return _MISSING
        item_hint = args[0] if args else Any
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                problems.append(f"{key}: expected {len(args)} items, got {len(value)}")
                return _MISSING
            items = [
                _convert(a, v, f"{key}[{i}]", problems)
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            items = [_convert(item_hint, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_describe(value)}")
            return _MISSING
        val_hint = args[1] if len(args) == 2 else Any
        return {str(k): _convert(val_hint, v, f"{key}.{k}", problems) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {_describe(value)}")
        return _MISSING
    if hint is int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        if number is None:
            problems.append(f"{key}: expected an integer, got {_describe(value)}")
            return _MISSING
        if not -_INT_LIMIT <= number < _INT_LIMIT:
            problems.append(f"{key}: {_describe(value)} is too large (must fit in 64 bits)")
            return _MISSING
        return number
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(f"{key}: expected a number, got {_describe(value)}")
            return _MISSING
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):
            # NaN passes every "<"/">" rule in validate() and inf breaks int(); neither is ever
            # a meaningful setting.
            problems.append(f"{key}: expected a finite number, got {_describe(value)}")
            return _MISSING
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. a speaker id written as 12 in YAML
        problems.append(f"{key}: expected a string, got {_describe(value)}")
        return _MISSING
    return value


def _free_form(value: Any, key: str, problems: list[str]) -> Any:
    """A plain copy of a free-form YAML value, or _MISSING (with a problem) when it is cyclic,
    too deep or too large."""
    nodes = 0
    on_path: set[int] = set()

    class _Refused(Exception):
        pass

    def copy(item: Any, depth: int) -> Any:
        nonlocal nodes
        nodes += 1
        if nodes > _MAX_FREE_NODES:
            raise _Refused(f"has more than {_MAX_FREE_NODES} values (YAML aliases expanding?)")
        if not isinstance(item, dict | list | tuple):
            return item
        if id(item) in on_path:
            raise _Refused("refers to itself through a YAML alias")
        if depth >= _MAX_FREE_DEPTH:
            raise _Refused(f"is nested deeper than {_MAX_FREE_DEPTH} levels")
        on_path.add(id(item))
        try:
            if isinstance(item, dict):
                return {k: copy(v, depth + 1) for k, v in item.items()}
            return [copy(v, depth + 1) for v in item]
        finally:
            on_path.discard(id(item))

    try:
        return copy(value, 0)
    except _Refused as exc:
        problems.append(f"{key}: the value {exc}; write it out as plain YAML")
        return _MISSING


def _collect_validation(obj: Any, prefix: str, problems: list[str]) -> None:
    if obj is None or not dataclasses.is_dataclass(obj):
        return
    for field in dataclasses.fields(obj):
        child = getattr(obj, field.name)
        if dataclasses.is_dataclass(child):
            _collect_validation(child, _key(prefix, field.name), problems)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        for message in validate() or []:
            problems.append(message)


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _describe(value: Any) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints beyond str()'s digit limit, deep nesting
        text = "<too large to show>"
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def to_dict(obj: Any) -> Any:
    """Plain data (for YAML/JSON) from a config dataclass tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
