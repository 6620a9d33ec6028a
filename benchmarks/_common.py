"""Helpers shared by the benchmark scripts: interleaved timing and JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable


def interleaved_latency(contenders: dict[str, Callable[[], object]], *, warmup: int = 5, rounds: int = 10,
                        per_round: int = 5, settle: int = 1) -> dict[str, dict[str, float]]:
    """Time each callable in alternating rounds so that machine noise hits all of them alike.

    Each round starts every contender with ``settle`` untimed calls: the first call after another
    contender's is slower (its threads still spin, the caches hold its data), which penalises the
    fastest contender most, while a deployed model runs back to back.

    Returns per contender: median, p90, min and mean latency in milliseconds over all runs, and
    the median of each round (for :func:`paired_ratio`).
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    by_round: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            for _ in range(settle):
                fn()
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t) * 1000.0)
            by_round[name].append(statistics.median(samples[name][-per_round:]))
    out = {}
    for name, xs in samples.items():
        xs_sorted = sorted(xs)
        out[name] = {
            "median_ms": statistics.median(xs),
            "p90_ms": xs_sorted[int(0.9 * (len(xs) - 1))],
            "min_ms": xs_sorted[0],
            "mean_ms": statistics.fmean(xs),
            "runs": len(xs),
            "round_medians_ms": by_round[name],
        }
    return out


def paired_ratio(latency: dict[str, dict], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s round median / ``reference``'s in the same round: the ratio
    with the machine's drift between rounds taken out (both ran back to back in each round)."""
    a, b = latency[name]["round_medians_ms"], latency[reference]["round_medians_ms"]
    return statistics.median(x / y for x, y in zip(a, b))


def machine_info() -> dict[str, str]:
    import os

    return {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or "?", "cpus": str(os.cpu_count())}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print(fmt.format(*["-" * w for w in widths]))
    for r in rows:
        print(fmt.format(*r))


def image_feed(backend, tensor):
    """The image feed ``backend`` runs fastest: the pre-processed float ``tensor``, or its uint8
    codes when the graph's image input is quantised (the cpu target's INT8 graph takes pixels), so
    that no contender's timing includes a conversion the runtime would not do."""
    from vlexport.runtime.backends.onnxruntime import quantize_feed

    q = getattr(backend, "quantized_inputs", {}).get("images")
    return {"images": quantize_feed(tensor, *q) if q else tensor}
