"""Model families and registered presets.

A *family* is a model class with its config dataclass (``NepaViT`` / ``NepaConfig``, a tokenizer, the generator,
a segmentor). Each model class carries ``family = "<name>"`` and a ``config`` with ``to_dict()`` /
``from_dict()``; checkpoints store the family name, so ``load_model`` rebuilds the right class and a caller that
expects one family gets a one-line error for another.

A *preset* is a named config of one family (timm's registered model names):

    model = create_model("nepa_tiny_patch4_32", drop_path_rate=0.1)
    list_models()                      # every preset;  list_models("nepa_vit") for one family
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from torch import nn

from ..typed_config import ConfigDict  # noqa: F401  (re-exported: the model configs import it from here)


# What the sampler (generate/, `arvision sample`) asks of a model: the class-conditional backbone over a token prefix
# and its KV-cache step. A family whose model class has them generates, as timm tells the models that can give
# features by hasattr(model, "forward_intermediates").
GENERATOR_METHODS = ("forward_backbone", "new_cache", "step_backbone")


@dataclass(frozen=True)
class Family:
    name: str
    model_cls: type
    config_cls: type
    description: str = ""
    # the command that trains the family's checkpoints (given a config: a NEPA ViT with a classifier is fine-tuned)
    train_command: Union[str, Callable[[Any], str], None] = None
    used_by: str = ""  # the commands that take its checkpoints, named in wrong-family errors

    def training_command(self, config: Any) -> str:
        command = self.train_command(config) if callable(self.train_command) else self.train_command
        return command or self.name

    @property
    def generates(self) -> bool:
        return all(callable(getattr(self.model_cls, m, None)) for m in GENERATOR_METHODS)


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, tuple[str, Callable[[], dict]]] = {}


def register_family(name: str, model_cls: type, config_cls: type, description: str = "", *,
                    train_command: Union[str, Callable[[Any], str], None] = None, used_by: str = "") -> Family:
    family = Family(name, model_cls, config_cls, description, train_command, used_by)
    _FAMILIES[name] = family
    model_cls.family = name
    return family


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def generator_families() -> tuple[str, ...]:
    """The families that ``arvision sample`` draws from (``Family.generates``), sorted."""
    return tuple(n for n in sorted(_FAMILIES) if _FAMILIES[n].generates)


def family_of(model: nn.Module) -> str:
    name = getattr(model, "family", None)
    if name not in _FAMILIES:
        raise ValueError(f"{type(model).__name__} is not a registered arvision model family")
    return name


def register_model(fn: Optional[Callable[[], dict]] = None, *, family: str = "nepa_vit"):
    """Register a preset: a function returning the config fields. ``@register_model`` or
    ``@register_model(family="vq_tokenizer")``."""
    def wrap(f: Callable[[], dict]) -> Callable[[], dict]:
        _PRESETS[f.__name__] = (family, f)
        return f
    return wrap(fn) if fn is not None else wrap


def list_models(family: Optional[str] = None) -> list[str]:
    return sorted(n for n, (fam, _) in _PRESETS.items() if family is None or fam == family)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.4)
    return f"did you mean {' or '.join(close)}? " if close else ""


def preset_family(name: str) -> str:
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; {_suggest(name, list_models())}`arvision models` lists the "
                         f"{len(_PRESETS)} presets by family")
    return _PRESETS[name][0]


def check_preset(name: str, families: tuple[str, ...], what: str = "model.name") -> str:
    """``name`` if it is a preset of one of ``families`` (the ones the command builds); else one ValueError line with
    the closest presets of those families (difflib) and the ``arvision models --family`` command listing them."""
    own = [n for f in families for n in list_models(f)]
    if name in own:
        return name
    listing = " or ".join(f"`arvision models --family {f}`" for f in families)
    if name in _PRESETS:
        raise ValueError(f"{what} {name!r} is a {_PRESETS[name][0]} preset, not {' or '.join(families)}; "
                         f"{_suggest(name, own)}{listing} lists those")
    raise ValueError(f"unknown {what} {name!r}; {_suggest(name, own)}{listing} lists the "
                     f"{len(own)} {' / '.join(families)} presets")


def preset_fields(name: str) -> dict:
    """The config fields a preset sets (before defaults)."""
    preset_family(name)
    return _PRESETS[name][1]()


def model_config(name: str, **overrides) -> Any:
    """The config dataclass of a preset with field overrides."""
    family, fn = _PRESETS[name] if name in _PRESETS else (preset_family(name), None)
    return get_family(family).config_cls.from_dict({**fn(), **overrides})


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered preset; keyword overrides replace config fields (e.g. num_classes=10)."""
    family = get_family(preset_family(name))
    return family.model_cls(model_config(name, **overrides))


def build_from_config(family: str, config: dict) -> nn.Module:
    """A model of ``family`` from a config dict (as stored in a checkpoint)."""
    fam = get_family(family)
    return fam.model_cls(fam.config_cls.from_dict(config))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside its DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, in any order."""
    while True:
        inner = next((m for m in (getattr(model, a, None) for a in ("module", "_orig_mod"))
                      if isinstance(m, nn.Module)), None)
        if inner is None:
            return model
        model = inner
