"""Multi-scale deformable attention (Deformable DETR's MSDeformAttn), written to export to plain ONNX.

Each query looks at a handful of learned locations around its reference point on every level of a
feature pyramid, instead of attending to every pixel: per head, level and point, a linear layer of
the query predicts an offset (in pixels of that level) and an attention weight (softmax over all
levels x points of the head). The head's value channels are sampled bilinearly at those locations
and summed with the weights.

The original implementation samples with a custom CUDA kernel. Here the sampling is
:func:`torch.nn.functional.grid_sample` (bilinear, zero padding, ``align_corners=False``), which the
TorchScript exporter turns into the standard ``GridSample`` operator (opset 16+), so no custom op
or plugin is needed. :func:`bilinear_sample_reference` is an independent gather-based formulation
of the same sampling, used by the tests to pin down the convention.

Coordinate convention (shared by both samplers): a location ``(x, y)`` in ``[0, 1]`` is normalised
by the map's width and height with pixel *centres* at ``(i + 0.5) / W``; so ``x = 0`` is the left
edge of the first pixel, and anything outside the map reads zeros (bilinear weights of outside
pixels contribute nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Sampler",
    "grid_sample_bilinear",
    "bilinear_sample_reference",
    "multi_scale_deformable_sample",
    "MultiScaleDeformableAttention",
]

#: ``sampler(value [N, C, H, W], locations [N, Q, P, 2] in [0, 1]) -> [N, C, Q, P]``
Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def grid_sample_bilinear(value: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``value`` [N, C, H, W] at ``locations`` [N, Q, P, 2] (x, y in [0, 1]).

    Returns ``[N, C, Q, P]``; locations outside the map read zeros. Exports to ONNX ``GridSample``.
    """
    # grid_sample wants [-1, 1] with align_corners=False: the same pixel-centre convention as [0, 1].
    grid = locations * 2.0 - 1.0
    return F.grid_sample(value, grid.to(value.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def bilinear_sample_reference(value: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """Same result as :func:`grid_sample_bilinear`, computed by gathering the four neighbours.

    Slower and not meant for export; it exists so that the grid_sample convention (pixel centres,
    zero padding) is checked against an explicit formula, and it is differentiable in ``value`` and
    ``locations`` like the fast path.
    """
    n, c, h, w = value.shape
    q, p = locations.shape[1], locations.shape[2]
    # Continuous pixel coordinates: pixel i covers [i, i + 1) and has its centre at i + 0.5.
    px = locations[..., 0] * w - 0.5
    py = locations[..., 1] * h - 0.5
    x0 = torch.floor(px)
    y0 = torch.floor(py)
    fx = px - x0  # weight of the right neighbour; floor has zero gradient, so d/dpx flows through here
    fy = py - y0
    flat = value.reshape(n, c, h * w)
    out = value.new_zeros(n, c, q * p)
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi = (x0 + dx).long()
        yi = (y0 + dy).long()
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).reshape(n, 1, q * p).expand(n, c, q * p)
        gathered = flat.gather(2, index)
        out = out + gathered * (weight * inside.to(weight.dtype)).reshape(n, 1, q * p)
    return out.reshape(n, c, q, p)


def multi_scale_deformable_sample(
    values: Sequence[torch.Tensor],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    sampler: Sampler = grid_sample_bilinear,
) -> torch.Tensor:
    """The core of MSDeformAttn: per-head bilinear sampling and the weighted sum over levels and points.

    Args:
        values: one map per level, ``[B, C, H_l, W_l]`` (already value-projected), ``C = heads * d``
            with head ``k`` owning channels ``k*d … (k+1)*d - 1``.
        sampling_locations: ``[B, Q, heads, levels, points, 2]``, x, y in [0, 1].
        attention_weights: ``[B, Q, heads, levels, points]``.
        sampler: :func:`grid_sample_bilinear` (export) or :func:`bilinear_sample_reference`.

    Returns:
        ``[B, Q, C]``.
    """
    _, q, heads, levels, points, _ = sampling_locations.shape
    if len(values) != levels:
        raise ValueError(f"expected {levels} value maps, got {len(values)}")
    channels = values[0].shape[1]
    head_dim = channels // heads
    sampled = []
    for level, value in enumerate(values):
        h, w = value.shape[-2:]
        # [B, C, H, W] -> [B*heads, d, H, W]: each head samples its own channels at its own points.
        per_head = value.reshape(-1, head_dim, h, w)
        loc = sampling_locations[:, :, :, level].transpose(1, 2).reshape(-1, q, points, 2)
        sampled.append(sampler(per_head, loc))  # [B*heads, d, Q, P]
    stacked = torch.stack(sampled, dim=-2)  # [B*heads, d, Q, L, P]
    weights = attention_weights.transpose(1, 2).reshape(-1, 1, q, levels, points)
    out = (stacked * weights).sum(dim=(-1, -2))  # [B*heads, d, Q]
    return out.reshape(-1, channels, q).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention of queries over a multi-level feature pyramid (Zhu et al., 2021).

    ``forward(query [B, Q, C], reference_points [B, Q, 2], values: num_levels maps [B, C, H_l, W_l])
    -> [B, Q, C]``. Reference points are (x, y) in [0, 1] of the image, shared by all levels, so one
    query looks at the same image region at every scale. Offsets are predicted in pixels of each
    level (normalised by its width and height), which makes a point's reach grow with the stride.

    Initialisation follows the paper: offset weights zero and offset bias a ring of ``num_heads``
    directions whose radius grows with the point index (each head starts looking in its own
    direction, at 1, 2, … pixels), attention weights zero (uniform attention at the start), and
    Xavier-uniform value and output projections.
    """

    def __init__(
        self, embed_dim: int, num_heads: int = 8, num_levels: int = 4, num_points: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if min(num_heads, num_levels, num_points) < 1:
            raise ValueError("num_heads, num_levels and num_points must be >= 1")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        #: the sampling function; tests swap in :func:`bilinear_sample_reference`.
        self.sampler: Sampler = grid_sample_bilinear
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation (see the class docstring)."""
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        angles = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
        ring = torch.stack([angles.cos(), angles.sin()], dim=-1)
        ring = ring / ring.abs().max(dim=-1, keepdim=True).values  # on the unit square: one pixel away
        ring = ring.view(heads, 1, 1, 2).repeat(1, levels, points, 1)
        ring = ring * torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def sampling_locations_and_weights(
        self, query: torch.Tensor, reference_points: torch.Tensor, level_shapes: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each head samples and with what weight.

        Returns ``locations [B, Q, heads, levels, points, 2]`` (x, y in [0, 1]) and
        ``weights [B, Q, heads, levels, points]`` that sum to 1 over levels x points for each head.
        """
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        q = query.shape[1]
        offsets = self.sampling_offsets(query).reshape(-1, q, heads, levels, points, 2)
        logits = self.attention_weights(query).reshape(-1, q, heads, levels * points)
        weights = logits.softmax(dim=-1).reshape(-1, q, heads, levels, points)
        # Offsets are in pixels of each level: divide by (W_l, H_l). Sizes are static for a fixed image size.
        normaliser = torch.tensor(
            [[float(w), float(h)] for h, w in level_shapes], dtype=query.dtype, device=query.device
        ).view(1, 1, 1, levels, 1, 2)
        locations = reference_points[:, :, None, None, None, :] + offsets / normaliser
        return locations, weights

    def forward(
        self, query: torch.Tensor, reference_points: torch.Tensor, values: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """``query [B, Q, C]``, ``reference_points [B, Q, 2]``, ``values``: num_levels x ``[B, C, H_l, W_l]``.

        Returns ``[B, Q, C]``.
        """
        if len(values) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} value maps, got {len(values)}")
        shapes = [(int(v.shape[-2]), int(v.shape[-1])) for v in values]
        locations, weights = self.sampling_locations_and_weights(query, reference_points, shapes)
        # The value projection is a per-pixel linear map: a 1x1 convolution keeps the maps in NCHW.
        kernel = self.value_proj.weight[:, :, None, None]
        projected = [F.conv2d(v, kernel, self.value_proj.bias) for v in values]
        out = multi_scale_deformable_sample(projected, locations, weights, sampler=self.sampler)
        return self.dropout(self.output_proj(out))
