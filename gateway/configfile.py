"""Turns a YAML mapping into the gateway's frozen config dataclasses, naming the key path of any error.

Each stage owns its config dataclass (gateway/server/config.py, gateway/upstream/config.py, …); this
module only knows how to fill a dataclass from a mapping: it checks unknown keys, types, and calls
each dataclass's `validate(path)` hook for the rules that types cannot say.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Mapping

from gateway.errors import ConfigError

#: A number in exponent notation without a dot, e.g. 1e-3 or 5E+2: a string to PyYAML, a number to people.
_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _join(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Convert `value` to type `tp` (a dataclass, a container or a scalar), or raise ConfigError."""
    if tp is Any:  # a value its owner validates itself (e.g. per-model overrides)
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if value is None:
            return None
        return convert(options[0], value, path)
    if dataclasses.is_dataclass(tp):
        return load_dataclass(tp, value, path)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        return {str(k): convert(value_type, v, _join(path, k)) for k, v in value.items()}
    if origin in (tuple, list):
        (item_type, *_) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        return tuple(convert(item_type, item, _join(path, i)) for i, item in enumerate(value))
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-3 as a string (it wants 1.0e-3); YAML 1.2 and JSON read a number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp!r} at {path} is not supported")


def load_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build the frozen dataclass `cls` from mapping `data`; defaults fill what is missing."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(_join(path, unknown[0]), f"unknown key; expected one of: {', '.join(sorted(fields))}")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = convert(hints[name], data[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), f"required key is missing ({_type_name(hints[name])})")
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate(path)
    return instance
