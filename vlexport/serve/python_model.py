"""The Triton Python-backend model that serves one bundle end to end (copied as ``model.py``).

The repository writer copies this file into ``<model>/<version>/model.py`` beside the bundle
(``<model>/<version>/bundle/``). Triton's Python backend creates :class:`TritonPythonModel`;
``initialize`` verifies every file of the bundle against its manifest hashes and loads the runtime
task with the settings in the config's ``parameters`` (backend, precision, threads); ``execute``
decodes each request's ``IMAGE`` bytes (or takes its ``IMAGE_BGR`` tensor), runs the frames of all
requests of the batch in one task call, and answers each request with the tensors of
:mod:`vlexport.serve.contract`. A bad request gets an error response of one line; the others in
the same batch are answered and the model keeps serving.

``triton_python_backend_utils`` exists only inside the server: everything but the class is plain
numpy/OpenCV and importable anywhere (the tests call these helpers directly).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import UsageError, VlexportError
from vlexport.serve.contract import IMAGE, IMAGE_BGR, outputs_from_results

try:  # only inside the Triton server
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported for its helpers (tests, the writer)
    pb_utils = None

__all__ = ["RequestError", "TritonPythonModel", "decode_image", "request_frames", "run_frames",
           "run_requests", "model_settings", "BUNDLE_DIR", "SETTINGS"]

#: The bundle's folder name inside a model version folder.
BUNDLE_DIR = "bundle"
#: Config parameters read by ``initialize`` (string values; empty means the runtime's default).
SETTINGS = ("backend", "precision", "threads")
_BATCH_METHODS = {"detect": "detect_batch", "segment": "segment_batch", "caption": "caption_batch"}


class RequestError(UsageError):
    """A request the model cannot run: its one-line message goes back in the error response."""


# -- pure helpers (no server needed) ----------------------------------------------------------------
def decode_image(data: Any, index: int = 0) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> a BGR uint8 ``[H, W, 3]`` image, or a RequestError naming image ``index``."""
    import cv2

    if isinstance(data, np.ndarray) and data.dtype == np.object_ and data.size == 1:
        data = data.reshape(-1)[0]
    if isinstance(data, str):
        raise RequestError(f"IMAGE {index}: got text, expected the encoded bytes of a JPEG or PNG file")
    if not isinstance(data, (bytes, bytearray, np.bytes_)):
        raise RequestError(f"IMAGE {index}: got {type(data).__name__}, expected the bytes of a JPEG or PNG file")
    if len(data) == 0:
        raise RequestError(f"IMAGE {index}: the image bytes are empty")
    img = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise RequestError(f"IMAGE {index}: {len(data)} bytes that OpenCV cannot decode as an image "
                           "(corrupt or not a JPEG/PNG)")
    return img


def request_frames(image: np.ndarray | None, image_bgr: np.ndarray | None) -> list[np.ndarray]:
    """One request's frames (BGR uint8 ``[H, W, 3]``) from its ``IMAGE`` or ``IMAGE_BGR`` array.

    ``image`` is the ``[B, 1]`` array of encoded bytes, ``image_bgr`` the ``[B, H, W, 3]`` uint8
    array; exactly one must be given. Anything else is a RequestError of one line.
    """
    if (image is None) == (image_bgr is None):
        given = "both" if image is not None else "neither"
        raise RequestError(f"give exactly one of the inputs {IMAGE} (encoded bytes) or {IMAGE_BGR} "
                           f"(uint8 [B, H, W, 3]); the request has {given}")
    if image is not None:
        arr = np.asarray(image)
        if arr.dtype != np.object_ and arr.dtype.kind != "S":
            raise RequestError(f"{IMAGE}: got dtype {arr.dtype}, expected BYTES (encoded JPEG/PNG) of shape [B, 1]")
        if arr.ndim != 2 or arr.shape[1] != 1:
            raise RequestError(f"{IMAGE}: got shape {list(arr.shape)}, expected [B, 1] (one encoded image per row)")
        if arr.shape[0] == 0:
            raise RequestError(f"{IMAGE}: the request holds no image (batch of 0)")
        return [decode_image(arr[i, 0], i) for i in range(arr.shape[0])]
    arr = np.asarray(image_bgr)
    if arr.dtype != np.uint8:
        raise RequestError(f"{IMAGE_BGR}: got dtype {arr.dtype}, expected UINT8 of shape [B, H, W, 3]")
    if arr.ndim != 4 or arr.shape[3] != 3:
        raise RequestError(f"{IMAGE_BGR}: got shape {list(arr.shape)}, expected [B, H, W, 3] (BGR)")
    if arr.shape[0] == 0:
        raise RequestError(f"{IMAGE_BGR}: the request holds no image (batch of 0)")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise RequestError(f"{IMAGE_BGR}: got an empty image of shape {list(arr.shape)}")
    return [np.ascontiguousarray(arr[i]) for i in range(arr.shape[0])]


def run_frames(task: Any, kind: str, frames: Sequence[np.ndarray]) -> list[Any]:
    """The task's results for ``frames``, in one batched call (``detect_batch`` ...)."""
    return list(getattr(task, _BATCH_METHODS[kind])(list(frames)))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def run_requests(task: Any, kind: str, inputs: Sequence[tuple[np.ndarray | None, np.ndarray | None]]
                 ) -> list[dict[str, np.ndarray] | str]:
    """Answer a batch of requests, each ``(IMAGE, IMAGE_BGR)``: output arrays, or an error line.

    The frames of every valid request go through the task in one call; if that call fails, the
    requests are run one by one so that only the one at fault gets the error.
    """
    frames: list[list[np.ndarray] | str] = []
    for image, image_bgr in inputs:
        try:
            frames.append(request_frames(image, image_bgr))
        except RequestError as e:
            frames.append(str(e))
    good = [f for f in frames if not isinstance(f, str)]
    flat = [img for f in good for img in f]
    results: list[Any] | None = None
    if flat:
        try:
            results = run_frames(task, kind, flat)
        except Exception:  # noqa: BLE001 - one request at fault: find it below, one by one
            results = None
    answers: list[dict[str, np.ndarray] | str] = []
    pos = 0
    for f in frames:
        if isinstance(f, str):
            answers.append(f)
            continue
        try:
            if results is not None:
                mine = results[pos:pos + len(f)]
                pos += len(f)
            else:
                mine = run_frames(task, kind, f)
            answers.append(outputs_from_results(kind, mine))
        except Exception as e:  # noqa: BLE001 - this request's error response; the model keeps serving
            answers.append(_one_line(e) if isinstance(e, (VlexportError, ValueError))
                           else f"{type(e).__name__}: {_one_line(e)}")
    return answers


def model_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``load`` keyword arguments from a model config's ``parameters`` (as Triton hands it over)."""
    params = config.get("parameters") or {}
    out: dict[str, Any] = {}
    for key in SETTINGS:
        value = params.get(key)
        if isinstance(value, Mapping):
            value = value.get("string_value")
        if value in (None, ""):
            continue
        if key == "threads":
            try:
                value = int(value)
            except ValueError:
                raise RequestError(f"config parameter threads must be an integer, got {value!r}") from None
        out[key] = value
    return out


def open_bundle_task(folder: str | Path, settings: Mapping[str, Any]) -> Any:
    """Verify every file of the bundle in ``folder`` against its manifest hashes, then load its task."""
    import vlexport.runtime as vr
    from vlexport.runtime.bundle import Bundle

    bundle = Bundle.open(folder)
    bundle.verify_all()  # a tampered file fails here, before anything is loaded
    return vr.load(bundle, **settings)


# -- the server's entry point -----------------------------------------------------------------------
class TritonPythonModel:
    """One vlexport bundle served by Triton's Python backend (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = config.get("name", "?")
        folder = Path(__file__).resolve().parent / BUNDLE_DIR
        try:
            self.task = open_bundle_task(folder, model_settings(config))
        except VlexportError as e:
            # Triton shows this line as the model's load failure.
            raise RuntimeError(f"model {self.name!r} cannot load its bundle: {_one_line(e)}") from None
        self.kind = self.task.bundle.task
        if self.kind not in _BATCH_METHODS:
            raise RuntimeError(f"model {self.name!r}: task {self.kind!r} cannot be served")

    def execute(self, requests: list[Any]) -> list[Any]:
        inputs = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, IMAGE)
            bgr = pb_utils.get_input_tensor_by_name(request, IMAGE_BGR)
            inputs.append((None if image is None else image.as_numpy(), None if bgr is None else bgr.as_numpy()))
        responses = []
        for answer in run_requests(self.task, self.kind, inputs):
            if isinstance(answer, str):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(answer)))
            else:
                tensors = [pb_utils.Tensor(name, arr) for name, arr in answer.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        task = getattr(self, "task", None)
        if task is not None:
            task.close()
