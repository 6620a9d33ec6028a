"""The INT8 precision search: which layers stay in float, chosen by measured accuracy and latency.

Each candidate is a *group*: the quantised nodes of one layer (a convolution with its SiLU, a
block's residual Add, a Concat), named by their module path in the exported graph. For each
group the search knows two measured figures:

* its accuracy sensitivity: the error its int8 nodes *add* to what they receive (1 − cosine of
  their outputs against FP32, less the worst error among their quantised ancestors), summed
  over the group, on a few calibration images (:func:`local_errors`);
* its latency cost of staying in float: the group's kernel time in the FP32 graph minus its
  kernel time in the INT8 graph, from onnxruntime's profiler on the target backend
  (:func:`group_costs`). A group whose float kernels are faster than its integer ones (a
  3-channel first convolution) has a negative cost: keeping it float gains accuracy for free.
  For the ``tensorrt`` target, which cannot run here, the cost is the group's FP32 kernel time
  (int8 pays where the float compute is).

The groups are ranked greedily by accuracy gained per millisecond lost (free groups first), and
the search measures points along that ranking: the task metric on held-out images and the
latency (INT8 and FP32 timed interleaved, so machine drift cancels in the ratio), doubling the
number of float groups until the metric is within budget, then bisecting back towards fewer
float groups. The points within budget are then timed again side by side in one run, FP32 and
every candidate interleaved round by round (:func:`paired_latency_ratios`): points measured
minutes apart differ by the machine's drift (5-20 % on a shared 2-core machine), more than
two candidates usually do. The lowest paired ratio wins. Every explored point is returned (the manifest records them; ``vlexport inspect --plot`` draws
them). numpy, onnx and onnxruntime only.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

log = logging.getLogger("vlexport")

__all__ = ["group_of", "local_errors", "group_costs", "free_groups", "rank_groups", "measure_latency",
           "paired_latency_ratios", "SearchPoint", "search_schedule"]

# Module names of the leaf layers inside a block: a node "/m.0/cv1/conv/Conv" belongs to "/m.0/cv1".
_LEAF_MODULES = {"conv", "act", "bn", "norm", "proj", "fc", "linear"}
# Free groups: keeping them float must save at least this share of all the groups' cost
# magnitudes to count as faster (0.3 ms on YOLOv8n, 0.01 ms on a tiny SCLIP), since the Q/DQ and
# layout changes at a float island's borders are not in the estimate.
_FREE_FRACTION = 0.01


def group_of(node_name: str) -> str:
    """The layer a node belongs to, from its module path: its name without the op parts (CamelCase:
    ``Conv``, ``Mul``, onnxruntime's fused ``QuickGeluFusion``) and without a leaf module such as
    ``conv`` or ``act``. A name without a module path is its own group."""
    parts = node_name.split("/")
    if len(parts) < 3:
        return node_name
    while len(parts) > 1 and (not parts[-1] or parts[-1][0].isupper()):
        parts.pop()
    if len(parts) > 2 and parts[-1] in _LEAF_MODULES:
        parts.pop()
    return "/".join(parts) if len(parts) > 1 else node_name


def _cosine_error(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0:
        return 0.0 if np.array_equal(a, b) else 1.0
    return float(1.0 - a @ b / denom)


def local_errors(fp32_path: Path, int8_path: Path, feeds: Sequence[dict[str, np.ndarray]],
                 nodes: Sequence[str]) -> dict[str, float]:
    """Per quantised node: the output error it adds to the worst error among its quantised ancestors."""
    from vlexport.calibration.activations import record_activations

    model = onnx.load(str(fp32_path), load_external_data=False)
    by_name = {n.name: n for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    nodes = [n for n in nodes if n in by_name]
    tensors = list(dict.fromkeys(by_name[n].output[0] for n in nodes))
    ref = record_activations(fp32_path, feeds, tensors)
    got = record_activations(int8_path, feeds, [t for t in tensors])
    err = {n: float(np.mean([_cosine_error(a, b) for a, b in zip(ref[by_name[n].output[0]], got[by_name[n].output[0]])]))
           for n in nodes}
    quantised = set(err)

    def ancestors(name: str) -> set[str]:
        found, stack, seen = set(), list(by_name[name].input), set()
        while stack:
            p = producer.get(stack.pop())
            if p is None or p in seen:
                continue
            seen.add(p)
            if p in quantised:
                found.add(p)
            else:
                stack.extend(by_name[p].input)
        return found

    return {n: max(0.0, err[n] - max((err[a] for a in ancestors(n)), default=0.0)) for n in quantised}


def _kernel_ms_by_group(onnx_path: Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    from vlexport.calibration.profile import profile_graph

    prof = profile_graph(onnx_path, feed, threads=threads, runs=runs, top=1_000_000)
    out: dict[str, float] = {}
    for node in prof.by_node:
        g = group_of(node["name"])
        out[g] = out.get(g, 0.0) + node["ms"]
    return out


def group_costs(fp32_path: Path, int8_path: Path, feed: dict[str, np.ndarray], groups: Sequence[str], *,
                target: str, threads: int = 2, runs: int = 10) -> dict[str, float]:
    """Milliseconds each group adds when it stays float (see the module docstring)."""
    fp32 = _kernel_ms_by_group(fp32_path, feed, threads, runs)
    if target != "cpu":
        return {g: fp32.get(g, 0.0) for g in groups}
    int8 = _kernel_ms_by_group(int8_path, feed, threads, runs)
    return {g: fp32.get(g, 0.0) - int8.get(g, 0.0) for g in groups}


def _free_margin(cost: dict[str, float]) -> float:
    return _FREE_FRACTION * sum(abs(c) for c in cost.values())


def free_groups(cost: dict[str, float]) -> set[str]:
    """The groups whose float kernels are clearly faster than their integer ones (by a margin
    relative to the whole graph's costs, see ``_FREE_FRACTION``): keeping them float is free."""
    margin = _free_margin(cost)
    return {g for g, c in cost.items() if c < 0 and -c >= margin}


def rank_groups(sensitivity: dict[str, float], cost: dict[str, float]) -> list[str]:
    """Groups in the order the search keeps them float: the free ones (float clearly faster),
    then the other groups whose float kernels are not slower (both most sensitive first), then
    the rest by sensitivity per millisecond of float cost. So the first ``len(free_groups)`` and
    the first ``count(cost < 0)`` groups are both prefixes of the order."""
    cost = {g: cost.get(g, 0.0) for g in sensitivity}
    free_set = free_groups(cost)
    by_sensitivity = sorted(sensitivity, key=lambda g: -sensitivity[g])
    free = [g for g in by_sensitivity if g in free_set]
    not_slower = [g for g in by_sensitivity if g not in free_set and cost[g] < 0]
    floor = max(_free_margin(cost), 1e-6)  # a near-zero cost must not make a group look infinitely cheap
    rest = sorted((g for g in sensitivity if cost[g] >= 0), key=lambda g: -sensitivity[g] / max(cost[g], floor))
    return free + not_slower + rest


def _sessions(paths: Sequence[Path], threads: int) -> list[Any]:
    import onnxruntime as ort

    from vlexport.calibration.profile import _session_options
    from vlexport.runtime.backends.onnxruntime import DISABLED_OPTIMIZERS

    return [ort.InferenceSession(str(p), _session_options(ort, threads), providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(DISABLED_OPTIMIZERS)) for p in paths]


def _round_medians(sessions: Sequence[Any], feed: dict[str, np.ndarray], rounds: int, runs: int,
                   warmup: int) -> list[list[float]]:
    """Per session, the median milliseconds of each round. Within a round each session runs one
    untimed run and then ``runs`` timed ones: the first run after another session's is slower (the
    other session's threads still spin, caches hold its tensors), which would penalise the faster
    graph most; a deployed graph runs back to back. The order rotates from round to round."""
    for _ in range(warmup):
        for s in sessions:
            s.run(None, feed)
    per_round: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = list(range(len(sessions)))
        order = order[r % len(order):] + order[: r % len(order)]
        for k in order:
            sessions[k].run(None, feed)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sessions[k].run(None, feed)
                times.append((time.perf_counter() - t) * 1000.0)
            per_round[k].append(statistics.median(times))
    return per_round


def measure_latency(fp32_path: Path, int8_path: Path, feed: dict[str, np.ndarray], *, threads: int = 2,
                    rounds: int = 8, runs: int = 5, warmup: int = 2) -> tuple[float, float]:
    """Median milliseconds of (INT8, FP32) on onnxruntime's CPU provider with the runtime's session
    options, timed in alternating rounds so that a change of machine speed affects both alike."""
    int8, fp32 = _round_medians(_sessions([int8_path, fp32_path], threads), feed, rounds, runs, warmup)
    return statistics.median(int8), statistics.median(fp32)


def paired_latency_ratios(fp32_path: Path, graphs: Sequence[Path], feed: dict[str, np.ndarray], *,
                          threads: int = 2, rounds: int = 10, runs: int = 5, warmup: int = 2) -> list[float]:
    """Each graph's latency over FP32's, all timed in one run: a graph's ratio is the median over
    rounds of its round median over FP32's round median, so drift between rounds cancels."""
    per_round = _round_medians(_sessions([fp32_path, *graphs], threads), feed, rounds, runs, warmup)
    base = per_round[0]
    return [statistics.median(t / b for t, b in zip(per_round[k], base)) for k in range(1, len(per_round))]


@dataclass
class SearchPoint:
    """One explored point: how many groups stayed float, what it measured, whether it is within budget."""

    round: int
    excluded_groups: int
    excluded_nodes: list[str]
    metric_name: str
    int8_metric: float
    fp32_metric: float
    latency_ms: float | None
    fp32_latency_ms: float | None
    latency_measured: bool
    passed: bool
    extra: dict[str, Any] = field(default_factory=dict)
    chosen: bool = False

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.fp32_metric - self.int8_metric)

    @property
    def latency_ratio(self) -> float | None:
        if self.latency_ms is None or not self.fp32_latency_ms:
            return None
        return self.latency_ms / self.fp32_latency_ms

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record of the point (``validation.gate.rounds``)."""
        return {"round": self.round, "excluded_groups": self.excluded_groups,
                "excluded_nodes": len(self.excluded_nodes), "latency_ms": self.latency_ms,
                "fp32_latency_ms": self.fp32_latency_ms, "latency_ratio": self.latency_ratio,
                "latency_measured": self.latency_measured, "metric": self.metric_name,
                "int8_metric": self.int8_metric, "fp32_metric": self.fp32_metric,
                "drop_points": self.drop_points, "passed": self.passed, "chosen": self.chosen, **self.extra}


def search_schedule(n_groups: int, passed: Callable[[int], bool], max_points: int) -> list[int]:
    """The group counts measured, in order: 1, 2, 4, ... until ``passed(k)``, then a bisection
    between the last failing and the first passing count. ``passed`` measures a point (round 0,
    no group float, is measured before); stops after ``max_points`` measurements."""
    tried: list[int] = []
    lo, hi = 0, None
    k = 1
    while len(tried) < max_points and k <= n_groups:
        tried.append(k)
        if passed(k):
            hi = k
            break
        lo = k
        if k == n_groups:
            break
        k = min(n_groups, 2 * k)
    while hi is not None and hi - lo > 1 and len(tried) < max_points:
        mid = (lo + hi) // 2
        tried.append(mid)
        if passed(mid):
            hi = mid
        else:
            lo = mid
    return tried
