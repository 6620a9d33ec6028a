"""Task pipelines: frame in, typed result out, with pre/post-processing from the manifest.

Imported lazily by :func:`vlexport.runtime.load` (they pull in OpenCV).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CaptionTask", "DetectTask", "EmbedTask", "SegmentTask", "TASKS", "task_class"]

#: Each task's generic class: what a bundle of a family without its own class for the task gets.
_GENERIC = {
    "detect": "vlexport.runtime.tasks.detect:DetectTask",
    "embed": "vlexport.runtime.tasks.embed:EmbedTask",
    "segment": "vlexport.runtime.tasks.segment:SegmentTask",
    "caption": "vlexport.runtime.tasks.caption:CaptionTask",
}
TASKS = tuple(_GENERIC)
_CLASS_TASKS = {ref.rpartition(":")[2]: task for task, ref in _GENERIC.items()}


def task_class(task: str, family: str | None = None) -> Any:
    """The task class for a task name ("detect", "embed", "segment" or "caption") and the bundle's family.

    A registered family's own class for the task (:attr:`vlexport.registry.Family.tasks`) comes first;
    any other family (or none) gets the generic class of the task.
    """
    from vlexport.errors import UsageError
    from vlexport.registry import get_family, load_ref

    if task not in _GENERIC:
        raise UsageError(f"this runtime has no task {task!r}; it runs {list(TASKS)}")
    ref = None
    if family:
        try:
            ref = get_family(family).tasks.get(task)
        except UsageError:  # a family this runtime does not know: the task's generic class
            pass
    return load_ref(ref or _GENERIC[task])


def __getattr__(name: str) -> Any:
    if name in _CLASS_TASKS:
        return task_class(_CLASS_TASKS[name])
    raise AttributeError(name)
