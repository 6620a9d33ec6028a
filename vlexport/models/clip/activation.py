"""Which MLP activation a CLIP model's weights were trained with (QuickGELU or GELU).

The MLP activation is decided from where the weights come from (:func:`resolve_activation`):
OpenAI's CLIP uses QuickGELU (``x * sigmoid(1.702 x)``) while open_clip's plain configs build
``nn.GELU``, and running weights with the other one shifts every embedding. A ``-quickgelu``
model name, a pretrained tag's config, an ``open_clip_config.json`` beside a weights file, or
OpenAI's checkpoint layout (TorchScript release archives and plain state dicts with OpenAI's key
names) decide it, unless the caller names the activation explicitly.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch

from vlexport.errors import UsageError
from vlexport.models.clip.tiny import TINY

__all__ = ["ACTIVATIONS", "resolve_activation"]

#: ``activation=`` values: decide from the weights' provenance, or force one.
ACTIVATIONS = ("auto", "quickgelu", "gelu")
# Entries OpenAI's TorchScript archives carry besides the weights (open_clip drops them too).
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (how OpenAI released its CLIP weights)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    # torch.save archives hold data.pkl only; TorchScript ones also hold their code and constants.
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # TorchScript archives hold tensors and TorchScript code, not arbitrary pickled Python objects.
    module = torch.jit.load(str(path), map_location="cpu")
    state = {k: v for k, v in module.state_dict().items() if k not in _TORCHSCRIPT_EXTRA_KEYS}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _state_dict_keys(path: Path) -> list[str]:
    """The tensor names of a weights file (read once more by the loader; cheap next to building the model)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    if _is_torchscript(path):
        return list(_torchscript_state_dict(path))
    return list(open_clip.factory.load_state_dict(str(path), weights_only=True))


def _is_openai_layout(keys: Sequence[str]) -> bool:
    """OpenAI CLIP's own parameter names (a ViT or ModifiedResNet image tower, the CLIP text tower).

    open_clip's native ViT checkpoints share these names; timm towers (``visual.trunk``), Hugging
    Face text towers (``text.``) and SigLIP (``logit_bias``) do not.
    """
    names = set(keys)
    if any(k.startswith(("visual.trunk.", "text.")) for k in names) or "logit_bias" in names:
        return False
    text = {"token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"}
    vision = any(k.startswith(("visual.transformer.resblocks.", "visual.layer1.")) for k in names)
    return text <= names and vision and any(k.startswith("transformer.resblocks.") for k in names)


def _sibling_config_quick_gelu(path: Path) -> bool | None:
    """``model_cfg.quick_gelu`` of an ``open_clip_config.json`` beside the weights (Hugging Face layout)."""
    config = path.parent / "open_clip_config.json"
    if not config.is_file():
        return None
    try:
        model_cfg = json.loads(config.read_text(encoding="utf-8")).get("model_cfg", {})
    except (OSError, ValueError, AttributeError):
        return None
    return bool(model_cfg.get("quick_gelu", False)) if isinstance(model_cfg, dict) else None


def _config_quick_gelu(model_name: str) -> bool:
    if model_name == TINY:
        return False
    return bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise UsageError(f"unknown CLIP activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


def resolve_activation(
    model_name: str,
    activation: str = "auto",
    *,
    pretrained: str | None = None,
    pcfg: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
) -> tuple[str, str]:
    """``("quickgelu" | "gelu", why)`` for a CLIP model and where its weights come from.

    In order: an explicit ``activation``; a ``-quickgelu`` model config; a pretrained tag's
    config; for a weights file, an ``open_clip_config.json`` beside it, else QuickGELU when the
    file has OpenAI's layout (OpenAI trained every CLIP it released with QuickGELU; pass
    ``activation="gelu"`` for open_clip weights trained with ``nn.GELU`` in the same layout);
    otherwise the model config's own activation.

    Raises:
        UsageError: ``activation`` is unknown or contradicts a ``-quickgelu`` model name.
    """
    _check_activation(activation)
    config_quick = _config_quick_gelu(model_name)
    if activation != "auto":
        if config_quick and activation == "gelu":
            raise UsageError(f"CLIP model {model_name} is a QuickGELU config but activation gelu was asked for: "
                             f"drop one of them (e.g. use {model_name.removesuffix('-quickgelu')})")
        return activation, "asked for"
    if config_quick:
        return "quickgelu", f"model config {model_name}"
    if pcfg:
        return ("quickgelu" if pcfg.get("quick_gelu") else "gelu"), f"pretrained tag {pretrained}"
    if checkpoint is not None:
        sibling = _sibling_config_quick_gelu(checkpoint)
        if sibling is not None:
            return ("quickgelu" if sibling else "gelu"), "open_clip_config.json beside the weights"
        try:
            keys = _state_dict_keys(checkpoint)
        except Exception:  # unreadable: _load_weights reports it with a clear message
            keys = []
        if _is_openai_layout(keys):
            return "quickgelu", "OpenAI CLIP layout of the weights file (pass activation gelu for nn.GELU weights)"
    return ("quickgelu" if config_quick else "gelu"), "model config"


