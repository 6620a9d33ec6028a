"""The request/response tensor contract of a served bundle, shared by the repository writer, the
Python-backend model and the client.

Every python-layout model takes one of two optional inputs per request: ``IMAGE`` (encoded JPEG/PNG
bytes, ``TYPE_STRING [1]``) or ``IMAGE_BGR`` (``TYPE_UINT8 [-1, -1, 3]``), with the batch dim first
(``[B, 1]`` / ``[B, H, W, 3]``). Its outputs depend on the runtime task (:data:`TASK_OUTPUTS`); each
response carries a batch dim of one row per image of its request.

Variable-length rows (a request of several images with different detection counts or sizes) are
padded: ``LABELS`` -1 marks a padding detection, ``LABEL_MAP`` -1 a padding pixel (bottom and right),
``TOKEN_IDS`` -1 a padding token. :func:`result_from_outputs` strips them.

Numpy only: the server model, the writer and the client import this without the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlexport.errors import UsageError

__all__ = [
    "TensorDef", "INPUTS", "IMAGE", "IMAGE_BGR", "TASK_OUTPUTS", "EXTRA_OUTPUTS", "SERVED_TASKS",
    "PARAM_TASK", "PARAM_CLASSES", "PAD", "outputs_for", "outputs_from_result", "outputs_from_results",
    "result_from_outputs", "results_from_outputs", "numpy_dtype", "wire_datatype",
]

IMAGE = "IMAGE"
IMAGE_BGR = "IMAGE_BGR"
PAD = -1

#: Model-config parameters the writer sets, for the client: the runtime task and the class names.
PARAM_TASK = "vlexport_task"
PARAM_CLASSES = "vlexport_classes"

# Triton config data types -> numpy dtypes, and the wire names the clients use (InferInput).
_NUMPY = {"TYPE_FP64": np.float64, "TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT32": np.int32,
          "TYPE_INT64": np.int64, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_, "TYPE_STRING": np.object_}
_WIRE = {"TYPE_FP64": "FP64", "TYPE_FP32": "FP32", "TYPE_FP16": "FP16", "TYPE_INT32": "INT32",
         "TYPE_INT64": "INT64", "TYPE_UINT8": "UINT8", "TYPE_BOOL": "BOOL", "TYPE_STRING": "BYTES"}
#: Manifest dtypes (vlexport.runtime.spec) -> Triton config data types.
MANIFEST_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                      "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def numpy_dtype(data_type: str) -> Any:
    """The numpy dtype of a Triton config data type (``TYPE_STRING`` -> object, holding bytes)."""
    return _NUMPY[data_type]


def wire_datatype(data_type: str) -> str:
    """The wire datatype name (``FP32``, ``BYTES``...) of a Triton config data type."""
    return _WIRE[data_type]


@dataclass(frozen=True)
class TensorDef:
    """One model input or output: name, Triton config data type, dims without the batch dim."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def wire(self) -> str:
        return wire_datatype(self.data_type)

    @property
    def dtype(self) -> Any:
        return numpy_dtype(self.data_type)


INPUTS = (
    TensorDef(IMAGE, "TYPE_STRING", (1,), optional=True),
    TensorDef(IMAGE_BGR, "TYPE_UINT8", (-1, -1, 3), optional=True),
)

#: The outputs every model of a task has (the fixed contract).
TASK_OUTPUTS: dict[str, tuple[TensorDef, ...]] = {
    "detect": (
        TensorDef("BOXES", "TYPE_FP32", (-1, 4)),
        TensorDef("SCORES", "TYPE_FP32", (-1,)),
        TensorDef("LABELS", "TYPE_INT32", (-1,)),
        TensorDef("CLASS_NAMES", "TYPE_STRING", (-1,)),
    ),
    "segment": (TensorDef("LABEL_MAP", "TYPE_INT32", (-1, -1)),),
    "caption": (TensorDef("CAPTION", "TYPE_STRING", (1,)),),
}

#: Outputs added to the contract so that a remote result equals a local one: a caption's token
#: ids and decoder score (its JSONL record holds them). A client may leave them unrequested.
EXTRA_OUTPUTS: dict[str, tuple[TensorDef, ...]] = {
    "detect": (),
    "segment": (),
    "caption": (TensorDef("TOKEN_IDS", "TYPE_INT32", (-1,)), TensorDef("SCORE", "TYPE_FP64", (1,))),
}

SERVED_TASKS = tuple(TASK_OUTPUTS)


def _check_task(task: str) -> str:
    if task not in TASK_OUTPUTS:
        raise UsageError(f"task {task!r} cannot be served; the served tasks are {list(SERVED_TASKS)}")
    return task


def outputs_for(task: str) -> tuple[TensorDef, ...]:
    """Every output a model of ``task`` declares: the contract's, then the extras."""
    return TASK_OUTPUTS[_check_task(task)] + EXTRA_OUTPUTS[task]


# -- result -> arrays -------------------------------------------------------------------------------
def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v).encode("utf-8") for v in values], dtype=np.object_)


def _pad_stack(rows: Sequence[np.ndarray], dtype: Any, fill: Any) -> np.ndarray:
    """Stack arrays of equal rank into ``[B, *max_shape]``, padding the short ones with ``fill``."""
    shape = tuple(max(r.shape[i] for r in rows) for i in range(rows[0].ndim))
    out = np.full((len(rows), *shape), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[(i, *(slice(0, n) for n in r.shape))] = r
    return out


def outputs_from_results(task: str, results: Sequence[Any]) -> dict[str, np.ndarray]:
    """The output arrays of one response: one batch row per result, padded where lengths differ."""
    _check_task(task)
    if not results:
        raise UsageError("outputs_from_results: no results (a response holds at least one image)")
    if task == "detect":
        names = [_strings(r.labels) for r in results]
        return {
            "BOXES": _pad_stack([np.asarray(r.boxes, np.float32).reshape(-1, 4) for r in results], np.float32, 0),
            "SCORES": _pad_stack([np.asarray(r.scores, np.float32) for r in results], np.float32, 0),
            "LABELS": _pad_stack([np.asarray(r.class_ids).astype(np.int32) for r in results], np.int32, PAD),
            "CLASS_NAMES": _pad_stack(names, np.object_, b""),
        }
    if task == "segment":
        return {"LABEL_MAP": _pad_stack([np.asarray(r.label_map, np.int32) for r in results], np.int32, PAD)}
    return {
        "CAPTION": _strings([r.text for r in results]).reshape(len(results), 1),
        "TOKEN_IDS": _pad_stack([np.asarray(r.token_ids, np.int32).reshape(-1) for r in results], np.int32, PAD),
        "SCORE": np.array([[r.score] for r in results], np.float64),
    }


def outputs_from_result(task: str, result: Any) -> dict[str, np.ndarray]:
    """The output arrays of one image's result, each with a batch dim of 1."""
    return outputs_from_results(task, [result])


# -- arrays -> result -------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _row(arrays: Mapping[str, np.ndarray], name: str, index: int) -> np.ndarray:
    if name not in arrays or arrays[name] is None:
        raise UsageError(f"the response has no {name} output (it has {sorted(arrays)})")
    arr = np.asarray(arrays[name])
    if arr.ndim == 0 or not 0 <= index < arr.shape[0]:
        raise UsageError(f"output {name}: no batch row {index} in shape {tuple(arr.shape)}")
    return arr[index]


def result_from_outputs(task: str, arrays: Mapping[str, np.ndarray], *, index: int = 0,
                        classes: Sequence[str] | None = None, stamp: Any = None) -> Any:
    """The runtime's own result object (Detections, Segmentation, Caption) for batch row ``index``.

    ``classes`` (segment only, required there) are the label map's class names: the model config's
    :data:`PARAM_CLASSES` parameter. ``stamp`` is a :class:`~vlexport.runtime.results.FrameStamp`.
    Not carried over the wire: DETR masks, track ids, caption regions.
    """
    from vlexport.runtime.results import Caption, Detections

    _check_task(task)
    if task == "detect":
        labels = _row(arrays, "LABELS", index).astype(np.int64).reshape(-1)
        keep = labels != PAD
        boxes = _row(arrays, "BOXES", index).reshape(-1, 4)[keep]
        scores = _row(arrays, "SCORES", index).reshape(-1)[keep]
        names = [_text(n) for n in _row(arrays, "CLASS_NAMES", index).reshape(-1)[keep]]
        return Detections(boxes.astype(np.float32), scores.astype(np.float32), labels[keep], names, stamp)
    if task == "segment":
        from vlexport.runtime.segmentation import Segmentation

        if not classes:
            raise UsageError(f"a segment result needs its class names (the model's {PARAM_CLASSES} parameter)")
        lm = _row(arrays, "LABEL_MAP", index)
        if lm.ndim != 2:
            raise UsageError(f"output LABEL_MAP: got a row of shape {tuple(lm.shape)}, expected (H, W)")
        h = int((lm[:, 0] != PAD).sum())
        w = int((lm[0, :] != PAD).sum())
        return Segmentation(np.ascontiguousarray(lm[:h, :w], np.int32), list(classes), stamp)
    text = _text(_row(arrays, "CAPTION", index).reshape(-1)[0])
    ids: list[int] = []
    score = 0.0
    if arrays.get("TOKEN_IDS") is not None:
        ids = [int(i) for i in _row(arrays, "TOKEN_IDS", index).reshape(-1) if i != PAD]
    if arrays.get("SCORE") is not None:
        score = float(_row(arrays, "SCORE", index).reshape(-1)[0])
    return Caption(text, ids, score, stamp)


def results_from_outputs(task: str, arrays: Mapping[str, np.ndarray], *,
                         classes: Sequence[str] | None = None) -> list[Any]:
    """Every batch row's result (see :func:`result_from_outputs`)."""
    first = next(iter(TASK_OUTPUTS[_check_task(task)])).name
    n = int(np.asarray(_row_source(arrays, first)).shape[0])
    return [result_from_outputs(task, arrays, index=i, classes=classes) for i in range(n)]


def _row_source(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays or arrays[name] is None:
        raise UsageError(f"the response has no {name} output (it has {sorted(arrays)})")
    return np.asarray(arrays[name])
