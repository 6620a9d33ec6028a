"""Choosing a backend: TensorRT when it can run here, else onnxruntime; explicit names are honoured.

TensorRT is absent on the test machine, so its presence is simulated: a fake ``tensorrt`` module
for the import probes, and (for the task path) a stand-in engine builder and backend.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASSES, make_detector

import vlexport.runtime as vr
from vlexport.errors import BundleError, DependencyError, UsageError
from vlexport.export.bundle_writer import BundleWriter
from vlexport.runtime.backends import tensorrt_build as engines
from vlexport.runtime.backends import (
    backend_names,
    create_backend,
    describe_backends,
    has_accelerator,
    preferred_backend,
    resolve_backend,
)
from vlexport.runtime.backends import onnxruntime as ortb
from vlexport.runtime.backends import tensorrt as trtb
from vlexport.runtime.backends.onnxruntime import OrtBackend
from vlexport.runtime.bundle import Bundle

SIZE = 32


def detector_bundle(out: Path) -> Path:
    """A detect bundle with an fp32 detector, written by BundleWriter."""
    with BundleWriter(out) as w:
        make_detector(w.path("detector.onnx"), (SIZE, SIZE))
        w.write_vocab(CLASSES, np.eye(len(CLASSES), 4, dtype=np.float32))
        return w.commit(
            {
                "family": "tiny",
                "task": "detect",
                "preset": "tiny",
                "preprocess": {"size": [SIZE, SIZE], "resize": "letterbox", "pad_value": 114, "color": "RGB",
                               "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]},
                "vocabulary": {"classes": CLASSES, "templates": "none", "mode": "baked", "file": "vocab.npz"},
                "parts": {
                    "detector": {
                        "inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 3, SIZE, SIZE]}],
                        "outputs": [
                            {"name": "boxes", "dtype": "float32", "shape": ["batch", "anchors", 4]},
                            {"name": "scores", "dtype": "float32", "shape": ["batch", "anchors"]},
                            {"name": "class_ids", "dtype": "int32", "shape": ["batch", "anchors"]},
                        ],
                        "files": {"fp32": "detector.onnx"},
                        "engines": {},
                    }
                },
                "postprocess": {"score_threshold": 0.25, "iou_threshold": 0.5, "max_detections": 300},
            }
        )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return detector_bundle(tmp_path / "b")


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import tensorrt` raise ImportError, whatever is installed.
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def fake_tensorrt(monkeypatch: pytest.MonkeyPatch, version: str = "10.3.0.26") -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))


# -- TensorRT absent -----------------------------------------------------------------------------
def test_without_tensorrt_the_default_is_onnxruntime(bundle: Path, no_tensorrt: None) -> None:
    assert preferred_backend() == "onnxruntime" and resolve_backend(None) == "onnxruntime"
    with create_backend(bundle / "detector.onnx") as be:
        assert isinstance(be, OrtBackend) and be.name == "onnxruntime"
    task = vr.load(bundle)
    assert task.backend.name == "onnxruntime" and task.backend_name == "onnxruntime"
    assert task.model_path == bundle / "detector.onnx"
    assert task.describe()["backend"] == "onnxruntime"
    assert has_accelerator("tensorrt") is False


def test_explicit_tensorrt_without_tensorrt_says_why(bundle: Path, no_tensorrt: None) -> None:
    with pytest.raises(DependencyError) as e:
        create_backend(bundle / "detector.onnx", backend="tensorrt")
    msg = str(e.value)
    assert "TensorRT is not installed: pip install 'vlexport[trt]' on the target (needs an NVIDIA GPU)" in msg
    assert isinstance(e.value.__cause__, DependencyError)
    assert isinstance(e.value.__cause__.__cause__, ImportError)  # chained down to the import
    # A .engine file picks TensorRT by itself, and fails the same way.
    engine = bundle / "x.engine"
    engine.write_bytes(b"\0")
    with pytest.raises(DependencyError, match="TensorRT is not installed"):
        create_backend(engine)


def test_explicit_tensorrt_fails_before_hashing(bundle: Path, no_tensorrt: None) -> None:
    (bundle / "detector.onnx").write_bytes(b"corrupt")  # would be a BundleError if it got that far
    with pytest.raises(DependencyError, match="TensorRT is not installed"):
        vr.load(bundle, backend="tensorrt")
    with pytest.raises(BundleError, match="does not match its sha256"):
        vr.load(bundle, backend="onnxruntime")


def test_describe_backends_lists_tensorrt_unavailable(no_tensorrt: None) -> None:
    by_name = {d["name"]: d for d in describe_backends()}
    assert set(by_name) == {"onnxruntime", "tensorrt"} and backend_names() == ["onnxruntime", "tensorrt"]
    trt = by_name["tensorrt"]
    assert trt["available"] is False
    assert trt["reason"] == "TensorRT is not installed: pip install 'vlexport[trt]' on the target (needs an NVIDIA GPU)"
    assert by_name["onnxruntime"]["available"] is True


def test_unknown_backend_lists_both(bundle: Path) -> None:
    with pytest.raises(UsageError, match=r"unknown backend 'tensorflow'; choose one of \['onnxruntime', 'tensorrt'\]"):
        resolve_backend("tensorflow")
    with pytest.raises(UsageError, match="unknown backend"):
        vr.load(bundle, backend="tensorflow")


# -- TensorRT importable, something else missing --------------------------------------------------
def test_tensorrt_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(ortb, "_probe_cuda", lambda: "the CUDA driver sees no GPU")
    why = trtb.unavailable_reason()
    assert why == "TensorRT needs an NVIDIA GPU, but the CUDA driver sees no GPU"
    assert preferred_backend() == "onnxruntime"
    (trt,) = [d for d in describe_backends() if d["name"] == "tensorrt"]
    assert trt == {"name": "tensorrt", "available": False, "reason": why}
    with pytest.raises(DependencyError, match="tensorrt backend cannot run here: TensorRT needs an NVIDIA GPU"):
        resolve_backend("tensorrt")


def test_tensorrt_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt(monkeypatch, "8.6.1")
    assert "TensorRT 8.6.1 is too old" in (trtb.unavailable_reason() or "")


def test_tensorrt_without_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(ortb, "_probe_cuda", lambda: None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    assert "cuda-python is not installed" in (trtb.unavailable_reason() or "")


def test_broken_tensorrt_install_is_a_dependency_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DependencyError, match="TensorRT cannot be imported \\(OSError: libnvinfer") as e:
        trtb.import_tensorrt()
    assert isinstance(e.value.__cause__, OSError)


# -- TensorRT usable (simulated) ------------------------------------------------------------------
class StandInEngineBackend(OrtBackend):
    """Plays the TensorRT backend: the stand-in builder writes the ONNX bytes as the "engine"."""

    name = "tensorrt"
    max_batch = 2
    opened: list[Path] = []

    def __init__(self, engine_path: Path, device: int = 0, *, io: Any = None):
        super().__init__(engine_path, providers=["CPUExecutionProvider"])
        StandInEngineBackend.opened.append(Path(engine_path))


@pytest.fixture
def tensorrt_usable(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    builds: list[dict[str, Any]] = []

    def stand_in_builder(onnx_path: Path, out_path: Path, **kw: Any) -> Path:
        builds.append({"onnx": Path(onnx_path).name, **kw})
        Path(out_path).write_bytes(Path(onnx_path).read_bytes())
        return Path(out_path)

    monkeypatch.setattr(trtb, "require_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0.26"))
    monkeypatch.setattr(trtb, "unavailable_reason", lambda: None)
    monkeypatch.setattr(trtb, "TensorRTBackend", StandInEngineBackend)
    monkeypatch.setattr(engines, "current_device", lambda ordinal=0: ("10.3.0.26", "NVIDIA Test GPU"))
    monkeypatch.setattr(engines, "build_engine", stand_in_builder)
    StandInEngineBackend.opened = []
    return builds


def test_with_tensorrt_the_default_builds_and_reuses_an_engine(
    bundle: Path, tensorrt_usable: list[dict[str, Any]]
) -> None:
    assert preferred_backend() == "tensorrt" and has_accelerator() is True
    (trt,) = [d for d in describe_backends() if d["name"] == "tensorrt"]
    assert trt == {"name": "tensorrt", "available": True, "version": "10.3.0.26", "device": "NVIDIA Test GPU"}

    task = vr.load(bundle)
    # On a GPU the fast float path is fp16, built from the fp32 ONNX.
    assert task.backend_name == "tensorrt" and task.backend.name == "tensorrt" and task.precision == "fp16"
    (build,) = tensorrt_usable
    assert build["onnx"] == "detector.onnx" and build["precision"] == "fp16" and build["progress"] is True
    entry = json.loads((bundle / "manifest.json").read_text())["parts"]["detector"]["engines"]["fp16"]
    assert task.model_path == bundle / entry["file"] and task.model_path.suffix == ".engine"
    assert StandInEngineBackend.opened == [task.model_path]
    Bundle.open(bundle).verify_all()

    # The engine's profile caps the batch: 3 frames run as 2 + 1.
    frames = [np.full((SIZE, SIZE, 3), v, np.uint8) for v in (0, 128, 255)]
    results = task.detect_batch(frames)
    assert len(results) == 3 and task._max_batch == 2

    again = vr.load(bundle, precision="fp32")
    assert again.precision == "fp32" and len(tensorrt_usable) == 2
    vr.load(bundle)  # fp16 again: reused, not rebuilt
    assert len(tensorrt_usable) == 2


def test_with_tensorrt_explicit_onnxruntime_is_honoured(bundle: Path, tensorrt_usable: list[dict[str, Any]]) -> None:
    task = vr.load(bundle, backend="onnxruntime")
    assert task.backend.name == "onnxruntime" and task.model_path == bundle / "detector.onnx"
    assert tensorrt_usable == []


def test_with_tensorrt_int8_needs_the_int8_onnx(bundle: Path, tensorrt_usable: list[dict[str, Any]]) -> None:
    with pytest.raises(BundleError, match=r"has no int8 file; it has \['fp32', 'fp16'\]"):
        vr.load(bundle, precision="int8")
    assert tensorrt_usable == []


def test_tensorrt_backend_loads_engines_not_onnx(bundle: Path, tensorrt_usable: list[dict[str, Any]]) -> None:
    with pytest.raises(UsageError, match=r"loads a built \.engine file, not ONNX"):
        create_backend(bundle / "detector.onnx", backend="tensorrt")
