"""PAMR (pixel-adaptive mask refinement) in numpy, for bundles that refine in the runtime.

The same function as ``vlexport.models.sclip.pamr.PAMR`` (which the exporter can also bake into a
``refiner`` graph): per dilation, the 8 edge-padded neighbours; the unbiased std over the 9 taps of
all dilations; ``aff = -|x_c - x_n| / (1e-8 + 0.1 std)`` averaged over colour channels and
soft-maxed over the neighbours; then ``mask <- sum_n aff_n mask_n``, ``num_iter`` times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_DIRECTIONS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _shifts(x: np.ndarray, d: int) -> list[np.ndarray]:
    """The 8 edge-padded shifts of ``x`` [C, H, W] at dilation ``d``."""
    h, w = x.shape[-2:]
    p = np.pad(x, ((0, 0), (d, d), (d, d)), mode="edge")
    return [p[:, d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w] for dy, dx in _DIRECTIONS]


def pamr_affinity(image: np.ndarray, dilations: Sequence[int]) -> np.ndarray:
    """Soft-maxed affinities ``[K, H, W]`` of every pixel to its ``K = 8 len(dilations)`` neighbours."""
    image = np.asarray(image, np.float32)
    taps, neigh = [], []
    for d in dilations:
        s = _shifts(image, int(d))
        taps.append(image)
        taps += s
        neigh += s
    std = np.stack(taps, 1).std(axis=1, ddof=1)  # [3, H, W], unbiased
    aff = -np.abs(image[:, None] - np.stack(neigh, 1)) / (1e-8 + 0.1 * std[:, None])
    aff = aff.mean(axis=0)  # [K, H, W]
    aff = np.exp(aff - aff.max(axis=0, keepdims=True))
    return (aff / aff.sum(axis=0, keepdims=True)).astype(np.float32)


def pamr(image: np.ndarray, mask: np.ndarray, num_iter: int, dilations: Sequence[int] = (8, 16)) -> np.ndarray:
    """Refine ``mask`` [Q, H, W] along the colours of ``image`` [3, H, W] (same H, W)."""
    if num_iter <= 0:
        return mask
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"pamr: image {image.shape[-2:]} and mask {mask.shape[-2:]} sizes differ")
    aff = pamr_affinity(image, dilations)
    mask = np.asarray(mask, np.float32)
    for _ in range(num_iter):
        shifted = [s for d in dilations for s in _shifts(mask, int(d))]
        out = aff[0] * shifted[0]
        for a, s in zip(aff[1:], shifted[1:]):
            out += a * s
        mask = out
    return mask
