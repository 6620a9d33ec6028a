"""Activation ranges for INT8, chosen per tensor and tied where onnxruntime wants one scale.

``quantize_static`` takes one (lowest, highest) pair per tensor from a calibration cache. The
``auto`` calibration method chooses that pair for each tensor by measurement: it histograms the
tensor's values on the calibration inputs and keeps the candidate range (min-max, or the range
clipped at the 99.9th, 99.99th or 99.999th percentile) with the lowest expected quantisation
error, rounding inside the range plus clipping outside it. A long-tailed activation (a few huge
values among small ones) gets a percentile range and keeps its resolution; a compact one keeps
min-max, which clips nothing. :func:`tie_ranges` then gives the inputs and output of every
Concat (and the two sides of the ops that only move data) one shared range, so onnxruntime's
QLinearConcat copies bytes instead of requantising each input.

numpy, onnx and onnxruntime only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger("vlexport")

__all__ = ["PERCENTILES", "RangeChoice", "TensorHistogram", "collect_histograms", "choose_range", "tie_ranges"]

# Clipping candidates of the ``auto`` method, as percentiles of the values (both tails).
PERCENTILES = (99.9, 99.99, 99.999)
_BINS = 2048
# A clipped range must beat min-max by this factor to be chosen: a few per cent of estimated
# error is within what 32 calibration images can tell apart.
_MIN_GAIN = 0.9
# Ops whose output holds the same values as their (first) input: they keep its scale.
_SAME_VALUES = ("Split", "Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize")


@dataclass
class TensorHistogram:
    """A tensor's values on the calibration inputs: min, max and a histogram between them."""

    lowest: float
    highest: float
    counts: np.ndarray  # int64 [bins] over [lowest, highest]

    def edges(self) -> np.ndarray:
        return np.linspace(self.lowest, self.highest, len(self.counts) + 1)


@dataclass(frozen=True)
class RangeChoice:
    """The range chosen for one tensor, the candidate it came from and its estimated error."""

    lowest: float
    highest: float
    method: str  # "minmax" or "percentile:<p>"
    error: float  # expected squared quantisation error per value
    minmax_error: float


def collect_histograms(onnx_path: str | Path, inputs: Sequence[dict[str, np.ndarray]],
                       ranges: dict[str, tuple[float, float]], bins: int = _BINS) -> dict[str, TensorHistogram]:
    """Histograms of ``ranges``' tensors (names → min-max already collected) over ``inputs``."""
    from vlexport.calibration.activations import _session_with_outputs

    sess, names = _session_with_outputs(onnx_path, list(ranges))
    model_inputs = {i.name for i in sess.get_inputs()}
    fetch = [t for t in names if t not in model_inputs]
    hists = {t: TensorHistogram(float(ranges[t][0]), float(ranges[t][1]), np.zeros(bins, np.int64)) for t in names}
    for feed in inputs:
        values = dict(zip(fetch, sess.run(fetch, feed)))
        for t in names:
            v = feed[t] if t in model_inputs else values[t]
            h = hists[t]
            width = h.highest - h.lowest
            if width <= 0 or not isinstance(v, np.ndarray) or v.dtype.kind != "f":
                continue
            idx = ((v.ravel().astype(np.float32) - h.lowest) * (bins / width)).astype(np.int64)
            np.clip(idx, 0, bins - 1, out=idx)
            h.counts += np.bincount(idx, minlength=bins)
    return hists


def _error(centers: np.ndarray, counts: np.ndarray, lo: float, hi: float, levels: int) -> float:
    """Expected squared error per value of quantising to ``levels`` steps over [lo, hi]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the quantiser keeps 0 exact, as onnxruntime's does
    step = (hi - lo) / levels if hi > lo else 0.0
    inside = (centers >= lo) & (centers <= hi)
    clipped = np.where(centers < lo, lo - centers, np.where(centers > hi, centers - hi, 0.0))
    total = counts.sum()
    if total == 0:
        return 0.0
    err = counts[inside].sum() * step * step / 12.0 + float((counts * clipped * clipped).sum())
    return float(err / total)


def _percentile_range(h: TensorHistogram, p: float, symmetric: bool) -> tuple[float, float]:
    edges = h.edges()
    if symmetric:
        # |x| percentile: fold the histogram around 0 by the bins' absolute centres.
        centers = np.abs((edges[:-1] + edges[1:]) / 2)
        order = np.argsort(centers)
        cum = np.cumsum(h.counts[order]) / max(1, h.counts.sum())
        k = int(np.searchsorted(cum, p / 100.0))
        a = float(centers[order][min(k, len(order) - 1)])
        return -a, a
    cum = np.cumsum(h.counts) / max(1, h.counts.sum())
    tail = (100.0 - p) / 200.0  # half the excluded mass on each side
    lo = float(edges[int(np.searchsorted(cum, tail))])
    hi = float(edges[min(len(edges) - 1, int(np.searchsorted(cum, 1.0 - tail)) + 1)])
    return lo, hi


def choose_range(h: TensorHistogram, *, symmetric: bool = False, levels: int = 255,
                 percentiles: Iterable[float] = PERCENTILES) -> RangeChoice:
    """The candidate range with the lowest expected error (min-max unless a clip clearly wins)."""
    edges = h.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    if symmetric:
        a = max(abs(h.lowest), abs(h.highest))
        base = (-a, a)
    else:
        base = (h.lowest, h.highest)
    base_err = _error(centers, h.counts, *base, levels)
    best = RangeChoice(base[0], base[1], "minmax", base_err, base_err)
    for p in percentiles:
        lo, hi = _percentile_range(h, p, symmetric)
        if hi <= lo:
            continue
        err = _error(centers, h.counts, lo, hi, levels)
        if err < best.error and err < _MIN_GAIN * base_err:
            best = RangeChoice(lo, hi, f"percentile:{p:g}", err, base_err)
    return best


def tie_ranges(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], max_widening: float = 4.0) -> int:
    """Give each Concat's inputs and output, and both sides of each data-movement op, one range
    (the union of theirs), in place. Returns how many tensors' ranges widened.

    onnxruntime's QLinearConcat copies bytes only when every input already has the output's
    scale; with scales of their own each input is requantised element by element.
    """
    parent: dict[str, str] = {t: t for t in ranges}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def union(names: Iterable[str]) -> None:
        known = [t for t in names if t in parent]
        for t in known[1:]:
            a, b = find(known[0]), find(t)
            if a != b:
                parent[b] = a

    for node in model.graph.node:
        if node.op_type == "Concat":
            union([*node.input, *node.output])
        elif node.op_type in _SAME_VALUES and node.input:
            union([node.input[0], *node.output])
    groups: dict[str, list[str]] = {}
    for t in ranges:
        groups.setdefault(find(t), []).append(t)
    widened = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        lo = min(float(ranges[t][0]) for t in members)
        hi = max(float(ranges[t][1]) for t in members)
        # A tensor whose range would grow more than max_widening times loses more than
        # log2(max_widening) bits of resolution: such a group keeps its own ranges.
        narrowest = min(max(float(ranges[t][1]) - float(ranges[t][0]), 1e-12) for t in members)
        if (hi - lo) > max_widening * narrowest:
            continue
        for t in members:
            if (float(ranges[t][0]), float(ranges[t][1])) != (lo, hi):
                widened += 1
            ranges[t] = (lo, hi)
    return widened
