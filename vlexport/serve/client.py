"""A served bundle as a task object: :class:`RemoteTask` talks to a Triton server over HTTP or gRPC.

    task = RemoteTask("127.0.0.1:8000", "yolo")          # reads the model's config from the server
    dets = task.detect(bgr)                              # the runtime's own Detections
    task.timings                                         # {"preprocess", "network", "postprocess"} ms

It offers ``detect``, ``segment`` or ``caption`` like the runtime's tasks (the one the served
model does, and only that one), so the same :class:`~vlexport.runtime.pipeline.Pipeline`, sinks and statistics
work with it. Frames go as raw BGR (``IMAGE_BGR``, exact: the server sees the very pixels) or
JPEG-encoded (``IMAGE``, smaller on a real network; lossy). Needs ``tritonclient`` (the
``serve`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlexport.errors import DependencyError, UsageError, VlexportError
from vlexport.serve.contract import EXTRA_OUTPUTS, PARAM_CLASSES, PARAM_TASK, TASK_OUTPUTS, result_from_outputs

__all__ = ["RemoteTask", "RemoteError", "TASK_OUTPUT_NAMES"]

#: The outputs that tell a model's task apart (the repository contract).
TASK_OUTPUT_NAMES: dict[str, tuple[str, ...]] = {task: tuple(t.name for t in defs) for task, defs in TASK_OUTPUTS.items()}
_OPTIONAL_OUTPUTS = {task: tuple(t.name for t in defs) for task, defs in EXTRA_OUTPUTS.items()}
_ENCODINGS = ("bgr", "jpeg", "png")


class RemoteError(VlexportError):
    """The server refused a request or could not be reached (its message, in one line)."""


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "http":
            import tritonclient.http as mod
        else:
            import tritonclient.grpc as mod
    except ImportError as e:
        raise DependencyError(f"the Triton client is not installed ({e}); "
                              "pip install 'vlexport[serve]' (tritonclient[http,grpc])") from e
    return mod


def _strip_scheme(url: str) -> tuple[str, str | None]:
    for scheme, protocol in (("http://", "http"), ("https://", "http"), ("grpc://", "grpc")):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/"), protocol
    return url.rstrip("/"), None


def _one_line(e: Exception) -> str:
    msg = getattr(e, "message", None)
    text = msg() if callable(msg) else str(e)
    return " ".join(str(text).split())


class RemoteTask:
    """One model on a Triton server, used like a runtime task (see the module doc).

    Args:
        url: ``host:port`` (a ``http://`` or ``grpc://`` prefix also chooses the protocol).
        model: the model's name in the repository.
        protocol: ``"http"`` or ``"grpc"``.
        encoding: ``"bgr"`` (raw uint8 frames), ``"jpeg"`` or ``"png"`` (encoded on this side).
        jpeg_quality: for ``"jpeg"``.
        timeout_s: network timeout per request.
    """

    #: Pre-processing stays on the server: frames go as they are.
    accepts_prepared = False

    def __init__(self, url: str, model: str, protocol: str | None = None, *, encoding: str = "bgr",
                 jpeg_quality: int = 95, timeout_s: float = 60.0, version: str = ""):
        address, implied = _strip_scheme(url)
        protocol = protocol or implied or "http"
        if protocol not in ("http", "grpc"):
            raise UsageError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if encoding not in _ENCODINGS:
            raise UsageError(f"encoding must be one of {list(_ENCODINGS)}, got {encoding!r}")
        self.url, self.model, self.protocol, self.version = address, model, protocol, version
        self.encoding, self.jpeg_quality, self.timeout_s = encoding, int(jpeg_quality), float(timeout_s)
        self._mod = _client_module(protocol)
        try:
            if protocol == "http":
                self._client = self._mod.InferenceServerClient(address, connection_timeout=timeout_s,
                                                               network_timeout=timeout_s)
            else:
                self._client = self._mod.InferenceServerClient(address)
        except Exception as e:
            raise RemoteError(f"cannot reach the Triton server at {address}: {_one_line(e)}") from e
        self.config = self._read_config()
        self.task_name = self._find_task(self.config)
        params = self.config.get("parameters", {}) or {}
        classes = _param(params, PARAM_CLASSES)
        self.classes: list[str] | None = None
        if classes:
            import json

            self.classes = list(json.loads(classes)) if classes.lstrip().startswith("[") else classes.split(",")
        outputs = {o["name"] for o in self.config.get("output", [])}
        self._outputs = list(TASK_OUTPUT_NAMES[self.task_name]) + [
            n for n in _OPTIONAL_OUTPUTS.get(self.task_name, ()) if n in outputs]
        self.timings: dict[str, float] = {}

    # -- the model's description ----------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        try:
            if not self._client.is_model_ready(self.model, self.version):
                raise RemoteError(f"model {self.model!r} is not ready on {self.url} ({self.protocol})")
            if self.protocol == "http":
                return dict(self._client.get_model_config(self.model, self.version))
            return dict(self._client.get_model_config(self.model, self.version, as_json=True)["config"])
        except RemoteError:
            raise
        except Exception as e:
            raise RemoteError(f"model {self.model!r} on {self.url} ({self.protocol}): {_one_line(e)}") from e

    def _find_task(self, config: Mapping[str, Any]) -> str:
        task = _param(config.get("parameters", {}) or {}, PARAM_TASK)
        if task:
            if task not in TASK_OUTPUT_NAMES:
                raise RemoteError(f"model {self.model!r} is a {task} model; served tasks are {list(TASK_OUTPUT_NAMES)}")
            return task
        outputs = {o["name"] for o in config.get("output", [])}
        for name, needed in TASK_OUTPUT_NAMES.items():
            if set(needed) <= outputs:
                return name
        raise RemoteError(f"model {self.model!r} on {self.url} is not a vlexport model: its outputs "
                          f"{sorted(outputs)} match no task (and it has no {PARAM_TASK} parameter)")

    # -- requests -------------------------------------------------------------------------
    def _encode(self, bgr: np.ndarray) -> tuple[str, np.ndarray, str]:
        from vlexport.runtime.preprocess import check_image

        check_image(bgr)
        if self.encoding == "bgr":
            return "IMAGE_BGR", np.ascontiguousarray(bgr)[None], "UINT8"
        import cv2

        ext, flags = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]) if self.encoding == "jpeg" else (".png", [])
        ok, buf = cv2.imencode(ext, bgr, flags)
        if not ok:
            raise UsageError(f"could not encode the frame as {self.encoding}")
        return "IMAGE", np.array([[buf.tobytes()]], dtype=np.object_), "BYTES"

    def infer_arrays(self, inputs: Mapping[str, tuple[np.ndarray, str]],
                     outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Send ``{name: (array, wire datatype)}`` as one request; the outputs as arrays (RemoteError
        with the server's message when it refuses)."""
        mod = self._mod
        items = []
        for name, (arr, dtype) in inputs.items():
            item = mod.InferInput(name, list(arr.shape), dtype)
            item.set_data_from_numpy(arr)
            items.append(item)
        names = list(outputs) if outputs is not None else self._outputs
        requested = [mod.InferRequestedOutput(n) for n in names]
        try:
            if self.protocol == "http":
                result = self._client.infer(self.model, items, model_version=self.version, outputs=requested,
                                            timeout=int(self.timeout_s * 1e6))
            else:
                result = self._client.infer(self.model, items, model_version=self.version, outputs=requested,
                                            client_timeout=self.timeout_s)
        except Exception as e:
            raise RemoteError(f"{self.model} on {self.url}: {_one_line(e)}") from e
        return {n: result.as_numpy(n) for n in names}

    def _run(self, kind: str, bgr: np.ndarray, stamp: Any) -> Any:
        t0 = time.perf_counter()
        name, arr, dtype = self._encode(bgr)
        t1 = time.perf_counter()
        arrays = self.infer_arrays({name: (arr, dtype)})
        t2 = time.perf_counter()
        result = result_from_outputs(self.task_name, arrays, classes=self.classes, stamp=stamp)
        t3 = time.perf_counter()
        # The server's own pre-process/inference happen inside the round trip: one "network" stage.
        self.timings = {"preprocess": (t1 - t0) * 1e3, "infer": 0.0, "network": (t2 - t1) * 1e3,
                        "postprocess": (t3 - t2) * 1e3}
        return result

    def __getattr__(self, name: str) -> Any:
        # Only the served model's own method exists (detect, segment or caption), as on a runtime
        # task: the pipeline finds a task's role from the method it has.
        if name in TASK_OUTPUT_NAMES and name == self.__dict__.get("task_name"):
            def run(bgr: np.ndarray, stamp: Any = None) -> Any:
                return self._run(name, bgr, stamp)

            run.__doc__ = f"The {name} result of one BGR uint8 frame, from the server."
            return run
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}"
                             + (f" (model {self.__dict__.get('model')!r} is a {self.__dict__.get('task_name')} "
                                "model)" if name in TASK_OUTPUT_NAMES else ""))

    def statistics(self) -> dict[str, Any]:
        """The server's inference statistics of this model (Triton's statistics extension), as JSON."""
        try:
            if self.protocol == "http":
                return dict(self._client.get_inference_statistics(self.model, self.version))
            return dict(self._client.get_inference_statistics(self.model, self.version, as_json=True))
        except Exception as e:
            raise RemoteError(f"{self.model} on {self.url}: {_one_line(e)}") from e

    def describe(self) -> dict[str, Any]:
        return {"server": self.url, "protocol": self.protocol, "model": self.model, "task": self.task_name,
                "encoding": self.encoding}

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass

    def __enter__(self) -> RemoteTask:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteTask({self.url!r}, {self.model!r}, protocol={self.protocol!r}, task={self.task_name!r})"


def _param(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if isinstance(value, Mapping):
        value = value.get("string_value", value.get("stringValue"))
    return None if value in (None, "") else str(value)
