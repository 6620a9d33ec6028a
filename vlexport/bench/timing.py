"""Timing one measurement: :func:`measure` calls a function and gives its :class:`Timing`.

The percentiles are :func:`vlexport.runtime.pipeline.latency_percentiles` (one implementation
for the runtime's stage statistics and the bench), plus the mean, the minimum and the run count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Timing", "latency_stats", "measure"]


def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 (linear interpolation), mean and min of latencies in ms, and the run count."""
    from vlexport.runtime.pipeline import latency_percentiles

    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("latency_stats needs at least one sample")
    return {**latency_percentiles(x, decimals=4), "mean": round(float(x.mean()), 4), "min": round(float(x.min()), 4),
            "runs": int(x.size)}


@dataclass
class Timing:
    """Latency percentiles (ms) of one measurement and its throughput (``unit`` per second)."""

    latency_ms: dict[str, float]
    per_s: float
    unit: str = "frames"

    def to_dict(self) -> dict[str, Any]:
        """The timing as written in the JSON report."""
        return {"latency_ms": self.latency_ms, "per_s": round(self.per_s, 3), "unit": f"{self.unit}/s"}


def measure(fn: Callable[[], object], runs: int, warmup: int, items: int = 1, unit: str = "frames") -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed.

    The throughput is ``items`` per call over the wall time of the timed calls.
    """
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - start
    return Timing(latency_stats(samples), items * runs / wall if wall > 0 else float("inf"), unit)
