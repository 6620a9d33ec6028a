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
    from vlexport.models.kdeov.config import KDEOV_PRESETS

    return list(KDEOV_PRESETS)


def _build_kdeov(preset: str, **kwargs: Any) -> nn.Module:
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder
    from vlexport.models.kdeov.config import KDEOV_PRESETS
    from vlexport.models.kdeov.model import build_kdeov

    config = KDEOV_PRESETS[preset]
    if "text_encoder" not in kwargs:
        kwargs["text_encoder"] = FrozenCLIPTextEncoder(config.clip_model, config.clip_pretrained, allow_random=True)
    return build_kdeov(config, **kwargs)


register_family(Family(
    name="kdeov", task="detect", parts=("detector", "image_encoder", "text_encoder"),
    presets=_kdeov_presets, build=_build_kdeov,
    description="YOLO student distilled from CLIP; open-vocabulary detection with frozen text embeddings",
))


def _captioner_presets() -> list[str]:
    from vlexport.models.captioner.model import CAPTIONER_PRESETS

    return list(CAPTIONER_PRESETS)


def _build_captioner(preset: str, **kwargs: Any) -> nn.Module:
    from vlexport.models.captioner.model import build_captioner

    return build_captioner(preset, **kwargs)


register_family(Family(
    name="captioner", task="caption", parts=("encoder", "decoder"),
    presets=_captioner_presets, build=_build_captioner,
    description="multi-scale CLIP encoder with deformable attention feeding a GPT-2 decoder (KV-cache export)",
))


def _detr_presets() -> list[str]:
    from vlexport.models.detr.model import DETR_PRESETS

    return list(DETR_PRESETS)


def _build_detr(preset: str, **kwargs: Any) -> nn.Module:
    from vlexport.models.detr.model import build_detr

    return build_detr(preset, **kwargs)


register_family(Family(
    name="detr", task="detect", parts=("detector",), presets=_detr_presets, build=_build_detr,
    description="DETR (ResNet + transformer, set prediction; masks with the segmentation head)",
))


def _multiscale_presets() -> list[str]:
    from vlexport.models.multiscale.model import MULTISCALE_PRESETS

    return list(MULTISCALE_PRESETS)


def _build_multiscale(preset: str, **kwargs: Any) -> nn.Module:
    from vlexport.models.multiscale.model import build_multiscale

    return build_multiscale(preset, **kwargs)


register_family(Family(
    name="multiscale", task="segment", parts=("segmenter",), presets=_multiscale_presets, build=_build_multiscale,
    description="shared backbone at 0.5x/1x/1.5x with attention-based (or hierarchical) scale fusion; binary masks",
))
