"""Task pipelines: frame in, typed result out, with pre/post-processing from the manifest.

Imported lazily by :func:`vlexport.runtime.load` (they pull in OpenCV).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CaptionTask", "DetectTask", "EmbedTask", "SegmentTask", "TASKS", "task_class"]

TASKS = ("detect", "embed", "segment", "caption")


def _family_task(task: str, family: str | None) -> Any:
    """The class the family registry names for this task, or None (no such family, or not its task)."""
    if not family:
        return None
    from vlexport.errors import UsageError
    from vlexport.registry import get_family, load_ref

    try:
        ref = get_family(family).tasks.get(task)
    except UsageError:  # a family this runtime does not know: the task's generic class
        return None
    return load_ref(ref) if ref is not None else None


def task_class(task: str, family: str | None = None) -> Any:
    """The task class for a task name ("detect", "embed", "segment" or "caption") and the bundle's family.

    A registered family's own class for the task (:attr:`vlexport.registry.Family.tasks`) comes first;
    any other family (or none) gets the generic class of the task.
    """
    special = _family_task(task, family)
    if special is not None:
        return special
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
