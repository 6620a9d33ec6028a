"""Where an ONNX graph's time goes on onnxruntime's CPU kernels, and what ran as integer kernels.

:func:`profile_graph` runs a graph with onnxruntime's profiler under the session options the
runtime uses (``vlexport.runtime.backends.onnxruntime``: intra-op threads, one inter-op thread,
the same disabled optimisers), and reports the kernel time per node type and per node, and how
the graph looks *after* onnxruntime's optimisations: how many nodes became integer kernels
(QLinearConv, QLinearMatMul, ConvInteger, ...) and how many stayed float, with the Q/DQ nodes
left over. A QDQ graph whose Q/DQ pairs onnxruntime could not fold shows up as float convolutions
beside many QuantizeLinear/DequantizeLinear kernels. numpy, onnx and onnxruntime only.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import SourceError, UsageError

__all__ = ["INTEGER_OPS", "FLOAT_COMPUTE_OPS", "QDQ_OPS", "GraphProfile", "profile_graph", "optimized_op_counts",
           "format_profile"]

# Kernels that compute on int8/uint8 data (onnxruntime's QLinear* contrib ops and the integer ops).
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax", "QLinearWhere",
    "QLinearReduceMean",
})
# Float kernels of the weighted ops, as onnxruntime names them after fusion (NCHWc, FusedConv, ...).
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass
class GraphProfile:
    """One graph's profile: latency, kernel time per op type and per node, the optimised graph's ops."""

    path: str
    threads: int
    runs: int
    median_ms: float
    by_op_type: dict[str, dict[str, float]]  # op type -> {"ms": per run, "nodes": count, "share": of kernel time}
    by_node: list[dict[str, Any]]  # {"name", "op_type", "ms"} per run, slowest first
    optimized_ops: dict[str, int]  # op type -> count in the graph onnxruntime runs
    integer_nodes: int = 0
    float_compute_nodes: int = 0
    qdq_nodes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``benchmarks/profile_int8.py`` writes it)."""
        return {
            "path": self.path, "threads": self.threads, "runs": self.runs, "median_ms": self.median_ms,
            "integer_nodes": self.integer_nodes, "float_compute_nodes": self.float_compute_nodes,
            "qdq_nodes": self.qdq_nodes, "optimized_ops": dict(self.optimized_ops),
            "by_op_type": self.by_op_type, "by_node": self.by_node, "notes": list(self.notes),
        }


def _session_options(ort: Any, threads: int) -> Any:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def optimized_op_counts(onnx_path: str | Path, threads: int = 2) -> dict[str, int]:
    """Op type -> node count of the graph onnxruntime's CPU provider runs after its optimisations.

    Saved at the extended level (``ORT_ENABLE_EXTENDED``): the QDQ fusions into QLinear ops are
    done by then, and the layout-specific NCHWc rewrite (which renames float Conv) is not.
    """
    import onnx
    import onnxruntime as ort

    from vlexport.runtime.backends.onnxruntime import DISABLED_OPTIMIZERS

    path = _check_path(onnx_path)
    with tempfile.TemporaryDirectory(prefix=".vlexport-prof-") as tmp:
        so = _session_options(ort, threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(DISABLED_OPTIMIZERS))
        model = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))


def _check_path(onnx_path: str | Path) -> Path:
    path = Path(onnx_path)
    if not path.is_file():
        raise SourceError(f"ONNX model not found: {path}")
    return path


def profile_graph(onnx_path: str | Path, feeds: dict[str, np.ndarray], *, threads: int = 2, runs: int = 20,
                  warmup: int = 3, top: int = 25) -> GraphProfile:
    """Profile ``runs`` inferences of a graph on onnxruntime's CPU provider with ``threads`` threads.

    Kernel times are onnxruntime's own (``enable_profiling``), averaged per run; ``median_ms`` is
    the wall time per run measured around ``session.run`` with the profiler off, so the
    profiler's overhead does not enter it. ``by_node`` keeps the ``top`` slowest nodes.
    """
    import onnxruntime as ort

    from vlexport.runtime.backends.onnxruntime import DISABLED_OPTIMIZERS

    if threads < 1 or runs < 1:
        raise UsageError(f"threads and runs must be positive, got threads={threads} runs={runs}")
    path = _check_path(onnx_path)
    plain = ort.InferenceSession(str(path), _session_options(ort, threads), providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(DISABLED_OPTIMIZERS))
    for _ in range(warmup):
        plain.run(None, feeds)
    wall = []
    for _ in range(runs):
        t = time.perf_counter()
        plain.run(None, feeds)
        wall.append((time.perf_counter() - t) * 1000.0)
    del plain

    with tempfile.TemporaryDirectory(prefix=".vlexport-prof-") as tmp:
        so = _session_options(ort, threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(DISABLED_OPTIMIZERS))
        for _ in range(warmup):
            sess.run(None, feeds)
        # Events from session creation and warm-up runs are dropped: only the last `runs` count.
        prof_runs = max(1, min(runs, 10))
        for _ in range(prof_runs):
            sess.run(None, feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    kernels = _kernel_events(trace, prof_runs)
    by_type: dict[str, float] = defaultdict(float)
    nodes_of_type: dict[str, set[str]] = defaultdict(set)
    by_node: dict[str, list[Any]] = {}
    for name, op, us in kernels:
        by_type[op] += us / prof_runs / 1000.0
        nodes_of_type[op].add(name)
        entry = by_node.setdefault(name, [op, 0.0])
        entry[1] += us / prof_runs / 1000.0
    total = sum(by_type.values()) or 1.0
    table = {op: {"ms": ms, "nodes": len(nodes_of_type[op]), "share": ms / total}
             for op, ms in sorted(by_type.items(), key=lambda kv: -kv[1])}
    slowest = sorted(({"name": n, "op_type": v[0], "ms": v[1]} for n, v in by_node.items()), key=lambda d: -d["ms"])
    ran = Counter(v[0] for v in by_node.values())
    return GraphProfile(
        path=str(path), threads=threads, runs=runs, median_ms=statistics.median(wall), by_op_type=table,
        by_node=slowest[:top], optimized_ops=dict(ran),
        integer_nodes=sum(c for op, c in ran.items() if op in INTEGER_OPS),
        float_compute_nodes=sum(c for op, c in ran.items() if op in FLOAT_COMPUTE_OPS or op.startswith("Nchwc")
                                and op.endswith("Conv")),
        qdq_nodes=sum(c for op, c in ran.items() if op in QDQ_OPS),
    )


def _kernel_events(trace: list[dict[str, Any]], runs: int) -> list[tuple[str, str, float]]:
    """(node name, op type, microseconds) of each kernel event of the last ``runs`` model runs."""
    run_events = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = run_events[-runs]["ts"] if len(run_events) >= runs else 0
    out = []
    for e in trace:
        if e.get("cat") != "Node" or e.get("ts", 0) < start:
            continue
        name = e.get("name", "")
        if not name.endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        out.append((name[: -len("_kernel_time")], op, float(e.get("dur", 0))))
    return out


def format_profile(profiles: dict[str, GraphProfile], top_types: int = 15) -> str:
    """A plain-text table: per graph, latency, integer/float/QDQ node counts, then time per op type."""
    names = list(profiles)
    lines = []
    head = ["", *names]
    rows = [
        ["median ms", *[f"{profiles[n].median_ms:.2f}" for n in names]],
        ["integer nodes", *[str(profiles[n].integer_nodes) for n in names]],
        ["float conv/matmul", *[str(profiles[n].float_compute_nodes) for n in names]],
        ["Q/DQ nodes", *[str(profiles[n].qdq_nodes) for n in names]],
    ]
    ops: dict[str, float] = defaultdict(float)
    for p in profiles.values():
        for op, v in p.by_op_type.items():
            ops[op] += v["ms"]
    for op, _ in sorted(ops.items(), key=lambda kv: -kv[1])[:top_types]:
        cells = []
        for n in names:
            v = profiles[n].by_op_type.get(op)
            cells.append(f"{v['ms']:.2f} ({v['nodes']})" if v else "-")
        rows.append([f"{op} ms (nodes)", *cells])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)
