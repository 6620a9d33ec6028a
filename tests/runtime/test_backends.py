"""Specs, feed validation and the onnxruntime backend on a real tiny graph."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from conftest import make_detector

from vlexport.errors import DependencyError, UsageError
from vlexport.runtime.backends import Backend, create_backend, describe_backends
from vlexport.runtime.backends import onnxruntime as ortb
from vlexport.runtime.spec import TensorSpec, check_feeds


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_detector(tmp_path / "det.onnx", (32, 32), text_input=True)


def test_check_feeds_reports_every_problem() -> None:
    specs = [TensorSpec("images", "float32", ("batch", 3, 8, 8)), TensorSpec("t", "float32", ("batch", 4))]
    problems = check_feeds(specs, {"images": np.zeros((2, 3, 8, 8), np.float32), "t": np.zeros((3, 4), np.float32)})
    assert problems == ["t: axis 'batch' is 3 here but 2 in another tensor"]
    assert check_feeds(specs, {"images": np.zeros((1, 3, 8, 8), np.float32), "t": np.zeros((1, 4), np.float32)}) == []


def test_backend_describes_the_model(model: Path) -> None:
    with create_backend(model) as be:
        assert isinstance(be, Backend) and be.name == "onnxruntime"
        assert [s.name for s in be.inputs] == ["images", "text_embeddings"]
        assert be.inputs[0] == TensorSpec("images", "float32", ("batch", 3, 32, 32))
        assert {s.name: s.dtype for s in be.outputs} == {"boxes": "float32", "scores": "float32", "class_ids": "int32"}
        assert be.providers and be.providers[-1] == "CPUExecutionProvider"
        assert be.device == be.providers[0]


def test_infer_runs_and_validates_first(model: Path) -> None:
    with create_backend(model, threads=1) as be:
        out = be.infer(
            {"images": np.ones((2, 3, 32, 32), np.float32), "text_embeddings": np.eye(3, 4, dtype=np.float32)}
        )
        assert out["boxes"].shape == (2, 6, 4) and out["class_ids"].dtype == np.int32
        np.testing.assert_allclose(out["scores"][:, 0], 1.0)  # the brightness anchor: mean of the input
        with pytest.raises(UsageError) as e:
            be.infer({"images": np.zeros((1, 3, 32, 31), np.float64), "extra": np.zeros(1)})
        msg = str(e.value)
        # One error listing all three problems.
        assert "missing inputs ['text_embeddings']" in msg
        assert "unexpected inputs ['extra']" in msg
        assert "images: got dtype float64, expected float32" in msg
        with pytest.raises(UsageError) as e:
            be.infer({"images": np.zeros((1, 3, 32, 31), np.float32), "text_embeddings": np.zeros((3, 5), np.float32)})
        assert "images: got shape (1, 3, 32, 31)" in str(e.value)
        assert "text_embeddings: got shape (3, 5)" in str(e.value)


def test_available_providers_are_probed_not_trusted() -> None:
    providers = ortb.available_providers()
    assert providers[-1] == "CPUExecutionProvider"
    if not _cuda_driver_present():
        # The GPU wheel lists CUDA/TensorRT here regardless; we must not.
        assert providers == ["CPUExecutionProvider"]
        report = ortb.provider_report()
        assert report["CUDAExecutionProvider"] and report["TensorrtExecutionProvider"]


def test_describe_backends() -> None:
    (ort_desc,) = [d for d in describe_backends() if d["name"] == "onnxruntime"]
    assert ort_desc["available"] is True and "CPUExecutionProvider" in ort_desc["providers"]
    assert set(ort_desc["unavailable"]) | set(ort_desc["providers"]) == {
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    }


def test_unknown_backend_lists_choices(model: Path) -> None:
    with pytest.raises(UsageError, match=r"unknown backend 'tensorflow'; choose one of \['onnxruntime'"):
        create_backend(model, backend="tensorflow")


def test_bad_threads_and_missing_file(model: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="threads"):
        create_backend(model, threads=0)
    with pytest.raises(UsageError, match="not found"):
        create_backend(tmp_path / "nope.onnx")


def test_corrupt_model_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UsageError, match="cannot load"):
        create_backend(bad)


def test_missing_onnxruntime_is_a_dependency_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DependencyError, match="onnxruntime cannot be imported") as e:
        ortb.import_ort()
    assert isinstance(e.value.__cause__, ImportError)
