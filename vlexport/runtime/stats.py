"""What a pipeline run did: frames read, processed and dropped, FPS, stage latencies, task runs.

:class:`PipelineStats` is what :meth:`vlexport.runtime.pipeline.Pipeline.run` and
:func:`vlexport.runtime.run.run_bundles` return (and what a Ctrl-C carries as ``.stats``);
``to_dict`` is the ``--stats-json`` form, ``summary`` the console lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PipelineStats"]


@dataclass
class PipelineStats:
    """What a run did (see the module docstring); ``to_dict`` is its JSON form."""

    read: int = 0
    processed: int = 0
    dropped: int = 0
    skipped: int = 0
    reconnects: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def frames(self) -> int:  # the name RunStats users know
        return self.processed

    @property
    def fps(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"frames_read": self.read, "frames_processed": self.processed, "frames_dropped": self.dropped,
                "skipped": self.skipped, "reconnects": self.reconnects, "seconds": round(self.seconds, 4),
                "fps": round(self.fps, 2), "interrupted": self.interrupted, "latency_ms": self.latency_ms,
                "tasks": self.tasks}

    def summary(self) -> str:
        """A few lines for the console."""
        head = (f"{self.processed} frames processed in {self.seconds:.2f}s ({self.fps:.1f} FPS); "
                f"read {self.read}, dropped {self.dropped}")
        if self.skipped:
            head += f", {self.skipped} unreadable skipped"
        if self.reconnects:
            head += f", {self.reconnects} reconnect(s)"
        if self.interrupted:
            head += "; interrupted"
        lines = [head]
        for stage, p in self.latency_ms.items():
            lines.append(f"  {stage:<12} p50 {p['p50']:8.1f}  p90 {p['p90']:8.1f}  p99 {p['p99']:8.1f} ms")
        for name, t in self.tasks.items():
            lines.append(f"  task {name}: ran {t['runs']}x" + (f", {t['skipped_busy']} due frame(s) passed over while "
                                                                "busy" if t.get("skipped_busy") else ""))
        return "\n".join(lines)
