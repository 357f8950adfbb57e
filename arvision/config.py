"""Configs: one default YAML per task (arvision/configs/<task>.yaml), an optional recipe file merged over
it, then ``key=value`` overrides (dotted keys, YAML-parsed values). Every key must exist in the default,
so a typo is an error that names the closest valid key, except inside free-form maps (a key whose default is
``{}``, such as ``model.args``): those accept any sub-key at any depth and are validated by their consumer.
The resolved config is saved with each run.

    cfg = load_config("finetune", "nepa_b14_in1k_finetune", ["model.args.rope_rescale=null", "train.lr=1e-4"])
    cfg.train.lr = 3e-4            # attribute writes change the config itself
    assert cfg["train"]["lr"] == 3e-4
    save_config(cfg, run_dir / "config.yaml")
"""
from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from .files import read_yaml_text, write_text
from .typed_config import check_value, field_types

CONFIG_PACKAGE = "arvision.configs"


class Config(dict):
    """A nested dict with attribute access (``cfg.train.lr``) that reads and writes the config itself.

    Nested dicts are stored as Config nodes, so ``cfg.train`` is a live view: ``cfg.train.lr = 1`` and
    ``cfg["train"]["lr"] = 1`` are the same write. ``to_dict()`` gives plain nested dicts (a deep copy);
    ``yaml.safe_dump`` accepts Config directly (a representer is registered below).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        self.update(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, _wrap(value))

    def update(self, *args: Any, **kwargs: Any) -> None:  # dict.update bypasses __setitem__
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(type(self), name):
            raise AttributeError(f"{name!r} is a Config method; write cfg[{name!r}] = ... instead")
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __deepcopy__(self, memo: dict) -> "Config":
        return Config(copy.deepcopy(dict(self), memo))

    def __reduce__(self):  # pickle as Config(plain dict), independent of __setattr__
        return (Config, (self.to_dict(),))

    def to_dict(self) -> dict:
        """Plain nested dicts (a deep copy)."""
        return copy.deepcopy(_unwrap(self))


def _wrap(value: Any) -> Any:
    return value if isinstance(value, Config) or not isinstance(value, dict) else Config(value)


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


yaml.add_representer(Config, yaml.SafeDumper.represent_dict, Dumper=yaml.SafeDumper)


def typed_sections() -> dict:
    """The config sections that are a typed dataclass: a task YAML holds only the keys whose value differs from the
    dataclass's default, and the resolved config has every field (in the dataclass's order)."""
    from .train.config import TrainConfig

    return {"train": TrainConfig}


def default_config(task: str) -> dict:
    """The task's default config: its YAML, each typed section (``train``) completed with the dataclass's defaults."""
    try:
        text = resources.files(CONFIG_PACKAGE).joinpath(f"{task}.yaml").read_text()
    except FileNotFoundError:
        raise ValueError(f"no default config for task {task!r}") from None
    cfg = read_yaml_text(text, f"{task}.yaml")
    for section, cls in typed_sections().items():
        if section in cfg:
            try:
                cfg[section] = cls.from_dict(cfg[section] or {}).to_dict()
            except ValueError as e:
                raise ValueError(f"{task}.yaml, section {section}: {e}") from None
    return cfg


def _annotation(key: str) -> Any:
    """The annotation of ``key`` when it is a field of a typed section (``train.lr``), else None."""
    section, _, name = key.partition(".")
    cls = typed_sections().get(section)
    return field_types(cls).get(name) if cls is not None and "." not in name else None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = copy.deepcopy(v)  # never alias the config: later merges fill its free-form maps in place
    return out


def _check_type(key: str, default: Any, value: Any) -> Any:
    annotation = _annotation(key)
    if annotation is not None:  # a typed section: its field's annotation decides, as in the dataclass
        return check_value(key, annotation, value, default=default)
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


def _is_free_form(key: str, defaults_flat: dict) -> bool:
    default = defaults_flat.get(key)
    return isinstance(default, dict) and not default


def _set(cfg: dict, dotted: str, value: Any, defaults_flat: dict) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        # Free-form maps (default {}) accept any sub-key at any depth, filled or not: their consumer validates them.
        if _is_free_form(".".join(parts[: i + 1]), defaults_flat):
            if not isinstance(node.get(part), dict):  # null (e.g. set by an earlier override): start an empty map
                node[part] = {}
            sub = node[part]
            for j in range(i + 1, len(parts) - 1):
                if parts[j] not in sub or sub[parts[j]] is None:
                    sub[parts[j]] = {}
                elif not isinstance(sub[parts[j]], dict):
                    raise ValueError(f"config key {'.'.join(parts[: j + 1])!r} holds {sub[parts[j]]!r}, not a map; "
                                     f"cannot set {dotted!r}")
                sub = sub[parts[j]]
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
        out[key.strip()] = _parse_value(key.strip(), text)
    return out


def _parse_value(key: str, text: str) -> Any:
    value = read_yaml_text(text, f"override {key}={text}") if text.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def load_config(task: str, config_file: Optional[str] = None, overrides: Iterable[str] = (),
                base: Optional[dict] = None) -> Config:
    """Default config of ``task``, then ``base`` (a resumed run's saved config, if any), then the recipe file (if any),
    then ``key=value`` overrides."""
    cfg = default_config(task)
    flat = _flatten(cfg)
    if base:
        merge(cfg, base, flat)
    if config_file:
        path = Path(config_file)
        if not path.exists():
            packaged = resources.files(CONFIG_PACKAGE).joinpath(f"{config_file}.yaml")
            if not packaged.is_file():
                raise FileNotFoundError(f"config file {config_file} not found (give a YAML path or a packaged "
                                        f"recipe name, see `arvision recipes`)")
            text, source = packaged.read_text(), f"recipe {config_file}"
        else:
            text, source = path.read_text(), path
        recipe = read_yaml_text(text, source) or {}
        if not isinstance(recipe, dict):
            raise ValueError(f"{source} holds a {type(recipe).__name__}, not a map of config keys (e.g. train: "
                             "{epochs: 10})")
        recipe.pop("task", None)
        merge(cfg, recipe, flat)
    for key, value in parse_overrides(overrides).items():
        _set(cfg, key, value, flat)
    for section, cls in typed_sections().items():  # the dataclass's own checks (e.g. train.schedule's values)
        if section in cfg:
            cls.from_dict(cfg[section])
    return Config(cfg)


def save_config(cfg: dict, path: Path) -> None:
    """Write ``cfg`` as YAML, atomically (temp file, then rename)."""
    write_text(path, yaml.safe_dump(_unwrap(cfg), sort_keys=False))
