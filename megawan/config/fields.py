"""What every config section shares: the error type, the one field check, building a dataclass from a mapping
(unknown keys refused, naming the nearest known one; types coerced) and writing one back as a plain dict."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from megawan.utils.user_errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot work. The message names the offending field."""


DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: numerical checks only


def checker(prefix: str):
    """The field check of one section: `need = checker("model")`, then `need(ok, "num_heads", why)` raises
    `ConfigError("model.num_heads: why")` when `ok` is false."""

    def need(ok: bool, field_name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{prefix}.{field_name}: {why}")

    return need


def from_preset(cls, presets: dict, name: str, what: str, prefix: str, overrides: dict):
    """`cls` built from preset `name` of `presets` with `overrides`, validated; an unknown name is a ConfigError
    naming the nearest known one and listing them all (`what`: "DiT", "VAE", ...)."""
    if name not in presets:
        raise ConfigError(f"unknown {what} preset {name!r}{did_you_mean(name, presets)}; known: "
                          f"{', '.join(sorted(presets))}")
    return build(cls, {"name": name, **presets[name], **overrides}, prefix).validate()


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (YAML-safe) of a config, e.g. to save the resolved config beside a checkpoint."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(cls, values: dict, prefix: str):
    """Instantiate dataclass `cls` from a dict, rejecting unknown keys and coercing types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"unknown key {where!r}{did_you_mean(key, known)}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
