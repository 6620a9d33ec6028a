"""Task pipelines: frame in, typed result out, with pre/post-processing from the manifest.

Imported lazily by :func:`vlexport.runtime.load` (they pull in OpenCV).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DetectTask", "EmbedTask", "SegmentTask", "TASKS", "task_class"]

TASKS = ("detect", "embed", "segment")


def task_class(task: str) -> Any:
    """The task class for a task name ("detect", "embed" or "segment")."""
    if task == "detect":
        from vlexport.runtime.tasks.detect import DetectTask

        return DetectTask
    if task == "embed":
        from vlexport.runtime.tasks.embed import EmbedTask

        return EmbedTask
    if task == "segment":
        from vlexport.runtime.tasks.segment import SegmentTask

        return SegmentTask
    from vlexport.errors import UsageError

    raise UsageError(f"this runtime has no task {task!r}; it runs {list(TASKS)}")


def __getattr__(name: str) -> Any:
    if name == "DetectTask":
        return task_class("detect")
    if name == "EmbedTask":
        return task_class("embed")
    if name == "SegmentTask":
        return task_class("segment")
    raise AttributeError(name)
