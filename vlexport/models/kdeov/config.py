"""KDEOV configuration: the fields that rebuild a model (stored in its checkpoints) and the presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlexport.errors import UsageError

__all__ = ["FUSION_MODES", "BOX_SOURCES", "KDEOVConfig", "KDEOV_PRESETS", "DEFAULT_PRESET"]

FUSION_MODES = ("film", "cross_attention")
BOX_SOURCES = ("grid", "yolo")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KDEOVConfig:
    """Everything needed to rebuild a KDEOV model (stored in its checkpoints).

    Attributes:
        backbone: ``"yolov8n"``, ``"yolov5s"`` or ``"simple"``.
        embed_dim: joint embedding size; must equal the CLIP text tower's.
        fusion: ``"film"`` or ``"cross_attention"``.
        fusion_heads: attention heads for ``"cross_attention"``.
        box_source: ``"grid"`` (a default square per cell) or ``"yolo"`` (the backbone's box head).
        grid_box_scale: side of a grid cell's default box, in multiples of the level's stride.
        image_size: square input size (multiple of 32).
        clip_model, clip_pretrained: the CLIP towers the student is aligned to (open_clip model
            name or ``"tiny"``; pretrained tag, weights path, or None for seeded random weights).
        clip_activation: the towers' MLP activation, ``"auto"`` (from the weights' provenance),
            ``"quickgelu"`` or ``"gelu"`` (see :func:`~vlexport.models.clip.activation.resolve_activation`).
    """

    backbone: str = "yolov8n"
    embed_dim: int = 512
    fusion: str = "film"
    fusion_heads: int = 8
    box_source: str = "grid"
    grid_box_scale: float = 4.0
    image_size: int = 640
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    clip_activation: str = "auto"

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_MODES:
            raise UsageError(f"unknown fusion {self.fusion!r}; choose one of: {', '.join(FUSION_MODES)}")
        if self.box_source not in BOX_SOURCES:
            raise UsageError(f"unknown box_source {self.box_source!r}; choose one of: {', '.join(BOX_SOURCES)}")
        if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise UsageError(f"embed_dim must be a positive integer, got {self.embed_dim!r}")
        if not isinstance(self.image_size, int) or self.image_size <= 0 or self.image_size % 32:
            raise UsageError(f"image_size must be a positive multiple of 32, got {self.image_size!r}")
        if not self.grid_box_scale > 0:
            raise UsageError(f"grid_box_scale must be > 0, got {self.grid_box_scale!r}")
        if not isinstance(self.fusion_heads, int) or self.fusion_heads <= 0:
            raise UsageError(f"fusion_heads must be a positive integer, got {self.fusion_heads!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (JSON- and ``weights_only``-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KDEOVConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a UsageError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown KDEOV config key(s): {', '.join(map(str, unknown))}")
        return cls(**dict(data))

    # Fields that change the weights' shapes or meaning; the rest may differ from a checkpoint's.
    architecture_fields = ("backbone", "embed_dim", "fusion", "fusion_heads", "clip_model")


KDEOV_PRESETS: dict[str, KDEOVConfig] = {
    "tiny": KDEOVConfig(backbone="simple", embed_dim=64, clip_model="tiny", clip_pretrained=None,
                        image_size=128, box_source="grid"),
    "yolov8n-vitb32": KDEOVConfig(backbone="yolov8n", embed_dim=512, clip_model="ViT-B-32",
                                  clip_pretrained="openai", image_size=640, box_source="yolo"),
    "yolov5s-vitb32": KDEOVConfig(backbone="yolov5s", embed_dim=512, clip_model="ViT-B-32",
                                  clip_pretrained="openai", image_size=640, box_source="yolo"),
}
DEFAULT_PRESET = "yolov8n-vitb32"


def _resolve_config(config: KDEOVConfig | str) -> KDEOVConfig:
    if isinstance(config, KDEOVConfig):
        return config
    if isinstance(config, str):
        if config not in KDEOV_PRESETS:
            raise UsageError(f"unknown KDEOV preset {config!r}; choose one of: {', '.join(KDEOV_PRESETS)}")
        return KDEOV_PRESETS[config]
    raise UsageError(f"expected a KDEOVConfig or a preset name, got {type(config).__name__}")


