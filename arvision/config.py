"""Configs: one default YAML per task (arvision/configs/<task>.yaml), an optional recipe file merged over
it, then ``key=value`` overrides (dotted keys, YAML-parsed values). Every key must exist in the default,
so a typo is an error that names the closest valid key. The resolved config is saved with each run."""
from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

CONFIG_PACKAGE = "arvision.configs"


class Config(dict):
    """A nested dict with attribute access (``cfg.train.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None
        return Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self))


def default_config(task: str) -> dict:
    try:
        text = resources.files(CONFIG_PACKAGE).joinpath(f"{task}.yaml").read_text()
    except FileNotFoundError:
        raise ValueError(f"no default config for task {task!r}") from None
    return yaml.safe_load(text)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_type(key: str, default: Any, value: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return value
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value)
    elif isinstance(default, dict) and isinstance(value, dict):
        return value
    elif isinstance(default, str) and isinstance(value, str):
        return value
    raise ValueError(f"config key {key!r} expects {type(default).__name__} (default {default!r}), got {value!r}")


def _set(cfg: dict, dotted: str, value: Any, defaults_flat: dict) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        # Free-form maps (default {}) accept any sub-key: they are validated by their consumer.
        if isinstance(node.get(part), dict) and not node[part] and ".".join(parts[: i + 1]) in defaults_flat:
            node[part] = copy.deepcopy(node[part])
            sub = node[part]
            for p in parts[i + 1:-1]:
                sub = sub.setdefault(p, {})
            sub[parts[-1]] = value
            return
        if part not in node or not isinstance(node[part], dict):
            raise _unknown_key(dotted, defaults_flat)
        node = node[part]
    if parts[-1] not in node:
        raise _unknown_key(dotted, defaults_flat)
    node[parts[-1]] = _check_type(dotted, defaults_flat.get(dotted), value)


def _unknown_key(key: str, defaults_flat: dict) -> ValueError:
    close = difflib.get_close_matches(key, list(defaults_flat), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --print-config to see all keys"
    return ValueError(f"unknown config key {key!r}{hint}")


def merge(cfg: dict, updates: dict, defaults_flat: dict) -> None:
    for key, value in _flatten(updates).items():
        _set(cfg, key, value, defaults_flat)


def parse_overrides(items: Iterable[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.epochs=10)")
        key, text = item.split("=", 1)
        out[key.strip()] = _parse_value(text)
    return out


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def load_config(task: str, config_file: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """Default config of ``task``, then the recipe file (if any), then ``key=value`` overrides."""
    cfg = default_config(task)
    flat = _flatten(cfg)
    if config_file:
        path = Path(config_file)
        if not path.exists():
            packaged = resources.files(CONFIG_PACKAGE).joinpath(f"{config_file}.yaml")
            if not packaged.is_file():
                raise FileNotFoundError(f"config file {config_file} not found (give a YAML path or a packaged "
                                        f"recipe name, see `arvision recipes`)")
            text = packaged.read_text()
        else:
            text = path.read_text()
        recipe = yaml.safe_load(text) or {}
        recipe.pop("task", None)
        merge(cfg, recipe, flat)
    for key, value in parse_overrides(overrides).items():
        _set(cfg, key, value, flat)
    return Config(cfg)


def save_config(cfg: dict, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
