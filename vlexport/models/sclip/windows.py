"""SCLIP's sliding-window geometry: the window grid, the short-side resize and a traceable bicubic resize."""

from __future__ import annotations

import torch

__all__ = ["window_grid", "resize_short_side"]


def window_grid(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """SCLIP's sliding windows ``(y1, y2, x1, x2)``, row-major.

    ``grids = max(size - crop + stride - 1, 0) // stride + 1`` per axis; window ``i`` starts at
    ``i * stride``, ends at ``min(start + crop, size)`` and the last one is shifted back inside
    (``start = max(end - crop, 0)``). Every window has size ``min(crop, H) x min(crop, W)``.
    """
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be >= 1, got {crop}, {stride}")
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * stride + crop, height)
            x2 = min(j * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


def resize_short_side(height: int, width: int, short_side: int, max_long_side: int = 2048) -> tuple[int, int]:
    """mmcv ``rescale_size`` with ``scale=(max_long_side, short_side)``, keep ratio: the new ``(h, w)``."""
    s = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * s + 0.5), int(width * s + 0.5)


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
