"""Recording what a task feeds its graph on one frame, and replaying it on any backend.

The bench times a graph on exactly what the task gives it for the frame: a stand-in backend
copies every feed during one real call (:func:`record`), and :func:`replay` sends them again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlexport.errors import UsageError, VlexportError
from vlexport.runtime.bundle import PartRecord

__all__ = ["FeedRecorder", "Feeds", "Recorded", "backend_of", "frame_fn", "record", "replay", "tile"]

Feeds = dict[str, np.ndarray]


class FeedRecorder:
    """Stands in for a task's backend during one frame and keeps a copy of every feed it gets."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.calls: list[Feeds] = []

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Keep a copy of ``feeds``, then run them on the wrapped backend."""
        self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self._backend.infer(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


@contextlib.contextmanager
def backend_of(task: Any, backend: Any) -> Iterator[None]:
    """Run ``task`` through another backend of the same graph for a while (``backend`` is its public attribute)."""
    original = task.backend
    task.backend = backend
    try:
        yield
    finally:
        task.backend = original


def frame_fn(task: Any) -> Callable[[np.ndarray], Any]:
    """The task's own per-frame call: ``caption``, ``detect`` or ``segment``."""
    for name in ("caption", "detect", "segment"):
        fn = getattr(task, name, None)
        if callable(fn):
            return fn
    raise UsageError(f"vlexport bench runs detect, segment and caption bundles, not {type(task).__name__}")


def record(task: Any, frame: np.ndarray) -> list[Feeds]:
    """The feeds of every inference the task runs on ``frame`` (at least one)."""
    recorder = FeedRecorder(task.backend)
    with backend_of(task, recorder):
        frame_fn(task)(frame)
    if not recorder.calls:
        raise VlexportError(f"{task.bundle.root}: the task ran no {task.part_name!r} inference on the frame")
    return recorder.calls


def replay(backend: Any, calls: list[Feeds]) -> None:
    """Run the recorded feeds on ``backend``, in order."""
    for feeds in calls:
        backend.infer(feeds)


def tile(calls: list[Feeds], info: PartRecord, k: int) -> list[Feeds]:
    """The recorded feeds repeated ``k`` times along the batch axis (every input that has it)."""
    axis = info.io.inputs[0].shape[0]
    names = {s.name for s in info.io.inputs if s.shape and s.shape[0] == axis}
    return [{n: (np.concatenate([x] * k) if n in names else x) for n, x in feeds.items()} for feeds in calls]


@dataclass
class Recorded:
    """What the first loaded task gives the rest: its feeds (for PyTorch), and for a captioner its prefix."""

    calls: list[Feeds] | None = None
    precision: str | None = None
    prefix: np.ndarray | None = None
    caption_settings: dict[str, Any] | None = None
