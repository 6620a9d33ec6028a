"""Task pipelines: frame in, typed result out, with pre/post-processing from the manifest.

Imported lazily by :func:`vlexport.runtime.load` (they pull in OpenCV).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CaptionTask", "DetectTask", "EmbedTask", "SegmentTask", "TASKS", "task_class"]

TASKS = ("detect", "embed", "segment", "caption")


# Families whose graphs need their own pre/post-processing for a task (family, task) -> module, class.
_FAMILY_TASKS = {
    ("detr", "detect"): ("vlexport.runtime.tasks.detr", "DetrTask"),
    ("multiscale", "segment"): ("vlexport.runtime.tasks.binary_segment", "BinarySegmentTask"),
}


def task_class(task: str, family: str | None = None) -> Any:
    """The task class for a task name ("detect", "embed", "segment" or "caption") and the bundle's family."""
    special = _FAMILY_TASKS.get((family or "", task))
    if special is not None:
        import importlib

        return getattr(importlib.import_module(special[0]), special[1])
    if task == "detect":
        from vlexport.runtime.tasks.detect import DetectTask

        return DetectTask
    if task == "embed":
        from vlexport.runtime.tasks.embed import EmbedTask

        return EmbedTask
    if task == "segment":
        from vlexport.runtime.tasks.segment import SegmentTask

        return SegmentTask
    if task == "caption":
        from vlexport.runtime.tasks.caption import CaptionTask

        return CaptionTask
    from vlexport.errors import UsageError

    raise UsageError(f"this runtime has no task {task!r}; it runs {list(TASKS)}")


def __getattr__(name: str) -> Any:
    if name == "DetectTask":
        return task_class("detect")
    if name == "EmbedTask":
        return task_class("embed")
    if name == "SegmentTask":
        return task_class("segment")
    if name == "CaptionTask":
        return task_class("caption")
    raise AttributeError(name)
