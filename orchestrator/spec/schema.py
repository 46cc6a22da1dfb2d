"""Typed parsing of YAML mappings into frozen dataclasses, with the field's path in
every error ("method.lr: expected a number, got 'fast'").

Small on purpose: it understands the types sweep files use (bool, int, float, str,
Optional, tuple/list of X, dict of str -> X, nested dataclasses), rejects unknown
keys and non-finite numbers (NaN, inf: YAML's `.nan`, `.inf`), and leaves value checks
to each dataclass's `__post_init__`, whose ValueError is re-raised at the field it names
("lr must be > 0" from `method` -> "method.lr: must be > 0").
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Union, get_args, get_origin


class SpecError(ValueError):
    """A sweep file that cannot run; `str()` is one line naming the field."""

    def __init__(self, path: str, message: str):
        # one line, whatever the message quoted (the CLI prints it as is)
        message = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    origin = get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; returns the converted value."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, path)
            except SpecError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise SpecError(path, f"expected one of {', '.join(_type_name(o) for o in options)}, "
                              f"got {_describe(value)}")
    if tp is Any:
        return value
    if tp in (list, tuple, dict):      # a bare annotation: items of any type
        tp = {list: list[Any], tuple: tuple[Any, ...], dict: dict[str, Any]}[tp]
        origin = get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # no option of a sweep file means anything as NaN or infinity
            if not math.isfinite(number):
                raise SpecError(path, f"expected a finite number, got {_describe(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            args = get_args(tp)
            item_tp = args[0] if args else Any
            items = [coerce(v, item_tp, _join(path, i)) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, val_tp = get_args(tp) or (str, Any)
            out = {}
            for key, val in value.items():
                if not isinstance(key, str):
                    raise SpecError(_join(path, str(key)), "keys must be strings")
                out[key] = coerce(val, val_tp, _join(path, key))
            return out
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return parse_dataclass(tp, value, path)
    else:
        raise TypeError(f"schema: unsupported annotation {tp!r} at {path}")
    raise SpecError(path, f"expected {_type_name(tp)}, got {_describe(value)}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def parse_dataclass(cls: type, data: Any, path: str = "", exclude: tuple[str, ...] = ()):
    """Build `cls` from a mapping: unknown keys, missing required keys, wrong types and
    the class's own ValueErrors all become SpecError naming the field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(path, f"expected a mapping, got {_describe(data)}")
    types_ = field_types(cls)
    allowed = [name for name in types_ if name not in exclude]
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise SpecError(_join(path, str(unknown[0])),
                        f"unknown key (allowed: {', '.join(allowed) or 'none'})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                    and f.name not in exclude:
                raise SpecError(_join(path, f.name), "required key is missing")
            continue
        kwargs[f.name] = coerce(data[f.name], types_[f.name], _join(path, f.name))
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (ValueError, TypeError) as err:
        raise _blame(cls, kwargs, str(err), path) from None


_NAMED = re.compile(r"(?P<names>[A-Za-z_]\w*(?:(?:, | and | or )[A-Za-z_]\w*)*)"
                    r"(?P<suffix>(?:[.\[][^\s:]*)?)(?::\s*|\s+)(?P<rest>.+)", re.S)


def _outcome(cls: type, kwargs: dict[str, Any]) -> str | None:
    try:
        cls(**kwargs)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def _blame(cls: type, kwargs: dict[str, Any], message: str, path: str) -> SpecError:
    """A dataclass's own ValueError at the field to blame: the field its message starts
    with ("lr must be > 0, got -1" -> `<path>.lr: must be > 0, got -1`; "epochs and
    batch_size must be >= 1" -> whichever of the two the file set wrong), else the key of
    the file without which the error goes away (LP-FT's `lp_lr` checked as LP's `lr`)."""
    fields = field_types(cls)
    match = _NAMED.match(message)
    named: list[str] = []
    if match:
        named = re.split(r", | and | or ", match["names"])
        if not all(name in fields for name in named):
            named = []

    def culprit(name: str) -> bool:
        # the file set this key, and setting it back to its default changes the error
        if name not in kwargs:
            return False
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return name in named                   # required: cannot be left out to test
        return _outcome(cls, {k: v for k, v in kwargs.items() if k != name}) != message

    at_named = [name for name in named if culprit(name)]
    if not at_named:
        for name in kwargs:
            if name not in named and culprit(name):
                rest = message
                if any(name.endswith("_" + n) for n in named) and not match["suffix"]:
                    rest = match["rest"].strip()   # LP's "lr must be > 0" for LP-FT's lp_lr
                return SpecError(_join(path, name), rest)
        at_named = [name for name in named if name in kwargs][:1]
    if at_named:
        return SpecError(_join(path, at_named[0]) + match["suffix"], match["rest"].strip())
    return SpecError(path, message)
