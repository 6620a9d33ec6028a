"""SCLIP presets: the CLIP backbone, sliding window, PAMR and thresholds of one configuration."""

from __future__ import annotations

import dataclasses

from vlexport.errors import UsageError
from vlexport.models.clip.tiny import TINY

__all__ = ["OPENAI_MEAN_255", "OPENAI_STD_255", "SCLIPConfig", "SCLIP_PRESETS"]

#: OpenAI CLIP mean/std x 255, RGB, applied to 0-255 pixel values (SCLIP's SegDataPreProcessor).
OPENAI_MEAN_255: tuple[float, float, float] = (122.771, 116.746, 104.094)
OPENAI_STD_255: tuple[float, float, float] = (68.501, 66.632, 70.323)


@dataclasses.dataclass(frozen=True)
class SCLIPConfig:
    """One SCLIP preset.

    Attributes:
        clip_model: open_clip config name (or ``"tiny"``).
        clip_pretrained: open_clip tag, weights file, or ``None`` for seeded random weights.
        image_size / patch_size: the ViT's native input size and patch size (informational;
            the positional table is read from the model).
        clip_activation: the towers' MLP activation: ``"auto"`` (from the weights' provenance, see
            :func:`~vlexport.models.clip.activation.resolve_activation`), ``"quickgelu"`` or ``"gelu"``.
        logit_scale: SCLIP's constant temperature (not CLIP's learnt one).
        slide_crop / slide_stride: sliding-window size and stride; ``slide_crop=0`` runs the whole image.
        pamr_steps / pamr_dilations: PAMR iterations (0: off, SCLIP's released configs) and dilations.
        prob_threshold: pixels whose best class probability is below it become class 0.
        area_threshold: classes 1.. whose argmax area is <= this fraction of the foreground are dropped.
        mean / std: normalisation of 0-255 RGB pixels.
        short_side / max_long_side: resize (keep ratio) so the short side is ``short_side`` unless
            the long side would exceed ``max_long_side`` (mmcv ``Resize(scale=(2048, 336))``).
    """

    clip_model: str
    clip_pretrained: str | None
    image_size: int = 224
    patch_size: int = 16
    clip_activation: str = "auto"
    logit_scale: float = 40.0
    slide_crop: int = 224
    slide_stride: int = 112
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    prob_threshold: float = 0.0
    area_threshold: float = 0.0
    mean: tuple[float, float, float] = OPENAI_MEAN_255
    std: tuple[float, float, float] = OPENAI_STD_255
    short_side: int = 336
    max_long_side: int = 2048

    def __post_init__(self) -> None:
        if self.slide_crop < 0 or (self.slide_crop > 0 and self.slide_stride < 1):
            raise UsageError(
                f"SCLIP sliding window: crop must be >= 0 and stride >= 1, got crop {self.slide_crop}, "
                f"stride {self.slide_stride}"
            )
        if self.pamr_steps < 0:
            raise UsageError(f"SCLIP pamr_steps must be >= 0, got {self.pamr_steps}")
        if self.short_side < 1:
            raise UsageError(f"SCLIP short_side must be >= 1, got {self.short_side}")
        if not 0.0 <= self.prob_threshold <= 1.0:
            raise UsageError(f"SCLIP prob_threshold must be in [0, 1], got {self.prob_threshold}")
        if not 0.0 <= self.area_threshold <= 1.0:
            raise UsageError(f"SCLIP area_threshold must be in [0, 1], got {self.area_threshold}")
        if self.max_long_side < 1:
            raise UsageError(f"SCLIP max_long_side must be >= 1, got {self.max_long_side}")


SCLIP_PRESETS: dict[str, SCLIPConfig] = {
    # Test-only: the 2-layer tiny CLIP (64x64, patch 16), windows of 64 with stride 32.
    "tiny": SCLIPConfig(
        clip_model=TINY, clip_pretrained=None, image_size=64, patch_size=16,
        slide_crop=64, slide_stride=32, short_side=96,
    ),
    # SCLIP's default backbone (OpenAI ViT-B/16, QuickGELU).
    "vit-b16": SCLIPConfig(clip_model="ViT-B-16", clip_pretrained="openai", image_size=224, patch_size=16),
    "vit-l14-336": SCLIPConfig(
        clip_model="ViT-L-14-336", clip_pretrained="openai", image_size=336, patch_size=14
    ),
}  # fmt: skip


def _preset(name: str) -> SCLIPConfig:
    try:
        return SCLIP_PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown SCLIP preset {name!r}; choose one of {', '.join(SCLIP_PRESETS)}") from None
