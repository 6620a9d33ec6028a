"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as SCLIP uses it.

The refinement propagates a mask along a local colour affinity of the guidance image:

* for each dilation ``d`` the 8 neighbours at offsets ``d * {-1, 0, 1}^2 \\ (0, 0)`` are taken
  with replicate padding;
* ``std`` is the unbiased standard deviation, per pixel and colour channel, over the 9 taps
  (centre + 8 neighbours) of *all* dilations together (the centre is counted once per dilation);
* ``aff_n = -|x_c - x_n| / (1e-8 + 0.1 * std)``, averaged over the colour channels and
  soft-maxed over all neighbours of all dilations;
* ``num_iter`` times: ``mask <- sum_n aff_n * mask_n`` (the centre is not a neighbour).

Shifts are plain slices of a replicate-padded tensor, so the module exports to ONNX opset 17
(``Pad`` in ``edge`` mode + ``Slice``) with any spatial size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAMR"]

# The 8 neighbour directions, row-major, centre excluded.
_DIRECTIONS: tuple[tuple[int, int], ...] = tuple(
    (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)


def _neighbours(x: torch.Tensor, dilation: int) -> list[torch.Tensor]:
    """The 8 replicate-padded shifts of ``x`` [B, C, H, W] at ``dilation``, each [B, C, H, W]."""
    height, width = x.shape[-2], x.shape[-1]
    d = dilation
    padded = F.pad(x, (d, d, d, d), mode="replicate")
    return [
        padded[:, :, d + dy * d : d + dy * d + height, d + dx * d : d + dx * d + width]
        for dy, dx in _DIRECTIONS
    ]


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement.

    Args:
        num_iter: propagation steps; 0 returns the mask unchanged.
        dilations: neighbourhood dilations (pixels); SCLIP uses ``(8, 16)``.

    ``forward(image [B, 3, H, W], mask [B, C, H, W]) -> [B, C, H, W]``. The guidance image is
    resized bilinearly (align_corners=True, as the original PAMR) to the mask's size when they
    differ; SCLIP passes it already at the mask's size.
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        if num_iter < 0:
            raise ValueError(f"num_iter must be >= 0, got {num_iter}")
        dilations = tuple(int(d) for d in dilations)
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers, got {dilations}")
        self.num_iter = int(num_iter)
        self.dilations = dilations

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}"

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 1, K, H, W]`` soft-maxed affinities to the ``K = 8 * len(dilations)`` neighbours."""
        taps: list[torch.Tensor] = []  # centre + 8 neighbours per dilation (for the std)
        neigh: list[torch.Tensor] = []
        for d in self.dilations:
            shifted = _neighbours(image, d)
            taps.append(image)
            taps.extend(shifted)
            neigh.extend(shifted)
        stack = torch.stack(taps, dim=2)  # [B, 3, T, H, W]
        count = stack.shape[2]
        mean = stack.mean(dim=2, keepdim=True)
        var = ((stack - mean) ** 2).sum(dim=2, keepdim=True) / (count - 1)  # unbiased
        std = torch.sqrt(var)
        neighbours = torch.stack(neigh, dim=2)  # [B, 3, K, H, W]
        aff = -torch.abs(image.unsqueeze(2) - neighbours) / (1e-8 + 0.1 * std)
        aff = aff.mean(dim=1, keepdim=True)  # over colour channels
        return F.softmax(aff, dim=2)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.num_iter == 0:
            return mask
        if image.shape[-2:] != mask.shape[-2:]:
            image = F.interpolate(image, size=mask.shape[-2:], mode="bilinear", align_corners=True)
        aff = self.affinity(image.to(mask.dtype))  # [B, 1, K, H, W]
        weights = aff.unbind(dim=2)  # K tensors [B, 1, H, W]
        for _ in range(self.num_iter):
            # Accumulate neighbour by neighbour: never materialises [B, C, K, H, W].
            shifted = [s for d in self.dilations for s in _neighbours(mask, d)]
            out = weights[0] * shifted[0]
            for w, s in zip(weights[1:], shifted[1:]):
                out = out + w * s
            mask = out
        return mask
