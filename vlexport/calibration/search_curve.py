"""The INT8 precision search's explored points as a PNG: latency against the task metric.

Reads a bundle manifest's ``validation.gate`` (``rounds``: one record per measured point). matplotlib
is imported only here, on its Agg canvas (no pyplot, no display).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlexport.errors import UsageError

__all__ = ["plot_search", "label_offsets"]

# Label placement, in points from the marker: one line of 8 pt text is ~11 points high. As
# fractions of the data span on a 7x4.5 in figure, a label ("r1: 2 float, 0.445x paired") is
# about this wide and one line about this high.
_LINE = 11.0
_LABEL_W, _LABEL_H = 0.3, 0.045


def label_offsets(xs: list[float], ys: list[float],
                  also_drawn: Sequence[tuple[float, float]] = ()) -> list[tuple[float, float, str]]:
    """Where each point's label goes: (dx, dy) in points and the horizontal alignment.

    A search often measures several points within a few hundredths of a latency ratio: each
    label is lifted by whole lines until it clears the labels already placed, instead of being
    printed on top of them, and the labels of the rightmost points extend to the left so that
    they stay inside the axes. ``also_drawn``: other points on the axes (the FP32 point), which
    widen its span.
    """
    if not xs:
        return []
    all_x = list(xs) + [p[0] for p in also_drawn]
    all_y = list(ys) + [p[1] for p in also_drawn]
    x0, y0 = min(all_x), min(all_y)
    xspan = (max(all_x) - x0) or 1.0
    yspan = (max(all_y) - y0) or 1.0
    boxes: list[tuple[float, float, float, float]] = []  # (left, right, bottom, top), normalised
    out = []
    for x, y in zip(xs, ys):
        nx, ny = (x - x0) / xspan, (y - y0) / yspan
        right = nx > 0.75  # a lone point has nx == 0
        left_edge = nx - _LABEL_W if right else nx
        lift = 0
        while any(left_edge < r and left_edge + _LABEL_W > le and ny + lift * _LABEL_H < t
                  and ny + (lift + 1) * _LABEL_H > b for le, r, b, t in boxes):
            lift += 1
        boxes.append((left_edge, left_edge + _LABEL_W, ny + lift * _LABEL_H, ny + (lift + 1) * _LABEL_H))
        out.append((-5.0 if right else 5.0, 4.0 + _LINE * lift, "right" if right else "left"))
    return out


def plot_search(gate: dict[str, Any], path: str | os.PathLike, title: str = "") -> bool:
    """Draw INT8 latency (x: ratio to FP32, or layers kept float when no latency was measured)
    against the metric (y, points) for every explored point, the FP32 point, the budget line and
    the chosen point. Written atomically; False when matplotlib is missing."""
    rounds = list(gate.get("rounds") or [])
    if not rounds:
        raise UsageError("this bundle has no INT8 precision search on record: export it with --int8 --calib "
                         "and a labelled --val to run one")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from vlexport.atomic import atomic_write

    def value(r: dict[str, Any]) -> float:
        return 100.0 * float(r.get("int8_metric", r.get("int8_map50_95", 0.0)))

    timed = all(r.get("latency_ratio") for r in rounds)
    xs = [float(r["latency_ratio"]) if timed else float(r.get("excluded_groups", r.get("excluded_nodes", 0)))
          for r in rounds]
    ys = [value(r) for r in rounds]
    label = {"map50_95": "mAP50-95", "miou": "mIoU", "iou": "IoU"}.get(rounds[0].get("metric", "map50_95"), "metric")
    fp32 = rounds[0].get("fp32_metric")
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(xs, ys, "o", color="tab:blue", label="explored INT8 points")
    fp32_point = [(1.0, 100.0 * fp32)] if timed and fp32 is not None else []
    for r, x, y, (dx, dy, ha) in zip(rounds, xs, ys, label_offsets(xs, ys, fp32_point)):
        # The points within budget were timed again side by side: that ratio decided the choice.
        paired = f", {float(r['paired_latency_ratio']):.3f}x paired" if r.get("paired_latency_ratio") else ""
        ax.annotate(f"r{r['round']}: {r.get('excluded_groups', r.get('excluded_nodes', 0))} float{paired}", (x, y),
                    textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8)
    chosen = [(x, y) for r, x, y in zip(rounds, xs, ys) if r.get("chosen")]
    if chosen:
        ax.plot(*zip(*chosen), "*", color="tab:red", markersize=16, label="chosen")
    if fp32_point:
        ax.plot(*zip(*fp32_point), "s", color="tab:gray", label="FP32")
    if fp32 is not None:
        budget = 100.0 * fp32 - float(gate.get("max_drop", 0.0))
        ax.axhline(budget, linestyle="--", color="tab:orange", label=f"budget (FP32 - {gate.get('max_drop', 0)})")
    measured = all(r.get("latency_measured") for r in rounds)
    ax.set_xlabel(("INT8 latency / FP32 latency" + ("" if measured else " (estimated)")) if timed
                  else "layers kept in float")
    ax.set_ylabel(f"{label}, points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"INT8 precision search ({gate.get('target', '?')} target)", fontsize=10)
    fig.tight_layout()
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return True
