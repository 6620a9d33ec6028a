"""The test-only ``"tiny"`` CLIP preset: a 2-layer CLIP with ViT-B-32's tokenizer that builds in milliseconds."""

from __future__ import annotations

from typing import Any

__all__ = ["TINY"]

#: Name of the test-only preset: a 2-layer CLIP that builds in milliseconds.
TINY = "tiny"

# Config of the "tiny" preset, in open_clip's model-config format (heads = width // head_width).
_TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# The tiny preset shares ViT-B-32's BPE vocabulary (49408 tokens).
_TINY_TOKENIZER_FROM = "ViT-B-32"
