"""What `vlexport bench` measured, and its outputs: the console table, the JSON file and the PNG chart.

:class:`BenchReport` holds the :class:`BenchRow` of every measured (or skipped) combination;
:func:`write_report_json` and :func:`write_chart` write it atomically. matplotlib is imported
only by :func:`write_chart`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlexport import __version__
from vlexport.bench.options import BenchOptions
from vlexport.bench.timing import Timing
from vlexport.errors import OutputError

__all__ = ["INFERENCE", "SCHEMA", "BenchReport", "BenchRow", "check_output_path", "write_chart", "write_report_json"]

SCHEMA = "vlexport.bench/1"
#: The ``what`` of a row that times the part's inference (the other kind: "decode N tokens").
INFERENCE = "inference"


@dataclass
class BenchRow:
    """One measured (or skipped) combination of runner, device, precision and part."""

    runner: str  # "onnxruntime", "tensorrt" or "pytorch"
    device: str  # the execution provider, the GPU, or "cpu"/"cuda" for PyTorch
    precision: str
    part: str
    what: str = INFERENCE  # or "decode N tokens"
    threads: int | None = None
    latency: Timing | None = None
    batched: Timing | None = None
    batch: int | None = None
    end_to_end: Timing | None = None
    stages_ms: dict[str, float] | None = None  # mean per stage over the end-to-end runs
    note: str | None = None

    @property
    def label(self) -> str:
        """Runner, device and precision, as the chart's row label."""
        return f"{self.runner} {_short(self.device)} {self.precision}"

    def to_dict(self) -> dict[str, Any]:
        """The row as written under ``"rows"`` in the JSON report."""
        return {
            "runner": self.runner, "device": self.device, "precision": self.precision, "part": self.part,
            "what": self.what, "threads": self.threads,
            "latency": self.latency.to_dict() if self.latency else None,
            "batched": {"batch": self.batch, **self.batched.to_dict()} if self.batched else None,
            "end_to_end": self.end_to_end.to_dict() if self.end_to_end else None,
            "end_to_end_stages_ms": self.stages_ms,
            "note": self.note,
        }


@dataclass
class BenchReport:
    """Everything :func:`run_bench` measured; :meth:`to_dict` is the JSON file's content."""

    bundle: str
    name: str
    family: str
    task: str
    preset: str | None
    part: str
    options: BenchOptions
    frame: dict[str, Any]
    backends: list[dict[str, Any]]
    rows: list[BenchRow] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    video: dict[str, Any] | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON report's content (schema ``vlexport.bench/1``)."""
        return {
            "schema": SCHEMA, "vlexport": __version__, "created": self.created,
            "bundle": self.bundle, "name": self.name, "family": self.family, "task": self.task,
            "preset": self.preset, "part": self.part, "options": self.options.to_dict(), "frame": self.frame,
            "machine": self.machine, "backends": self.backends, "rows": [r.to_dict() for r in self.rows],
            "skipped": self.skipped, "video": self.video,
        }

    def table(self) -> str:
        """The console table: one line per row, then the video run and what was skipped."""
        o = self.options
        threads = o.threads if o.threads is not None else "default"
        lines = [f"{self.name}: {self.family} {self.task}, part {self.part} · frame {self.frame['width']}x"
                 f"{self.frame['height']} ({self.frame['source']}) · threads {threads} · "
                 f"{o.runs} runs after {o.warmup} warm-up"]
        batch = next((r.batch for r in self.rows if r.batch), None)
        header = ["runner", "device", "prec", "what", "p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput",
                  f"batch {batch}" if batch else "batched", "e2e p50", "e2e p90", "note"]
        body = []
        for r in self.rows:
            lat = r.latency.latency_ms if r.latency else None
            e2e = r.end_to_end.latency_ms if r.end_to_end else None
            body.append([
                r.runner, _short(r.device), r.precision, r.what if r.what != INFERENCE else r.part,
                _ms(lat, "p50"), _ms(lat, "p90"), _ms(lat, "p99"), _ms(lat, "mean"),
                f"{r.latency.per_s:.1f} {r.latency.unit}/s" if r.latency else "-",
                f"{r.batched.per_s:.1f} {r.batched.unit}/s" if r.batched else "-",
                _ms(e2e, "p50"), _ms(e2e, "p90"), r.note or "",
            ])
        lines.append(_format_table(header, body))
        if self.video is not None:
            v = self.video
            lines.append(f"pipeline on {v['source']} ({v['backend']} {_short(v['device'])} {v['precision']}): "
                         f"{v['frames']} frames in {v['seconds']:.2f} s, {v['fps']:.1f} FPS")
            lines += [f"  {k:<12} p50 {p['p50']:8.2f}  p90 {p['p90']:8.2f}  p99 {p['p99']:8.2f} ms"
                      for k, p in v["latency_ms"].items()]
        for s in self.skipped:
            lines.append(f"skipped {s['what']}: {s['reason']}")
        return "\n".join(lines)


def _ms(stats: dict[str, float] | None, key: str) -> str:
    return "-" if stats is None else f"{stats[key]:.3f}"


def _short(device: str) -> str:
    return device.replace("ExecutionProvider", "")


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*["-" * w for w in widths]).rstrip()]
    out += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(out)


def check_output_path(path: str | os.PathLike, what: str) -> None:
    """Refuse an output path that is a folder, before anything is measured."""
    if Path(path).expanduser().is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")


def _bars(ax: Any, ypos: np.ndarray, timings: list[Timing | None], colours: list[str], label: str,
          height: float) -> None:
    """Horizontal p50 bars with a whisker to p90 and the p50 written after it (rows without a timing: none)."""
    keep = [i for i, t in enumerate(timings) if t is not None]
    if not keep:
        return
    p50 = np.array([timings[i].latency_ms["p50"] for i in keep])
    p90 = np.array([timings[i].latency_ms["p90"] for i in keep])
    ax.barh(ypos[keep], p50, height=height, xerr=np.stack([np.zeros_like(p50), p90 - p50]), capsize=2,
            color=[colours[i] for i in keep], label=label)
    for y, v, w in zip(ypos[keep], p50, p90):
        ax.text(w, y, f"  {v:.2f}", va="center", fontsize=7)


def write_report_json(report: BenchReport, path: str | os.PathLike) -> Path:
    """Write :meth:`BenchReport.to_dict` as JSON, atomically; returns the path."""
    from vlexport.atomic import write_json_atomic

    path = Path(path).expanduser()
    check_output_path(path, "--json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report.to_dict())
    return path


def write_chart(report: BenchReport, path: str | os.PathLike) -> bool:
    """A PNG bar chart of p50 latency (whisker to p90) per runner/device/precision, one panel per
    measured thing (inference of the part, a caption decode); False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from vlexport.atomic import atomic_write

    panels: dict[str, list[BenchRow]] = {}
    for r in report.rows:
        if r.latency is not None:
            panels.setdefault(f"{r.part}: {r.what}", []).append(r)
    path = Path(path).expanduser()
    check_output_path(path, "--png")
    path.parent.mkdir(parents=True, exist_ok=True)
    count = max(1, sum(len(v) for v in panels.values()))
    fig = Figure(figsize=(9, 1.4 + 0.5 * count + 0.8 * len(panels)))
    canvas = FigureCanvasAgg(fig)
    colours = {"onnxruntime": "tab:blue", "tensorrt": "tab:green", "pytorch": "tab:gray"}
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "nothing was measured", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (title, rows) in zip(axes, panels.items()):
        ypos = np.arange(len(rows), dtype=np.float64)
        two = any(r.end_to_end for r in rows)  # inference and end-to-end bars side by side
        _bars(ax, ypos - 0.2 * two, [r.latency for r in rows], [colours.get(r.runner, "tab:orange") for r in rows],
              "inference", 0.38 if two else 0.6)
        if two:
            _bars(ax, ypos + 0.2, [r.end_to_end for r in rows], ["tab:orange"] * len(rows),
                  "end to end (pre-process + inference + post-process)", 0.38)
            ax.legend(fontsize=8, loc="best")
        ax.set_yticks(ypos, [r.label for r in rows])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("latency, ms (bar: p50, whisker: p90)")
    title = f"vlexport bench: {report.name} ({report.family} {report.task})"
    if report.video is not None:
        title += f"\npipeline on {Path(str(report.video['source'])).name}: {report.video['fps']:.1f} FPS"
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        canvas.print_png(f)
    return True
