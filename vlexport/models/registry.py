"""Families and their presets, in the spirit of timm's ``create_model`` / ``list_models``.

A family registers its name, task, exported parts, presets and model builder. The CLI and the
exporters look families up here instead of dispatching on strings of their own.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from vlexport.errors import UsageError


@dataclass(frozen=True)
class Family:
    """One exportable model kind."""

    name: str
    task: str
    parts: tuple[str, ...]
    presets: Callable[[], list[str]]
    build: Callable[..., nn.Module]
    description: str = ""


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family (a second registration under the same name is a bug)."""
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The family called ``name``, or a UsageError listing the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UsageError(f"unknown model family {name!r}; choose one of {', '.join(sorted(_FAMILIES))}") from None


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def list_models(pattern: str = "*") -> list[str]:
    """Every ``family/preset`` name matching a glob pattern, e.g. ``list_models("kdeov/*")``."""
    names = [f"{f.name}/{p}" for f in _FAMILIES.values() for p in f.presets()]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build ``family/preset`` (e.g. ``"kdeov/tiny"``) with the family's builder."""
    family_name, _, preset = name.partition("/")
    family = get_family(family_name)
    presets = family.presets()
    if not preset:
        raise UsageError(f"name a preset: {', '.join(f'{family.name}/{p}' for p in presets)}")
    if preset not in presets:
        raise UsageError(f"unknown {family.name} preset {preset!r}; choose one of {', '.join(presets)}")
    return family.build(preset, **kwargs)


def _kdeov_presets() -> list[str]:
    from vlexport.models.kdeov import KDEOV_PRESETS

    return list(KDEOV_PRESETS)


def _build_kdeov(preset: str, **kwargs: Any) -> nn.Module:
    from vlexport.models.clip_towers import FrozenCLIPTextEncoder
    from vlexport.models.kdeov import KDEOV_PRESETS, build_kdeov

    config = KDEOV_PRESETS[preset]
    if "text_encoder" not in kwargs:
        kwargs["text_encoder"] = FrozenCLIPTextEncoder(config.clip_model, config.clip_pretrained, allow_random=True)
    return build_kdeov(config, **kwargs)


register_family(Family(
    name="kdeov", task="detect", parts=("detector", "image_encoder", "text_encoder"),
    presets=_kdeov_presets, build=_build_kdeov,
    description="YOLO student distilled from CLIP; open-vocabulary detection with frozen text embeddings",
))
