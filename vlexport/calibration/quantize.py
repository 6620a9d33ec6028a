"""Post-training INT8 quantisation of an FP32 ONNX part into an explicit QDQ graph.

The graph follows TensorRT's explicit-quantisation convention, and onnxruntime's CPU provider
runs it as is:

* ``QuantizeLinear``/``DequantizeLinear`` pairs (QDQ format), int8 everywhere, zero point 0
  (symmetric activations and weights: TensorRT supports nothing else);
* weights pre-quantised to int8 per output channel (TensorRT >= 10 takes int8 initialisers
  behind a ``DequantizeLinear``; the file stays 4x smaller than float weights + Q/DQ);
* biases left in float (TensorRT cannot dequantise int32; it folds the bias itself);
* Q/DQ on the inputs of the weighted ops (Conv, ConvTranspose, MatMul, Gemm) by default, never
  on decoding ops (Sigmoid/Softmax/Concat of box coordinates, TopK, Gather), where int8 ruins
  accuracy and which TensorRT runs in float anyway.

Calibration runs the FP32 graph on a few inputs at a time (bounded memory even for entropy
histograms of 640x640 detectors) and hands the ranges to ``quantize_static`` through its
calibration cache. No torch here: numpy, onnx and onnxruntime only.

On x86 CPUs onnxruntime has no fused kernel for symmetric-int8 QDQ convolutions, so such a graph
is correct but not faster than FP32 there; the speed-up is TensorRT's.

The ``cpu`` target writes what onnxruntime's CPU provider fuses into integer chains instead:
uint8 activations (U8S8), Q/DQ around every op with an integer kernel (Conv, the SiLU's
Sigmoid and Mul, Add, Concat) and around the data-movement ops (Slice, Reshape, MaxPool,
Resize, ...) with one scale on both sides so that onnxruntime drops them, no DQ→Q round trip,
and the decoding after the last weighted layer left float (:func:`decoding_tail`).
``benchmarks/profile_int8.py`` shows what each graph became after onnxruntime's optimisations.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data

from vlexport.calibration.qdq_passes import (drop_round_trips, integer_reductions, integer_upsampling,
                                             restore_float_inputs, tail_after_weighted, tail_inputs)
from vlexport.errors import ExportError, SourceError, UsageError

__all__ = [
    "CALIB_METHODS",
    "DEFAULT_OP_TYPES",
    "QUANTIZABLE_OP_TYPES",
    "ArrayCalibrationReader",
    "QuantizeResult",
    "Calibration",
    "calibrate",
    "quantize_int8",
    "list_quantizable_nodes",
    "node_order",
    "exclusion_candidates",
    "quantized_node_names",
    "decoding_tail",
]

log = logging.getLogger("vlexport")

CALIB_METHODS = ("minmax", "entropy", "percentile", "auto")
_ORT_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# Weighted ops: where int8 pays (TensorRT and ORT CPU both have int8 kernels for them).
DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# What op_types= may name: the weighted ops plus the ops that pass int8 through on both
# TensorRT and onnxruntime (pooling, residual Add, resize, concat).
QUANTIZABLE_OP_TYPES = DEFAULT_OP_TYPES + ("MaxPool", "AveragePool", "GlobalAveragePool", "Add", "Resize", "Concat")
# INT8 targets. "tensorrt": symmetric int8 Q/DQ on the inputs of weighted ops, the convention
# TensorRT's explicit quantisation takes (onnxruntime runs it too, but x86 has no fast kernels
# for signed activations). "cpu": onnxruntime's x86 fast path, uint8 activations (U8S8) with
# Q/DQ around every op that has an int8 kernel, so whole Conv→SiLU→Conv chains stay in int8;
# TensorRT cannot take uint8 Q/DQ.
INT8_TARGETS = ("tensorrt", "cpu")
CPU_OP_TYPES = QUANTIZABLE_OP_TYPES + ("Sigmoid", "Mul", "Split")
# Data-movement ops the cpu target also passes int8 through (quantize_static gives their input and
# output one shared scale, so onnxruntime drops the Q/DQ around them instead of running them in
# float between a DequantizeLinear and a re-quantising QuantizeLinear; C2f's channel split is a
# pair of Slice nodes in the exported graph). Not user-selectable: they carry no arithmetic.
_CPU_PASS_THROUGH = ("Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")
# onnxruntime's entropy defaults (128 bins, 128 quantised bins) leave the KL search a single
# candidate, the full range: min-max under another name. A signed histogram needs 256 quantised
# bins for int8; 512 bins lets KL clip a range to no less than half of what was observed. Finer
# histograms let it clip harder, which on YOLOv8n (COCO128, 32 calibration images) cost box
# accuracy: mAP50-95 0.456 with 512 bins, 0.396 with 1024, 0.393 with 2048 (FP32: 0.462).
_ENTROPY_BINS = {"num_bins": 512, "num_quantized_bins": 256}
# Calibration inputs run per collection pass: bounds the memory the calibrators hold.
_CHUNK = 8
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
# A model proto above this is saved with external data (protobuf cannot serialise 2 GiB).
_PROTO_LIMIT = 1_800_000_000


class ArrayCalibrationReader(CalibrationDataReader):
    """onnxruntime's calibration reader over a list of feed dicts (input name → array)."""

    def __init__(self, inputs: Sequence[dict[str, np.ndarray]]):
        self._inputs = list(inputs)
        self._start, self._end = 0, len(self._inputs)
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start + self._pos >= self._end:
            return None
        feed = self._inputs[self._start + self._pos]
        self._pos += 1
        return feed

    def rewind(self) -> None:
        """Start again from the first input of the current range."""
        self._pos = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start = max(0, start_index)
        self._end = min(len(self._inputs), end_index)
        self._pos = 0

    def __len__(self) -> int:
        return len(self._inputs)


@dataclass
class QuantizeResult:
    """What :func:`quantize_int8` wrote: the file, which weighted nodes run in int8, which stayed float."""

    path: Path
    quantized_nodes: list[str]
    excluded_nodes: list[str]
    method: str
    seconds: float
    calibration_count: int = 0
    per_channel: bool = True
    op_types: list[str] = field(default_factory=lambda: list(DEFAULT_OP_TYPES))
    target: str = "tensorrt"
    calibration: Calibration | None = None  # the ranges, to quantise the same graph again without calibrating

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``calibration`` fields this result provides."""
        return {
            "target": self.target,
            "method": self.method,
            "count": self.calibration_count,
            "per_channel": self.per_channel,
            "op_types": list(self.op_types),
            "quantized_nodes": len(self.quantized_nodes),
            "excluded_nodes": list(self.excluded_nodes),
            **({"ranges": self.calibration.summary()} if self.calibration is not None else {}),
        }


# -- graph helpers --------------------------------------------------------------------------------
def _load(onnx_path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    p = Path(onnx_path)
    if not p.is_file():
        raise SourceError(f"ONNX model not found: {p}")
    try:
        return onnx.load(str(p), load_external_data=load_weights)
    except Exception as e:  # DecodeError and friends
        raise SourceError(f"cannot read ONNX model {p}: {e}") from e


def _name_nodes(model: onnx.ModelProto) -> bool:
    """Give unnamed nodes the name ``<op_type>_<index in the graph>``; returns whether any was.

    Exclusion works by node name, so every node needs one; deriving it from the graph order
    gives the same names here, in :func:`node_order` and inside :func:`quantize_int8`.
    """
    taken = {n.name for n in model.graph.node if n.name}
    changed = False
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
            changed = True
    return changed


def _graph(onnx_path: str | Path) -> onnx.GraphProto:
    model = _load(onnx_path, load_weights=False)
    _name_nodes(model)
    return model.graph


def node_order(onnx_path: str | Path) -> list[str]:
    """Names of all nodes in graph (topological) order, inputs first, outputs last.

    An unnamed node is called ``<op_type>_<index>`` here and in :func:`quantize_int8`.
    """
    return [n.name for n in _graph(onnx_path).node]


def list_quantizable_nodes(onnx_path: str | Path, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> list[tuple[str, str]]:
    """(name, op_type) of the nodes :func:`quantize_int8` would quantise, in graph order."""
    wanted = set(op_types)
    return [(n.name, n.op_type) for n in _graph(onnx_path).node if n.op_type in wanted]


def exclusion_candidates(onnx_path: str | Path, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> list[str]:
    """Quantisable nodes from the graph's end backwards: heads and decoding first.

    The accuracy gate leaves these in float one after another until INT8 is accurate enough;
    the last layers are both the most sensitive and the cheapest to keep in float.
    """
    return [name for name, _ in reversed(list_quantizable_nodes(onnx_path, op_types))]


def quantized_node_names(model: onnx.ModelProto | str | Path, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> list[str]:
    """Nodes of ``op_types`` that read a ``DequantizeLinear`` output, i.e. run in int8 (graph order)."""
    m = model if isinstance(model, onnx.ModelProto) else _load(model, load_weights=False)
    dq_outputs = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    wanted = set(op_types)
    return [n.name for n in m.graph.node if n.op_type in wanted and any(i in dq_outputs for i in n.input)]


def _save(model: onnx.ModelProto, path: Path) -> None:
    big = model.ByteSize() > _PROTO_LIMIT
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
              location=path.name + ".data" if big else None)


def _check_inputs(model: onnx.ModelProto, inputs: Sequence[dict[str, np.ndarray]], what: str) -> None:
    init = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init]
    for k, feed in enumerate(inputs):
        if not isinstance(feed, dict):
            raise UsageError(f"{what}: input {k} is a {type(feed).__name__}, expected a dict of input name → array")
        missing = [n for n in names if n not in feed]
        extra = [n for n in feed if n not in names]
        if missing or extra:
            raise UsageError(f"{what}: input {k} has {sorted(feed)}, the model takes {names}")
        for n, arr in feed.items():
            if not isinstance(arr, np.ndarray):
                raise UsageError(f"{what}: input {k} {n!r} is a {type(arr).__name__}, expected a numpy array")


# -- quantisation ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    """``contextlib.chdir`` for Python 3.10 too (the process-wide cwd is restored on exit)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _preprocess(src: Path, dst: Path) -> Path:
    """Shape inference before quantisation (a tensor of unknown shape cannot be quantised).

    Graph optimisation is skipped on purpose: it would rename or fuse nodes, and the accuracy
    gate excludes nodes by their names in the FP32 file.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # When symbolic inference gives up, onnxruntime leaves a temporary model (and its external
        # data) in the current folder: run it from the scratch folder so nothing lands in the user's.
        with contextlib.redirect_stdout(io.StringIO()), _working_directory(dst.parent):
            quant_pre_process(str(src.resolve()), str(dst.resolve()), skip_optimization=True)
        return dst
    except Exception as e:  # symbolic shape inference gives up on some graphs; plain inference suffices
        first = str(e).splitlines()[0] if str(e) else ""
        log.warning("quantisation pre-processing skipped (%s: %s)", type(e).__name__, first)
        return src


@dataclass
class Calibration:
    """Activation ranges of one graph as ``quantize_static`` takes them, and how each was chosen.

    Computed once by :func:`calibrate` and reused by every re-quantisation of the same graph
    (the accuracy gate and the precision search quantise it many times with other exclusions).
    """

    method: str
    ranges: dict[str, tuple[float, float]]
    choices: dict[str, str] = field(default_factory=dict)  # tensor -> candidate, where not min-max
    tied: int = 0  # tensors whose range was widened to share a Concat's scale

    def summary(self) -> dict[str, Any]:
        """The manifest's record: how many tensors took which candidate, and which they were."""
        counts: dict[str, int] = {}
        for t in self.ranges:
            c = self.choices.get(t, "minmax")
            counts[c] = counts.get(c, 0) + 1
        return {"method": self.method, "tensors": len(self.ranges), "by_candidate": counts,
                "clipped_tensors": dict(sorted(self.choices.items())), "tied_to_concat_scale": self.tied}

    def save(self, path: Path) -> Path:
        data = {t: (np.array(lo, np.float32), np.array(hi, np.float32)) for t, (lo, hi) in self.ranges.items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
        return path


def calibrate(model_path: Path, inputs: Sequence[dict[str, np.ndarray]], method: str, percentile: float,
              op_types: Sequence[str], workdir: Path, providers: Sequence[str] | None,
              target: str = "tensorrt") -> Calibration:
    """Collect activation ranges a few inputs at a time (see :class:`Calibration`).

    The cpu target's uint8 activations take asymmetric ranges (a SiLU output spans [-0.28, max]:
    a symmetric range would waste half the codes) and one shared range per Concat
    (:func:`vlexport.calibration.ranges.tie_ranges`); ``auto`` chooses each tensor's range by
    measured quantisation error (:func:`vlexport.calibration.ranges.choose_range`).
    """
    from vlexport.calibration.ranges import choose_range, collect_histograms, tie_ranges

    symmetric = target != "cpu"
    collect = "minmax" if method == "auto" else method
    options: dict[str, Any] = {"symmetric": symmetric}
    if collect == "percentile":
        options["percentile"] = percentile
    elif collect == "entropy":
        options.update(_ENTROPY_BINS)
    calibrator = create_calibrator(
        model_path,
        list(op_types),
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=_ORT_METHODS[collect],
        use_external_data_format=model_path.stat().st_size > _PROTO_LIMIT,
        providers=list(providers) if providers else ["CPUExecutionProvider"],
        extra_options=options,
    )
    n = len(inputs)
    for start in range(0, n, _CHUNK):
        chunk = inputs[start:start + _CHUNK]
        # The histogram collector prints a line per pass; the progress goes to the log instead.
        with contextlib.redirect_stdout(io.StringIO()):
            calibrator.collect_data(ArrayCalibrationReader(chunk))
        log.info("calibrating (%s): %d/%d inputs", collect, min(start + _CHUNK, n), n)
    with contextlib.redirect_stdout(io.StringIO()):
        data = calibrator.compute_data()
    del calibrator
    ranges = {t: (float(np.asarray(d.range_value[0]).ravel()[0]), float(np.asarray(d.range_value[1]).ravel()[0]))
              for t, d in data.items()}
    choices: dict[str, str] = {}
    # The graph's structure (no weights), read once for the cpu target's decoding and Concat ties.
    structure = _load(model_path, load_weights=False) if target == "cpu" else None
    if structure is not None:
        _name_nodes(structure)  # the decoding is found by node name
    if method == "auto":
        log.info("calibrating (auto): histograms of %d tensors", len(ranges))
        hists = collect_histograms(model_path, inputs, ranges)
        # What the float decoding reads keeps its whole range: no later layer absorbs a clipped
        # tail there, and a detector's rare high class logits are that tail (its best scores).
        full_range = tail_inputs(structure, DEFAULT_OP_TYPES) if structure is not None else set()
        for t, h in hists.items():
            if t in full_range:
                continue
            c = choose_range(h, symmetric=symmetric, levels=255 if not symmetric else 254)
            ranges[t] = (c.lowest, c.highest)
            if c.method != "minmax":
                choices[t] = c.method
    tied = tie_ranges(structure, ranges) if structure is not None else 0
    return Calibration(method, ranges, choices, tied)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    inputs: Sequence[dict[str, np.ndarray]],
    *,
    method: str = "entropy",
    per_channel: bool = True,
    exclude_nodes: Iterable[str] = (),
    percentile: float = 99.999,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    providers: Sequence[str] | None = None,
    quantize_outputs: bool = False,
    target: str = "tensorrt",
    calibration: Calibration | None = None,
) -> QuantizeResult:
    """Quantise an FP32 ONNX graph to an explicit INT8 QDQ graph (see the module docstring).

    ``inputs``: calibration feeds (input name → array), pre-processed exactly as the runtime does.
    ``method``: ``minmax``, ``entropy`` (KL divergence, TensorRT's default) or ``percentile``
    (with ``percentile``). ``exclude_nodes``: node names to keep in float. ``providers``: the
    onnxruntime providers the calibration runs on (CPU by default). ``quantize_outputs`` also
    puts Q/DQ on the outputs of the quantised ops (off: inputs only, as TensorRT prefers).

    ``target``: ``tensorrt`` (symmetric int8, the default: one graph for TensorRT and any
    onnxruntime) or ``cpu`` (uint8 activations on :data:`CPU_OP_TYPES`, for onnxruntime on x86);
    see :data:`INT8_TARGETS`.

    ``out_path`` is written atomically; the result passes ``onnx.checker``.
    """
    t0 = time.perf_counter()
    if target not in INT8_TARGETS:
        raise UsageError(f"unknown INT8 target {target!r}; choose one of {list(INT8_TARGETS)}")
    if target == "cpu":
        op_types = CPU_OP_TYPES
        quantize_outputs = True
    # What quantize_static is asked to quantise: the cpu target adds the data-movement ops.
    ort_op_types = list(op_types) + ([t for t in _CPU_PASS_THROUGH if t not in op_types] if target == "cpu" else [])
    if method not in CALIB_METHODS:
        raise UsageError(f"unknown calibration method {method!r}; choose one of {list(CALIB_METHODS)}")
    inputs = list(inputs)
    if not inputs:
        raise UsageError(
            "INT8 needs calibration data: pass --calib SOURCE (an image folder, video, or dataset) "
            "with representative images"
        )
    if not 0.0 < float(percentile) <= 100.0:
        raise UsageError(f"percentile must lie in (0, 100], got {percentile}")
    unknown_ops = sorted(set(op_types) - set(CPU_OP_TYPES if target == "cpu" else QUANTIZABLE_OP_TYPES))
    if not op_types or unknown_ops:
        raise UsageError(
            f"cannot quantise op types {unknown_ops or '(none)'}; choose from {list(QUANTIZABLE_OP_TYPES)}"
        )
    src = Path(fp32_path)
    out = Path(out_path)
    model = _load(src, load_weights=False)
    _check_inputs(model, inputs, "calibration")
    unnamed = _name_nodes(model)
    exclude = list(dict.fromkeys(exclude_nodes))
    names = {n.name for n in model.graph.node}
    missing = [n for n in exclude if n not in names]
    if missing:
        raise UsageError(f"cannot exclude {missing[:3]} from quantisation: {src.name} has no such node")
    if not out.parent.is_dir():
        raise UsageError(f"output folder not found: {out.parent}")
    # cpu target: the decoding after the last weighted layers stays float (see decoding_tail).
    decoding = [n for n in decoding_tail(model) if n not in set(exclude)] if target == "cpu" else []
    del model

    with tempfile.TemporaryDirectory(prefix=".vlexport-quant-", dir=out.parent) as tmp:
        work = Path(tmp)
        log.info("INT8: preparing %s…", src.name)
        if unnamed:
            named = _load(src)
            _name_nodes(named)
            _save(named, work / "named.onnx")
            del named
            src_for_prep = work / "named.onnx"
        else:
            src_for_prep = src
        prepared = _preprocess(src_for_prep, work / "prepared.onnx")
        if calibration is None:
            calibration = calibrate(prepared, inputs, method, float(percentile), ort_op_types, work, providers, target)
        cache = calibration.save(work / "calibration.json")
        log.info("INT8: inserting Q/DQ (%s, %s)…", method, "per-channel" if per_channel else "per-tensor")
        staged = work / out.name
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared),
                str(staged),
                calibration_data_reader=None,
                calibration_cache_path=str(cache),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=ort_op_types,
                per_channel=per_channel,
                reduce_range=False,
                activation_type=QuantType.QUInt8 if target == "cpu" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude + decoding,
                calibrate_method=CalibrationMethod.MinMax,  # the ranges come from the cache
                extra_options={
                    "ActivationSymmetric": target != "cpu",  # zero point 0: TensorRT's only convention
                    "WeightSymmetric": True,
                    "QuantizeBias": False,  # TensorRT cannot dequantise int32 biases
                    "MatMulConstBOnly": False,
                    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # output channels of B [K, N]
                    "DedicatedQDQPair": False,
                    # Q/DQ on the inputs of the weighted ops only (TensorRT's recommended placement:
                    # it fuses Conv+activation and quantises the next op's input itself). Quantising
                    # the pre-activation outputs too cost YOLOv8n ~1.5 mAP points and, on x86
                    # onnxruntime, speed (its s8->u8 rewrite leaves those groups unfused).
                    "OpTypesToExcludeOutputQuantization": [] if quantize_outputs else list(op_types),
                },
            )
        quantized = onnx.load(str(staged))
        changed = bool(exclude) and restore_float_inputs(quantized, set(exclude))
        if target == "cpu":
            changed = drop_round_trips(quantized) > 0 or changed
            changed = integer_reductions(quantized) > 0 or changed
            changed = integer_upsampling(quantized) > 0 or changed
        if changed:
            _save(quantized, staged)
        try:
            onnx.checker.check_model(quantized if quantized.ByteSize() < _PROTO_LIMIT else str(staged))
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the INT8 graph of {src.name} fails the ONNX checker: {str(e).splitlines()[0]}") from e
        done = quantized_node_names(quantized, op_types)
        excluded = list(exclude)
        del quantized
        _replace(staged, out)
    seconds = time.perf_counter() - t0
    log.info("INT8: %s written (%d nodes in int8, %d kept in float, %.1f s)",
             out.name, len(done), len(excluded), seconds)
    return QuantizeResult(out, done, excluded, method, seconds, calibration_count=len(inputs),
                          per_channel=per_channel, op_types=list(op_types), target=target, calibration=calibration)


def decoding_tail(model: onnx.ModelProto | str | Path) -> list[str]:
    """Nodes after the last weighted layers: no Conv/ConvTranspose/MatMul/Gemm with constant
    weights reads what they compute (:func:`vlexport.calibration.qdq_passes.tail_after_weighted`).

    That is a detector's box and score decoding (DFL softmax and its MatMul, the anchor
    arithmetic, the Concat of box coordinates, the final Sigmoid, ReduceMax/ArgMax). The cpu
    target keeps it in float: uint8 is too coarse for coordinates in [0, 640] and for scores
    ranked down to 0.001, and these ops are a sliver of the run time. The last weighted layers
    themselves still run in int8 (QLinearConv). Graph order; unnamed nodes are named as
    :func:`node_order` names them.
    """
    m = model if isinstance(model, onnx.ModelProto) else _load(model, load_weights=False)
    if not all(n.name for n in m.graph.node):
        _name_nodes(m)
    return tail_after_weighted(m, DEFAULT_OP_TYPES)


def _replace(staged: Path, out: Path) -> None:
    """Move the staged model (and its external data, if any) into place atomically."""
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, out.with_name(out.name + ".data"))
    os.replace(staged, out)
