"""The pre- and post-processing Python-backend models of an ensemble-layout repository (``model.py``).

The config's ``stage`` parameter says which one this is; ``part`` names the bundle part between
them. Both read the bundle's manifest (copied without its graphs to ``<version>/bundle/``, every
copied file checked against its hash) and call the runtime's own code:

* ``preprocess``: ``IMAGE`` (encoded bytes) -> the part's ``images`` tensor (the runtime's
  letterbox :class:`~vlexport.runtime.preprocess.Preprocessor`) and ``GEOMETRY`` (the letterbox
  placement: scale, pad_x, pad_y, source height and width, resized width and height);
* ``postprocess``: the part's outputs and ``GEOMETRY`` -> the contract's outputs
  (:mod:`vlexport.serve.contract`), by the runtime's detection selection or binary threshold.

The pure functions (:func:`encode_geometry`, :func:`decode_geometry`, :class:`Stages`) run
without the server; ``triton_python_backend_utils`` is imported only when present.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import VlexportError
from vlexport.serve.contract import IMAGE, outputs_from_results

try:  # only inside the Triton server
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None

__all__ = ["Stages", "encode_geometry", "decode_geometry", "open_stage_bundle", "TritonPythonModel"]

GEOMETRY = "GEOMETRY"
IMAGE_INPUT = "images"


def encode_geometry(info: Any) -> np.ndarray:
    """A :class:`~vlexport.runtime.preprocess.LetterboxInfo` as a float64 ``[7]`` row (the scale kept exact)."""
    h, w = info.src_shape
    return np.array([info.scale, info.pad_x, info.pad_y, h, w, *info.resized], np.float64)


def decode_geometry(row: np.ndarray) -> Any:
    """The inverse of :func:`encode_geometry`."""
    from vlexport.runtime.preprocess import LetterboxInfo

    r = np.asarray(row, np.float64).reshape(-1)
    if r.shape != (7,):
        raise ValueError(f"{GEOMETRY}: got shape {tuple(r.shape)}, expected (7,)")
    return LetterboxInfo(float(r[0]), int(r[1]), int(r[2]), (int(r[3]), int(r[4])), (int(r[5]), int(r[6])))


def open_stage_bundle(folder: str | Path) -> Any:
    """Open the graph-less bundle copy and verify every file it holds against the manifest."""
    from vlexport.runtime.bundle import Bundle

    bundle = Bundle.open(folder)
    graphs = {f for p in bundle.meta.parts.values() for f in (*p.files.values(), *(e.file for e in p.engines.values()))}
    for rel in bundle.meta.files:
        if rel not in graphs:
            bundle.verify(rel)
    return bundle


class Stages:
    """The pre- and post-processing of one single-pass letterbox bundle, with the runtime's code."""

    def __init__(self, bundle: Any, part: str, pixels: bool = False):
        from vlexport.runtime.preprocess import Preprocessor

        self.bundle = bundle
        self.part = part
        self.task = bundle.task
        self.preprocessor = Preprocessor(bundle.preprocess)
        if pixels:  # the served graph takes uint8 pixels (the cpu target's INT8 graph)
            self.preprocessor.emit_pixels()
        if self.task == "detect":
            from vlexport.runtime.tasks.detect import _postprocess_settings

            self.settings = _postprocess_settings(bundle.section("postprocess"), {})
            self.classes = list(bundle.classes)
        else:
            from vlexport.runtime.tasks.binary_segment import _settings, threshold_logit

            threshold, self.classes = _settings(bundle, None)
            self.cut = np.float32(threshold_logit(threshold))

    def preprocess(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Frames -> ``{"images": [N, 3, H, W], "GEOMETRY": [N, 7]}``."""
        tensor, infos = self.preprocessor.batch(list(images))
        return {IMAGE_INPUT: tensor, GEOMETRY: np.stack([encode_geometry(i) for i in infos])}

    def results(self, outputs: Mapping[str, np.ndarray], geometry: np.ndarray) -> list[Any]:
        """The part's batched outputs and geometry rows -> one runtime result per row."""
        infos = [decode_geometry(g) for g in np.asarray(geometry).reshape(-1, 7)]
        if self.task == "detect":
            from vlexport.runtime.postprocess import select_detections
            from vlexport.runtime.preprocess import scale_boxes_to_source
            from vlexport.runtime.results import Detections

            s, out = self.settings, []
            for j, info in enumerate(infos):
                b, sc, c = select_detections(outputs["boxes"][j], outputs["scores"][j], outputs["class_ids"][j],
                                             s["score_threshold"], s["iou_threshold"], s["max_detections"],
                                             s["class_agnostic"])
                n = len(self.classes)
                labels = [self.classes[i] if 0 <= i < n else f"class{i}" for i in c.tolist()]
                out.append(Detections(scale_boxes_to_source(b, info), sc, c, labels))
            return out
        from vlexport.runtime.segmentation import Segmentation
        from vlexport.runtime.tasks.binary_segment import logits_to_source

        logits = np.asarray(outputs["logits"])
        return [Segmentation((logits_to_source(logits[j, 0], info) > self.cut).astype(np.int32), self.classes)
                for j, info in enumerate(infos)]

    def postprocess(self, outputs: Mapping[str, np.ndarray], geometry: np.ndarray) -> dict[str, np.ndarray]:
        return outputs_from_results(self.task, self.results(outputs, geometry))


class TritonPythonModel:
    """A pre- or post-processing step of an ensemble (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        self.stage = params.get("stage")
        self.inputs = [t["name"] for t in config.get("input", [])]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        try:
            bundle = open_stage_bundle(Path(__file__).resolve().parent / "bundle")
            self.stages = Stages(bundle, params.get("part", ""), pixels=params.get("pixels") == "1")
        except VlexportError as e:
            raise RuntimeError(f"model {config.get('name')!r} cannot load its bundle: {e}") from None

    def execute(self, requests: list[Any]) -> list[Any]:
        from vlexport.serve.python_model import request_frames

        responses = []
        for request in requests:
            try:
                arrays = {n: t.as_numpy() for n in self.inputs
                          if (t := pb_utils.get_input_tensor_by_name(request, n)) is not None}
                if self.stage == "preprocess":
                    image = arrays.get(IMAGE)
                    if image is not None and not self.batched:
                        image = image.reshape(1, 1)  # max_batch_size 0: dims [1] carry no batch dim
                    out = self.stages.preprocess(request_frames(image, None))
                else:
                    geometry = arrays.pop(GEOMETRY)
                    out = self.stages.postprocess(arrays, geometry)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
            except Exception as e:  # noqa: BLE001 - this request's error response; the model keeps serving
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
        return responses
