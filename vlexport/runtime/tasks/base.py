"""Shared machinery of the tasks: choose a part file, verify it, load a backend, pre-process."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.backends import Backend, has_accelerator, open_part_backend, part_precisions, resolve_backend
from vlexport.runtime.bundle import PRECISIONS, Bundle
from vlexport.runtime.preprocess import Preprocessor, check_image
from vlexport.runtime.spec import TensorSpec

__all__ = ["PartTask", "Prepared", "choose_precision", "IMAGE_INPUT"]

IMAGE_INPUT = "images"

# fp16 is emulated (slow) on CPU; on a GPU it is the fast float path.
_CPU_ORDER = ("int8", "fp32", "fp16")
_GPU_ORDER = ("int8", "fp16", "fp32")


def choose_precision(available: Sequence[str], requested: str | None, accelerated: bool, where: str,
                     int8_target: str = "tensorrt", refused: dict[str, str] | None = None) -> str:
    """The precision to load: ``requested`` if the bundle has it, else the fastest one for the device.

    On a CPU, INT8 comes first only when it was quantised for the CPU (``--int8-target cpu``):
    the TensorRT-style signed-int8 graph is slower than FP32 on x86 onnxruntime (measured by
    benchmarks/bench_precisions.py). FP16 comes last on a CPU, which computes it slowly.
    """
    if requested is not None:
        if requested not in PRECISIONS:
            raise UsageError(f"unknown precision {requested!r}; choose one of {list(PRECISIONS)}")
        if requested not in available:
            why = (refused or {}).get(requested)
            if why:
                raise BundleError(f"{where} has no {requested} file: the export refused it ({why}); "
                                  f"it has {list(available)}")
            raise BundleError(f"{where} has no {requested} file; it has {list(available)}")
        return requested
    order = _GPU_ORDER if accelerated else _CPU_ORDER
    if not accelerated and int8_target != "cpu":
        order = tuple(p for p in order if p != "int8") + ("int8",)
    for p in order:
        if p in available:
            return p
    raise BundleError(f"{where} lists no model files")


@dataclass
class Prepared:
    """One frame pre-processed ahead of inference: the model input, its geometry, the time it took."""

    tensor: np.ndarray
    infos: list[Any]
    ms: float


class PartTask:
    """Loads one part of a bundle on a backend, with the bundle's pre-processing."""

    part_name: str = ""
    #: The graph input the frames are fed to.
    input_name: str = IMAGE_INPUT

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        precision: str | None = None,
        backend: str | None = None,
        threads: int | None = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.part = self.bundle.part(self.part_name)
        where = f"{self.bundle.root}: part {self.part_name!r}"
        # Resolve the backend first (None: TensorRT when it can run here, else onnxruntime) so that a
        # bad name or an unusable TensorRT fails before any hashing or engine build.
        self.backend_name: str = resolve_backend(backend)
        available = part_precisions(self.part, self.backend_name)
        calibration = self.bundle.meta.calibration
        target = calibration.target if calibration is not None else "tensorrt"
        if target == "cpu" and self.backend_name == "tensorrt":
            available = [p for p in available if p != "int8"]  # uint8 Q/DQ is onnxruntime-only
        self.precision = choose_precision(available, precision, has_accelerator(self.backend_name), where, target,
                                          refused=self.bundle.refused(self.part_name))
        self._setup_preprocessing(where)
        # On TensorRT this builds the engine on first use (progress line) and returns its path.
        self.backend: Backend
        self.backend, self.model_path = open_part_backend(
            self.bundle, self.part_name, self.precision, self.backend_name, threads=threads
        )
        try:
            self._check_io(where)
        except BaseException:
            self.backend.close()
            raise
        self._feed_pixels()
        spec = self._input_spec(self.input_name)
        # A graph exported with a fixed batch of N takes the frames N at a time; a TensorRT engine
        # takes at most its optimisation profile's max batch.
        self._max_batch: int | None = (
            spec.shape[0] if isinstance(spec.shape[0], int) else getattr(self.backend, "max_batch", None)
        )
        self.timings: dict[str, float] = {}

    def _setup_preprocessing(self, where: str) -> None:
        """The frame pre-processing from the manifest (letterbox; tasks with other inputs override)."""
        self.preprocessor = Preprocessor(self.bundle.preprocess)

    def _feed_pixels(self) -> None:
        """Feed uint8 pixels when the graph's image input is their integer codes (the cpu target's
        INT8 graph): the frame is then copied, not converted to float and quantised back."""
        quantized = getattr(self.backend, "quantized_inputs", {}).get(self.input_name)
        pre = getattr(self, "preprocessor", None)  # tasks with their own input handling have none
        if (quantized is None or not isinstance(pre, Preprocessor) or pre.pixel_step is None
                or quantized[1] != 0 or np.float32(quantized[0]) != np.float32(pre.pixel_step)):
            return  # a float tensor: the backend quantises it when the graph wants codes
        pre.emit_pixels()

    # -- checks ------------------------------------------------------------------------
    def _check_io(self, where: str) -> None:
        declared = {s.name for s in self.part.io.inputs}
        actual = {s.name for s in self.backend.inputs}
        if declared and declared != actual:
            raise BundleError(
                f"{where}: the manifest declares inputs {sorted(declared)} but the model has {sorted(actual)}"
            )
        if IMAGE_INPUT not in actual:
            raise BundleError(f"{where}: the model has no {IMAGE_INPUT!r} input (it has {sorted(actual)})")
        shape = self._input_spec(IMAGE_INPUT).shape
        if (
            len(shape) != 4
            or shape[1] not in (3, "channels")
            or any(isinstance(d, int) and d != s for d, s in zip(shape[2:], self.preprocessor.size))
        ):
            raise BundleError(
                f"{where}: input {IMAGE_INPUT!r} has shape {shape}, which does not fit the "
                f"manifest's preprocess size {list(self.preprocessor.size)}"
            )

    def _input_spec(self, name: str) -> TensorSpec:
        for s in self.backend.inputs:
            if s.name == name:
                return s
        raise BundleError(f"{self.bundle.root}: the model has no input {name!r}")

    def prepare(self, image: np.ndarray) -> Prepared:
        """Pre-process one frame ahead of inference (no backend call: safe on another thread).

        A pipeline does this on its decode thread, so that pre-processing overlaps inference;
        pass the result as ``prepared=`` to the task's call for that frame.
        """
        check_image(image)
        t0 = now_ms()
        tensor, infos = self.preprocessor.batch([image])
        return Prepared(tensor, infos, now_ms() - t0)

    def _run_batches(
        self,
        images: Sequence[np.ndarray],
        stamps: Sequence[Any] | None,
        what: str,
        extra: dict[str, np.ndarray],
        finish: Callable[[dict[str, np.ndarray], list[Any], list[Any]], list[Any]],
        prepared: Prepared | None = None,
    ) -> list[Any]:
        """Validate frames, then pre-process, infer and ``finish`` them one model-sized batch at a time.

        ``finish(outputs, letterbox_infos, stamps)`` turns one batch's outputs into results;
        :attr:`timings` gets the milliseconds spent per stage. ``prepared`` (one frame, from
        :meth:`prepare`) skips the pre-processing; its time is reported as measured there.
        """
        images, stamps = self._validated_frames(images, stamps, what)
        if not images:
            return []
        if prepared is not None and len(images) != 1:
            raise UsageError(f"{what}: a prepared tensor is for exactly one frame")
        times = {"preprocess": 0.0, "infer": 0.0, "postprocess": 0.0}
        results: list[Any] = []
        for chunk in self._chunks(len(images)):
            t0 = now_ms()
            if prepared is not None:
                tensor, infos = prepared.tensor, prepared.infos
                t0 -= prepared.ms
            else:
                tensor, infos = self.preprocessor.batch(images[chunk])
            t1 = now_ms()
            out = self.backend.infer(stack_feeds(tensor, extra))
            t2 = now_ms()
            results += finish(out, infos, stamps[chunk])
            times["preprocess"] += t1 - t0
            times["infer"] += t2 - t1
            times["postprocess"] += now_ms() - t2
        self.timings = times
        return results

    def _one_by_one(self, images: Sequence[np.ndarray], stamps: Sequence[Any] | None, what: str,
                    one: Callable[[np.ndarray, Any, dict[str, float]], Any]) -> list[Any]:
        """Validate frames, then ``one(image, stamp, times)`` on each in turn, for tasks whose graph
        runs per frame (own sizes, own crops, a decode loop); :attr:`timings` gets the summed stages."""
        images, stamps = self._validated_frames(images, stamps, what)
        times = {"preprocess": 0.0, "infer": 0.0, "postprocess": 0.0}
        results = [one(image, stamp, times) for image, stamp in zip(images, stamps)]
        self.timings = times
        return results

    @staticmethod
    def _validated_frames(images: Sequence[np.ndarray], stamps: Sequence[Any] | None,
                          what: str) -> tuple[list[np.ndarray], list[Any]]:
        """Frames as a list of checked HxWx3 uint8 arrays, and one stamp (or None) per frame."""
        if isinstance(images, np.ndarray):
            raise UsageError(f"{what}: expected a list of HxWx3 uint8 arrays, got a single array")
        images = list(images)
        for i, img in enumerate(images):
            check_image(img, what=f"image {i}")
        stamps = list(stamps) if stamps is not None else [None] * len(images)
        if len(stamps) != len(images):
            raise UsageError(f"{what}: got {len(stamps)} stamps for {len(images)} images")
        return images, stamps

    def _chunks(self, n: int) -> list[slice]:
        step = n if self._max_batch is None else self._max_batch
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    # -- description and lifetime -------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What is loaded where: bundle, part, precision, file, backend and its device."""
        return {
            "bundle": str(self.bundle.root),
            "family": self.bundle.family,
            "task": self.bundle.task,
            "part": self.part_name,
            "precision": self.precision,
            "file": str(self.model_path),
            "backend": self.backend.name,
            "device": self.backend.device,
            "providers": list(getattr(self.backend, "providers", [])),
        }

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        name, device = self.bundle.root.name, self.backend.device
        return f"{type(self).__name__}({name!r}, precision={self.precision!r}, device={device!r})"


def now_ms() -> float:
    return time.perf_counter() * 1e3


def stack_feeds(tensor: np.ndarray, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feeds = {IMAGE_INPUT: tensor}
    feeds.update(extra)
    return feeds
