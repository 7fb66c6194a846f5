"""Dataclass configs with per-field help and validation, and their command-line flags.

Declare fields with :func:`field`; :meth:`ConfigBase.validate` checks every bound and choice and raises
a :class:`~efficientgpt.errors.ConfigError` naming the field, the bad value and what is allowed.
:func:`add_arguments` turns a config class into ``--flag`` options (help text from the field) and
:func:`from_args` builds the config back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from efficientgpt.errors import ConfigError


def field(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
          exclusive_minimum: bool = False, choices: tuple | None = None, cli: bool = True):
    """A dataclass field carrying its help text and allowed range."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum,
            "choices": choices, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigBase:
    """Mixin for config dataclasses: validation, dict round trip, CLI flags."""

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            m = f.metadata
            name = type(self).__name__ + "." + f.name
            if value is None:
                continue
            hint = hints.get(f.name)
            if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if hint is float and not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if m.get("choices") is not None:
                vals = value if isinstance(value, (list, tuple)) else [value]
                bad = [v for v in vals if v not in m["choices"]]
                if bad:
                    raise ConfigError(f"{name} = {bad[0]!r} is not allowed; choose one of {', '.join(map(str, m['choices']))}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = m.get("minimum"), m.get("maximum")
                if lo is not None and (value < lo or (m.get("exclusive_minimum") and value == lo)):
                    op = ">" if m.get("exclusive_minimum") else ">="
                    raise ConfigError(f"{name} = {value!r} is out of range: must be {op} {lo}")
                if hi is not None and value > hi:
                    raise ConfigError(f"{name} = {value!r} is out of range: must be <= {hi}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
        obj = cls(**d)
        obj.validate()
        return obj

    @classmethod
    def describe_fields(cls) -> list[dict[str, Any]]:
        return [{"name": f.name, "default": f.default if f.default is not dataclasses.MISSING else None,
                 "help": f.metadata.get("help", "")} for f in dataclasses.fields(cls)]


def _flag(name: str, prefix: str) -> str:
    return "--" + prefix + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = "",
                  skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add one ``--flag`` per field of config class ``cls`` (defaults left as ``None`` = keep the field's)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        hint = hints[f.name]
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        dest = prefix.replace("-", "_") + f.name
        if hint is bool:
            parser.add_argument(_flag(f.name, prefix), dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
            continue
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (list, tuple) or (origin in (typing.Union, types.UnionType) and any(typing.get_origin(a) in (list, tuple) for a in args)):
            parser.add_argument(_flag(f.name, prefix), dest=dest, default=None, type=_csv, help=help_text)
            continue
        scalar = next((a for a in (args or (hint,)) if a in (int, float, str)), str)
        parser.add_argument(_flag(f.name, prefix), dest=dest, type=scalar, default=None, help=help_text,
                            metavar=f.name.upper())


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def from_args(cls: type, args: argparse.Namespace, prefix: str = "", **overrides: Any):
    """Build and validate ``cls`` from parsed flags; flags left unset keep the field defaults."""
    kwargs = dict(overrides)
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix.replace("-", "_") + f.name, None)
        if value is not None:
            kwargs[f.name] = value
    obj = cls(**kwargs)
    obj.validate()
    return obj
