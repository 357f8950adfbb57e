"""Typed configs: a config is a dataclass, ``from_dict`` reads it from plain data (a YAML block, a checkpoint's JSON)
and ``to_dict`` writes it back. Models (``NepaConfig``...), losses (``TokenizerLossConfig``...), objectives
(``ClassificationConfig``) and the Trainer (``TrainConfig``) all use it; any layer may import this module.

``from_dict`` checks each value against the field's annotation (an int where a float is expected becomes a float, a
list where a tuple is expected a tuple) and an unknown key is one ValueError line naming the closest valid key:

    @dataclass
    class LossConfig(ConfigDict):
        weight: float = 1.0

    LossConfig.from_dict({"weight": 2})     # LossConfig(weight=2.0)
    LossConfig.from_dict({"wieght": 2})     # ValueError: unknown config keys ['wieght'] for LossConfig; did you
                                            # mean weight?
"""
from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, fields
from typing import Any


class ConfigDict:
    """``from_dict`` / ``to_dict`` of a config dataclass (see the module docstring)."""

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} is read from a map of its fields, got {type(d).__name__} {d!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names), key=str)
        if unknown:
            raise ValueError(unknown_keys_message(cls.__name__, unknown, names))
        hints = _field_types(cls)
        return cls(**{k: check_value(k, hints[k], v, cls.__name__) for k, v in d.items()})

    @classmethod
    def from_section(cls, section: dict):
        """``from_dict`` of the keys of a config section that are fields of ``cls`` (a task's ``finetune:`` block
        also holds model settings, which its loader already checked)."""
        names = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in dict(section).items() if k in names})

    def updated(self, **changes):
        """A copy with ``changes``, checked as ``from_dict`` checks them."""
        return type(self).from_dict({**self.to_dict(), **changes}) if changes else self

    def to_dict(self) -> dict:
        return asdict(self)


def unknown_keys_message(owner: str, unknown: list, valid: list) -> str:
    """``unknown config keys [...] for OWNER; did you mean X?`` (difflib), or the valid keys when nothing is close."""
    close = difflib.get_close_matches(str(unknown[0]), [str(v) for v in valid], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(map(str, valid))}"
    return f"unknown config keys {unknown} for {owner}; {hint}"


def _field_types(cls: type) -> dict:
    cached = cls.__dict__.get("_config_field_types")
    if cached is None:
        cached = typing.get_type_hints(cls)
        setattr(cls, "_config_field_types", cached)  # per class, not inherited (the lookup above reads __dict__)
    return cached


def check_value(key: str, annotation: Any, value: Any, owner: str = "config", default: Any = None) -> Any:
    """``value`` converted to the type ``annotation`` names (an int for a float field becomes a float, a list for a
    tuple field a tuple), or one ValueError line (naming ``default`` when one is given). Annotations other than the
    plain ones (bool, int, float, str, list, tuple, dict, Optional / unions of them) are not checked."""
    converted = _convert(annotation, value)
    if converted is _MISMATCH:
        shown = f" (default {default!r})" if default is not None else ""
        raise ValueError(f"{owner} key {key!r} expects {type_name(annotation)}{shown}, got {value!r}")
    return converted


def field_types(cls: type) -> dict:
    """The resolved annotation of each field of the config dataclass ``cls``."""
    return dict(_field_types(cls))


_MISMATCH = object()


def _convert(annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return value
    if origin is typing.Union or origin is types.UnionType:
        for option in typing.get_args(annotation):
            out = _convert(option, value)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if annotation is type(None):
        return value if value is None else _MISMATCH
    if annotation is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if annotation is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISMATCH
    if annotation is int:  # as the YAML configs: a float is accepted where an int is expected
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISMATCH
    if annotation is str:
        return value if isinstance(value, str) else _MISMATCH
    container = origin or annotation
    if container in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        args = typing.get_args(annotation)
        if args and (container is list or (len(args) == 2 and args[1] is Ellipsis)):
            items = [_convert(args[0], v) for v in value]
        elif args and len(args) == len(value):
            items = [_convert(a, v) for a, v in zip(args, value)]
        elif args:
            return _MISMATCH
        else:
            items = list(value)
        return _MISMATCH if any(i is _MISMATCH for i in items) else container(items)
    if container is dict:
        return value if isinstance(value, dict) else _MISMATCH
    return value


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        name = " or ".join(type_name(a) for a in options)
        return f"{name} or null" if len(options) < len(typing.get_args(annotation)) else name
    return getattr(annotation, "__name__", str(annotation))
