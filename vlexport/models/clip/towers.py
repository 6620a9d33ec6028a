"""Frozen open_clip towers: the text and image encoders on a model from :func:`load_clip_model`.

Loading and weight resolution are in :mod:`vlexport.models.clip.weights`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.models.clip.weights import LoadedCLIP, load_clip_model

__all__ = ["FrozenCLIPTextEncoder", "FrozenCLIPImageEncoder"]


# --------------------------------------------------------------------------------------------------
# encoders


@contextlib.contextmanager
def _export_safe_attention() -> Iterator[None]:
    """Disable nn.MultiheadAttention's fused fast path while tracing/exporting.

    With frozen parameters in eval mode PyTorch picks ``aten::_native_multi_head_attention``,
    which the ONNX exporter cannot convert; the regular path computes the same function.
    """
    exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
    if not exporting or not torch.backends.mha.get_fastpath_enabled():
        yield
        return
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


_T = TypeVar("_T", bound="_FrozenTower")


class _FrozenTower(nn.Module):
    """Shared plumbing: holds the (shared, cached) CLIP model, frozen and always in eval mode.

    The wrapped model is the one cached by :func:`load_clip_model`: moving an encoder to another
    device or dtype moves that shared model too.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        *,
        activation: str = "auto",
        allow_random: bool = True,
        offline: bool | None = None,
    ) -> None:
        super().__init__()
        self._setup(load_clip_model(model_name, pretrained, activation=activation, allow_random=allow_random,
                                    offline=offline))

    @classmethod
    def from_loaded(cls: type[_T], loaded: LoadedCLIP) -> _T:
        """Wrap an already loaded model (no loading, no cache lookup)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(loaded)
        return obj

    def _setup(self, loaded: LoadedCLIP) -> None:
        self.loaded = loaded
        self.clip = loaded.model
        self.model_name = loaded.model_name
        self.pretrained = loaded.pretrained
        self.is_pretrained = loaded.is_pretrained
        self.weights_sha256 = loaded.weights_sha256
        self.weights_source = loaded.weights_source
        self.activation = loaded.activation
        self.embed_dim = loaded.embed_dim
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _FrozenTower:
        """Frozen towers stay in eval mode whatever is asked (dropout/batch-norm off)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device


class FrozenCLIPTextEncoder(_FrozenTower):
    """The text tower of a CLIP model: tokens -> L2-normalised embeddings.

    ``FrozenCLIPTextEncoder(model_name="ViT-B-32", pretrained="openai", *, activation="auto",
    allow_random=True, offline=None)`` loads through :func:`load_clip_model`; ``FrozenCLIPTextEncoder.from_loaded(loaded)``
    wraps a model already loaded.

    Attributes: ``embed_dim``, ``context_length``, ``model_name``, ``pretrained``, ``is_pretrained``,
    ``weights_sha256``, ``weights_source``, ``activation``.
    """

    def _setup(self, loaded: LoadedCLIP) -> None:
        super()._setup(loaded)
        self.context_length = loaded.context_length
        self.tokenizer = loaded.tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize with the model's tokenizer: ``LongTensor[N, context_length]`` (long texts truncated)."""
        if isinstance(texts, str):
            raise TypeError("tokenize() takes a list of strings, not a single string")
        tokens = self.tokenizer(list(texts))
        return tokens.to(torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [N, context_length] int64 -> ``[N, embed_dim]`` float, unit L2 norm."""
        with _export_safe_attention():
            return self.clip.encode_text(tokens, normalize=True)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Embed texts in batches without gradients: ``FloatTensor[N, embed_dim]`` on the model's device."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        if not texts:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32, device=self.device)
        device = self.device
        chunks = [
            self._encode_trimmed(self.tokenize(texts[i : i + batch_size]).to(device))
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks).float()

    def _encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Same result as ``forward`` but runs only up to the longest prompt's end-of-text token.

        In a causal text tower pooled at the end-of-text token, the padding after it never
        influences the pooled feature, so dropping it is exact; prompts are ~15 of 77 tokens,
        which makes baking 80 templates several times faster.
        """
        clip = self.clip
        trimmable = (
            getattr(clip, "text_pool_type", None) == "argmax"
            and getattr(clip, "attn_mask", None) is not None
            and hasattr(clip, "token_embedding")
            and hasattr(clip, "positional_embedding")
        )
        if not trimmable:
            return self(tokens)
        length = int(tokens.argmax(dim=-1).max()) + 1  # end-of-text has the largest token id
        t = tokens[:, :length]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(t).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0]), t.argmax(dim=-1)]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)


class FrozenCLIPImageEncoder(_FrozenTower):
    """The vision tower of a CLIP model (distillation teacher): images -> L2-normalised embeddings.

    ``forward(images)`` takes float RGB images ``[B, 3, H, W]`` in ``[0, 1]`` of any size, resizes
    them (bilinear, no antialias) to ``image_size``, applies the model's mean/std normalisation and
    returns ``[B, embed_dim]`` with unit L2 norm.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def _setup(self, loaded: LoadedCLIP) -> None:
        super()._setup(loaded)
        cfg = loaded.preprocess_cfg
        size = cfg["size"]
        self.image_size: tuple[int, int] = (int(size), int(size)) if isinstance(size, int) else tuple(size)
        self.preprocess_cfg = cfg
        # Non-persistent: derived from the model's config, not weights of their own.
        mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Static check for eager callers; under tracing shapes are symbolic and checked by the exporter.
        if not torch.jit.is_tracing() and (images.ndim != 4 or images.shape[1] != 3):
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        x = F.interpolate(
            images.to(self.mean.dtype), size=self.image_size, mode="bilinear", align_corners=False, antialias=False
        )
        x = (x - self.mean) / self.std
        with _export_safe_attention():
            return self.clip.encode_image(x, normalize=True)
