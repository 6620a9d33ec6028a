"""What `vlexport bench` measures and how often: :class:`BenchOptions` and the defaults."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlexport.errors import UsageError
from vlexport.runtime.bundle import PRECISIONS

__all__ = ["BACKENDS", "DECODE_TOKENS", "DEFAULT_BATCH", "BenchOptions"]

BACKENDS = ("onnxruntime", "tensorrt")
#: Batch measured for throughput when the graph's batch axis is dynamic (``--batch`` overrides).
DEFAULT_BATCH = 8
#: Tokens of the fixed-length caption decode (the end token is ignored so every run decodes as many).
DECODE_TOKENS = 30


@dataclass
class BenchOptions:
    """What to measure and how often; empty ``backends``/``precisions`` mean "all that run here"."""

    source: str | None = None
    runs: int = 50
    warmup: int = 5
    threads: int | None = None
    backends: Sequence[str] = ()
    precisions: Sequence[str] = ()
    batch: int | None = None
    max_frames: int | None = None
    torch: bool = True
    decode_tokens: int = DECODE_TOKENS

    def check(self) -> None:
        """Reject bad values with one UsageError line (before anything is loaded)."""
        for name, low in (("runs", 1), ("warmup", 0), ("decode_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        for name in ("threads", "batch", "max_frames"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for b in self.backends:
            if b not in BACKENDS:
                raise UsageError(f"unknown backend {b!r}; choose one of {', '.join(BACKENDS)}")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise UsageError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        """The options as written under ``"options"`` in the JSON report."""
        return {"source": self.source, "runs": self.runs, "warmup": self.warmup, "threads": self.threads,
                "backends": list(self.backends), "precisions": list(self.precisions), "batch": self.batch,
                "max_frames": self.max_frames, "torch": self.torch, "decode_tokens": self.decode_tokens}
