"""Intermediate activations of an ONNX graph on given inputs: recorded tensors and their ranges.

The accuracy gate compares an INT8 part's activations with the FP32 part's, and FP16 export
reads the FP32 ranges to keep overflowing tensors in float; numpy, onnx and onnxruntime only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vlexport.calibration.quantize import _FLOAT_TYPES, _PROTO_LIMIT, _load, _save
from vlexport.errors import UsageError

__all__ = ["record_activations", "activation_ranges"]


def _session_with_outputs(onnx_path: str | Path, tensor_names: Sequence[str] | None) -> tuple[Any, list[str]]:
    """A CPU session over a copy of the model whose outputs include ``tensor_names``
    (all node outputs when None); returns it and the names of the outputs it fetches."""
    import onnxruntime as ort

    from vlexport.runtime.backends.onnxruntime import DISABLED_OPTIMIZERS

    path = Path(onnx_path)
    model = _load(path)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a convenience here: outputs may be declared untyped
        inferred = model
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    produced = [o for n in model.graph.node for o in n.output if o]
    existing = [o.name for o in model.graph.output]
    if tensor_names is None:
        wanted = [t for t in produced
                  if t not in types or types[t].type.tensor_type.elem_type in _FLOAT_TYPES]
    else:
        wanted = list(dict.fromkeys(tensor_names))
        known = set(produced) | {i.name for i in model.graph.input}
        missing = [t for t in wanted if t not in known]
        if missing:
            raise UsageError(f"{path.name} has no tensor(s) {missing[:3]}")
    for t in wanted:
        if t in existing:
            continue
        model.graph.output.append(types[t] if t in types else onnx.helper.make_empty_tensor_value_info(t))
        existing.append(t)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if model.ByteSize() > _PROTO_LIMIT:
        tmp = tempfile.TemporaryDirectory(prefix=".vlexport-act-")
        p = Path(tmp.name) / "model.onnx"
        _save(model, p)
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(DISABLED_OPTIMIZERS))
        sess._vlexport_tmp = tmp  # keep the folder alive with the session
    else:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(DISABLED_OPTIMIZERS))
    return sess, wanted


def _run_each(sess: Any, names: list[str], inputs: Sequence[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    for feed in inputs:
        yield dict(zip(names, sess.run(names, feed)))


def record_activations(
    onnx_path: str | Path, inputs: Sequence[dict[str, np.ndarray]], tensor_names: Sequence[str]
) -> dict[str, list[np.ndarray]]:
    """Run the graph on each feed and return the values of ``tensor_names`` (one array per feed).

    Any tensor works: a node output, a graph input or output. Used to calibrate a part that runs
    inside another one (record its inputs while the outer part runs) and to look at activations.
    """
    inputs = list(inputs)
    sess, names = _session_with_outputs(onnx_path, tensor_names)
    model_inputs = {i.name for i in sess.get_inputs()}
    _check_feed_names(model_inputs, inputs, Path(onnx_path).name)
    out: dict[str, list[np.ndarray]] = {t: [] for t in names}
    fetch = [t for t in names if t not in model_inputs]
    for k, values in enumerate(_run_each(sess, fetch, inputs)):
        for t in names:
            out[t].append(inputs[k][t] if t in model_inputs else values[t])
    return out


def activation_ranges(onnx_path: str | Path, inputs: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """max |value| of every float tensor a node produces, over all feeds (FP16 overflow checks:
    float16 tops out at 65504). A non-finite activation shows up as inf or nan."""
    inputs = list(inputs)
    sess, names = _session_with_outputs(onnx_path, None)
    _check_feed_names({i.name for i in sess.get_inputs()}, inputs, Path(onnx_path).name)
    ranges: dict[str, float] = {}
    for values in _run_each(sess, names, inputs):
        for t, v in values.items():
            if not isinstance(v, np.ndarray) or v.dtype.kind != "f":
                continue
            m = float(np.max(np.abs(v))) if v.size else 0.0
            prev = ranges.get(t)
            # A nan anywhere must survive the reduction: it is exactly what the check looks for.
            if prev is None or np.isnan(m) or (not np.isnan(prev) and m > prev):
                ranges[t] = m
    return ranges


def _check_feed_names(expected: set[str], inputs: Sequence[dict[str, np.ndarray]], what: str) -> None:
    for k, feed in enumerate(inputs):
        if not isinstance(feed, dict) or set(feed) != expected:
            got = sorted(feed) if isinstance(feed, dict) else type(feed).__name__
            raise UsageError(f"{what}: input {k} has {got}, the model takes {sorted(expected)}")
