"""SCLIP's sliding-window geometry for the PyTorch model: a traceable bicubic resize, and the window grid
and short-side size of the runtime (one definition, so the reference and the runtime cut the same windows)."""

from __future__ import annotations

import torch

from vlexport.runtime.tasks.segment import short_side_size, window_grid

__all__ = ["window_grid", "short_side_size"]


def _bicubic_matrix(n: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    """Weights ``[n, size]`` of PyTorch's 1-D bicubic resize from ``size`` samples to ``n``.

    As ``F.interpolate(mode="bicubic", align_corners=False, scale_factor=(n + 0.1) / size)``
    (SCLIP's DINO-style factor): source position ``(i + 0.5) * size / (n + 0.1) - 0.5``, Keys
    kernel with ``A = -0.75``, taps clamped to the border. ``n`` is a (traced) integer tensor, so
    an exported graph computes the matrix for whatever size it is fed.
    """
    dtype, device = like.dtype, like.device
    a = -0.75
    real = (torch.arange(n, device=device).to(dtype) + 0.5) * (size / (n.to(dtype) + 0.1)) - 0.5
    start = torch.floor(real)
    t = (real - start).clamp(0.0, 1.0)[:, None]
    u = torch.cat([t + 1.0, t, 1.0 - t, 2.0 - t], dim=1)  # distance to the 4 taps, [n, 4]
    near = ((a + 2.0) * u - (a + 3.0)) * u * u + 1.0  # |x| <= 1
    far = ((a * u - 5.0 * a) * u + 8.0 * a) * u - 4.0 * a  # 1 < |x| < 2
    weights = torch.cat([far[:, :1], near[:, 1:3], far[:, 3:]], dim=1)
    taps = (start[:, None] + torch.arange(-1, 3, device=device).to(dtype)).clamp(0, size - 1)
    onehot = (taps[:, :, None] == torch.arange(size, device=device).to(dtype)).to(dtype)  # [n, 4, size]
    return (weights[:, :, None] * onehot).sum(dim=1)
