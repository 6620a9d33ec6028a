"""The TensorRT engine cache: keys, reuse, rebuilds, manifest integrity (no TensorRT needed).

The builder and the device are injected, so these tests exercise every caching rule on any machine;
the one test that builds a real engine needs TensorRT and a GPU and is skipped elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlexport.errors import BundleError, UsageError  # noqa: E402
from vlexport.export.bundle_writer import BundleWriter  # noqa: E402
from vlexport.runtime.backends import tensorrt_build as engines  # noqa: E402
from vlexport.runtime.backends.tensorrt_build import ensure_engine  # noqa: E402
from vlexport.runtime.bundle import Bundle, sha256_file  # noqa: E402
from vlexport.runtime.engine_cache import (  # noqa: E402
    TIMING_CACHE,
    EngineBuildError,
    EngineKey,
    engine_filename,
    engine_precisions,
    find_engine,
    profile_shapes,
)
from vlexport.runtime.spec import TensorSpec  # noqa: E402

DEVICE_A = ("10.3.0.26", "NVIDIA H100 80GB HBM3")
DEVICE_B = ("10.3.0.26", "NVIDIA L4")
SIZE = 8


# -- tiny bundles ------------------------------------------------------------------------------
def _const(name: str, arr: np.ndarray) -> Any:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr), name=name + "_v"))


def tiny_graph(path: Path, *, scale: float = 2.0, qdq: bool = False) -> Path:
    """images [batch, 3, 8, 8] -> y = relu(images * scale - 0.5), feat = mean_hw(y) [batch, 3]."""
    nodes = [_const("k", np.array(scale, np.float32)), _const("half", np.array(0.5, np.float32))]
    src = "images"
    if qdq:  # an explicitly quantised (QDQ) input, as the int8 export writes
        nodes += [
            _const("s", np.array(1 / 127, np.float32)),
            _const("z", np.array(0, np.int8)),
            helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        ]
        src = "dq"
    nodes += [
        helper.make_node("Mul", [src, "k"], ["m"]),
        helper.make_node("Sub", ["m", "half"], ["d"]),
        helper.make_node("Relu", ["d"], ["y"]),
        helper.make_node("ReduceMean", ["y"], ["feat"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE]),
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["batch", 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="vlexport-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


PART_IO = {
    "inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 3, SIZE, SIZE]}],
    "outputs": [
        {"name": "y", "dtype": "float32", "shape": ["batch", 3, SIZE, SIZE]},
        {"name": "feat", "dtype": "float32", "shape": ["batch", 3]},
    ],
}
FILES = {"fp32": "tiny.onnx", "fp16": "tiny.fp16.onnx", "int8": "tiny.int8.onnx"}


def make_bundle(out: Path, precisions: tuple[str, ...] = ("fp32", "int8"), classes: list[str] | None = None) -> Path:
    """A real bundle (BundleWriter: hashes, manifest written last) with one part, "tiny"."""
    with BundleWriter(out) as w:
        files = {}
        for p in precisions:
            tiny_graph(w.path(FILES[p]), scale=3.0 if p == "fp16" else 2.0, qdq=p == "int8")
            files[p] = FILES[p]
        manifest: dict[str, Any] = {
            "family": "tiny",
            "task": "embed",
            "preset": "tiny",
            "preprocess": {"size": [SIZE, SIZE], "resize": "letterbox", "pad_value": 114, "color": "RGB",
                           "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]},
            "parts": {"tiny": {**PART_IO, "files": files, "engines": {}}},
        }
        if classes is not None:
            w.write_vocab(classes, np.eye(len(classes), 4, dtype=np.float32))
            manifest["vocabulary"] = {"classes": classes, "templates": "none", "mode": "baked", "file": "vocab.npz"}
        return w.commit(manifest)


class FakeBuilder:
    """Writes recognisable bytes instead of running TensorRT; records every call."""

    def __init__(self, fail: bool = False, nonce: bytes = b""):
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.nonce = nonce  # makes a rebuild's bytes differ from the first build's

    def __call__(self, onnx_path: Path, out_path: Path, **kw: Any) -> Path:
        self.calls.append({"onnx": Path(onnx_path), "out": Path(out_path), **kw})
        if self.fail:
            Path(out_path).write_bytes(b"half an eng")  # a partial file that must not survive
            raise EngineBuildError("TensorRT cannot parse tiny.onnx (1 error(s)): node x (Foo): unsupported")
        Path(out_path).write_bytes(b"ENGINE " + kw["precision"].encode() + self.nonce + b" " + Path(onnx_path).read_bytes())
        return Path(out_path)


def manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def visible_files(root: Path) -> dict[str, bytes]:
    """Every non-hidden file with its bytes (the lock file is hidden)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _sha(path: Path) -> str:
    return sha256_file(path)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "b")


# -- keys --------------------------------------------------------------------------------------
def test_engine_key_is_stable_and_every_field_matters() -> None:
    key = EngineKey("a" * 64, "10.3.0.26", "NVIDIA H100 80GB HBM3", "fp16")
    kid = key.key_id()
    assert len(kid) == 16 and all(c in "0123456789abcdef" for c in kid)
    assert EngineKey("a" * 64, "10.3.0.26", "NVIDIA H100 80GB HBM3", "fp16").key_id() == kid
    assert EngineKey.from_dict(key.to_dict()) == key and EngineKey.from_dict(key.to_dict()).key_id() == kid
    assert json.loads(json.dumps(key.to_dict())) == key.to_dict()
    changed = [
        dataclasses.replace(key, onnx_sha256="b" * 64),
        dataclasses.replace(key, trt_version="10.4.0.1"),
        dataclasses.replace(key, gpu_name="NVIDIA L4"),
        dataclasses.replace(key, precision="int8"),
    ]
    ids = {k.key_id() for k in changed}
    assert kid not in ids and len(ids) == 4
    assert engine_filename("detector", "fp16", key) == f"detector.fp16.{kid}.engine"


def test_engine_key_rejects_malformed_input() -> None:
    with pytest.raises(BundleError, match="lacks"):
        EngineKey.from_dict({"onnx_sha256": "a", "trt_version": "10"})
    with pytest.raises(BundleError, match="invalid engine key"):
        EngineKey.from_dict({"onnx_sha256": "a", "trt_version": "10", "gpu_name": "", "precision": "fp16"})
    with pytest.raises(ValueError):
        EngineKey("a", "10", 3, "fp16")  # type: ignore[arg-type]


def test_engine_precisions_follow_the_source_onnx() -> None:
    assert engine_precisions({"fp32": "a.onnx"}) == ["fp32", "fp16"]
    assert engine_precisions({"fp32": "a.onnx", "int8": "b.onnx"}) == ["fp32", "fp16", "int8"]
    assert engine_precisions({"int8": "b.onnx"}) == ["int8"]
    assert engine_precisions({"fp16": "c.onnx"}) == []


# -- build, record, reuse ----------------------------------------------------------------------
def test_first_call_builds_and_records(bundle: Path) -> None:
    fake = FakeBuilder()
    path = ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)

    (call,) = fake.calls
    assert call["onnx"] == bundle / "tiny.onnx" and call["precision"] == "fp32"
    assert call["timing_cache"] == bundle / TIMING_CACHE and call["progress"] is False
    assert call["shapes"] == {"images": ((1, 3, SIZE, SIZE), (1, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))}
    assert call["out"].parent == bundle and call["out"].name.startswith(".")  # built into a hidden temp file

    key = EngineKey(_sha(bundle / "tiny.onnx"), *DEVICE_A, "fp32")
    assert path == bundle / engine_filename("tiny", "fp32", key)
    assert path.read_bytes().startswith(b"ENGINE fp32 ")
    m = manifest(bundle)
    entry = m["parts"]["tiny"]["engines"]["fp32"]
    assert entry["file"] == path.name and entry["onnx"] == "tiny.onnx"
    assert entry["key"] == key.to_dict() and entry["sha256"] == f"sha256:{_sha(path)}"
    assert entry["profile"] == {"images": [[1, 3, SIZE, SIZE], [1, 3, SIZE, SIZE], [8, 3, SIZE, SIZE]]}
    assert entry["built"].endswith("+00:00")
    assert m["files"][path.name] == f"sha256:{_sha(path)}"
    opened = Bundle.open(bundle)
    assert path.name in opened.verify_all()
    assert opened.part("tiny").engines["fp32"]["file"] == path.name
    assert find_engine(opened, "tiny", "fp32", key) == path
    assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")]


def test_second_call_reuses(bundle: Path) -> None:
    fake = FakeBuilder()
    first = ensure_engine(bundle, "tiny", "fp16", builder=fake, device=DEVICE_A, progress=False)
    before = (bundle / "manifest.json").read_bytes()
    second = ensure_engine(bundle, "tiny", "fp16", builder=fake, device=DEVICE_A, progress=False)
    assert second == first and len(fake.calls) == 1
    assert (bundle / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("other", [DEVICE_B, ("10.4.0.1", DEVICE_A[1])], ids=["gpu", "trt-version"])
def test_other_device_rebuilds_and_removes_the_stale_engine(bundle: Path, other: tuple[str, str]) -> None:
    fake = FakeBuilder()
    old = ensure_engine(bundle, "tiny", "fp16", builder=fake, device=DEVICE_A, progress=False)
    new = ensure_engine(bundle, "tiny", "fp16", builder=fake, device=other, progress=False)
    assert len(fake.calls) == 2 and new != old
    assert new.is_file() and not old.exists()
    m = manifest(bundle)
    assert old.name not in m["files"] and new.name in m["files"]
    assert m["parts"]["tiny"]["engines"]["fp16"]["key"]["gpu_name"] == other[1]
    assert m["parts"]["tiny"]["engines"]["fp16"]["key"]["trt_version"] == other[0]
    Bundle.open(bundle).verify_all()


def test_a_recorded_engine_with_another_key_is_never_loaded(bundle: Path) -> None:
    ensure_engine(bundle, "tiny", "fp32", builder=FakeBuilder(), device=DEVICE_A, progress=False)
    b = Bundle.open(bundle)
    sha = _sha(bundle / "tiny.onnx")
    assert find_engine(b, "tiny", "fp32", EngineKey(sha, *DEVICE_A, "fp32")) is not None
    assert find_engine(b, "tiny", "fp32", EngineKey(sha, *DEVICE_B, "fp32")) is None
    assert find_engine(b, "tiny", "fp32", EngineKey("0" * 64, *DEVICE_A, "fp32")) is None
    assert find_engine(b, "tiny", "fp16", EngineKey(sha, *DEVICE_A, "fp16")) is None  # nothing recorded


def test_reexported_onnx_rebuilds(bundle: Path) -> None:
    fake = FakeBuilder()
    old = ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    # Re-export the graph in place (new bytes, manifest updated to match), as an export would.
    tiny_graph(bundle / "tiny.onnx", scale=5.0)
    m = manifest(bundle)
    m["files"]["tiny.onnx"] = f"sha256:{_sha(bundle / 'tiny.onnx')}"
    (bundle / "manifest.json").write_text(json.dumps(m))
    new = ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    assert len(fake.calls) == 2 and new != old and not old.exists()
    assert manifest(bundle)["parts"]["tiny"]["engines"]["fp32"]["key"]["onnx_sha256"] == _sha(bundle / "tiny.onnx")
    Bundle.open(bundle).verify_all()


def test_modified_onnx_without_manifest_is_refused(bundle: Path) -> None:
    tiny_graph(bundle / "tiny.onnx", scale=5.0)  # bytes no longer match the manifest
    fake = FakeBuilder()
    with pytest.raises(BundleError, match="does not match its sha256"):
        ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    assert fake.calls == []


def test_tampered_engine_is_rebuilt_not_loaded(bundle: Path) -> None:
    fake = FakeBuilder()
    path = ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    good = path.read_bytes()
    path.write_bytes(b"evil" + good[4:])
    key = EngineKey(_sha(bundle / "tiny.onnx"), *DEVICE_A, "fp32")
    assert find_engine(Bundle.open(bundle), "tiny", "fp32", key) is None
    again = ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    assert again == path and len(fake.calls) == 2 and again.read_bytes() == good
    Bundle.open(bundle).verify_all()


def test_missing_engine_file_is_rebuilt(bundle: Path) -> None:
    fake = FakeBuilder()
    path = ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    path.unlink()
    assert ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False) == path
    assert path.is_file() and len(fake.calls) == 2
    Bundle.open(bundle).verify_all()


def test_failing_builder_leaves_manifest_and_files_unchanged(bundle: Path) -> None:
    before = visible_files(bundle)
    with pytest.raises(EngineBuildError, match="cannot parse"):
        ensure_engine(bundle, "tiny", "fp32", builder=FakeBuilder(fail=True), device=DEVICE_A, progress=False)
    assert visible_files(bundle) == before
    assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")]

    # Also when a good engine exists and a forced rebuild fails.
    ensure_engine(bundle, "tiny", "fp32", builder=FakeBuilder(), device=DEVICE_A, progress=False)
    before = visible_files(bundle)
    with pytest.raises(EngineBuildError):
        ensure_engine(bundle, "tiny", "fp32", builder=FakeBuilder(fail=True), device=DEVICE_A, force=True,
                      progress=False)
    assert visible_files(bundle) == before
    Bundle.open(bundle).verify_all()


def test_interrupted_build_leaves_no_temp_file(bundle: Path) -> None:
    def interrupted(onnx_path: Path, out_path: Path, **kw: Any) -> None:
        Path(out_path).write_bytes(b"partial")
        raise KeyboardInterrupt

    before = visible_files(bundle)
    with pytest.raises(KeyboardInterrupt):
        ensure_engine(bundle, "tiny", "fp32", builder=interrupted, device=DEVICE_A, progress=False)
    assert visible_files(bundle) == before
    assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")]


def test_builder_that_writes_nothing_is_an_error(bundle: Path) -> None:
    with pytest.raises(EngineBuildError, match="produced no engine file"):
        ensure_engine(bundle, "tiny", "fp32", builder=lambda *a, **k: None, device=DEVICE_A, progress=False)
    assert manifest(bundle)["parts"]["tiny"]["engines"] == {}


def test_fp16_is_keyed_on_fp32_onnx_and_int8_on_int8_onnx(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", precisions=("fp32", "fp16", "int8"))
    fake = FakeBuilder()
    p16 = ensure_engine(root, "tiny", "fp16", builder=fake, device=DEVICE_A, progress=False)
    p8 = ensure_engine(root, "tiny", "int8", builder=fake, device=DEVICE_A, progress=False)
    p32 = ensure_engine(root, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    assert [c["onnx"].name for c in fake.calls] == ["tiny.onnx", "tiny.int8.onnx", "tiny.onnx"]
    assert [c["precision"] for c in fake.calls] == ["fp16", "int8", "fp32"]
    engines_ = manifest(root)["parts"]["tiny"]["engines"]
    assert engines_["fp16"]["onnx"] == "tiny.onnx"  # not tiny.fp16.onnx
    assert engines_["fp16"]["key"]["onnx_sha256"] == _sha(root / "tiny.onnx")
    assert engines_["int8"]["onnx"] == "tiny.int8.onnx"
    assert engines_["int8"]["key"]["onnx_sha256"] == _sha(root / "tiny.int8.onnx")
    assert len({p16, p8, p32}) == 3 and all(p.is_file() for p in (p16, p8, p32))
    Bundle.open(root).verify_all()


def test_missing_precision_part_or_bad_name(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", precisions=("fp32",))
    fake = FakeBuilder()
    with pytest.raises(BundleError, match=r"no int8 ONNX file to build a int8 TensorRT engine"):
        ensure_engine(root, "tiny", "int8", builder=fake, device=DEVICE_A, progress=False)
    with pytest.raises(BundleError, match="no part 'detector'"):
        ensure_engine(root, "detector", "fp32", builder=fake, device=DEVICE_A, progress=False)
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        ensure_engine(root, "tiny", "fp8", builder=fake, device=DEVICE_A, progress=False)
    only_int8 = make_bundle(tmp_path / "c", precisions=("int8",))
    with pytest.raises(BundleError, match="no fp32 ONNX file to build a fp16"):
        ensure_engine(only_int8, "tiny", "fp16", builder=fake, device=DEVICE_A, progress=False)
    assert fake.calls == []


def test_profile_change_rebuilds_in_place(bundle: Path) -> None:
    fake = FakeBuilder()
    path = ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    again = ensure_engine(bundle, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False, batch=(1, 4, 16))
    assert again == path and len(fake.calls) == 2  # same key, so the same file name
    assert fake.calls[1]["shapes"]["images"][2] == (16, 3, SIZE, SIZE)
    assert manifest(bundle)["parts"]["tiny"]["engines"]["fp32"]["profile"]["images"][2][0] == 16
    Bundle.open(bundle).verify_all()


def test_orphans_of_interrupted_builds_are_removed(bundle: Path) -> None:
    orphan = bundle / "tiny.fp32.0123456789abcdef.engine"
    orphan.write_bytes(b"left by a crash between rename and manifest update")
    other = bundle / "tiny.fp16.0123456789abcdef.engine"  # another precision: not ours to remove
    other.write_bytes(b"x")
    ensure_engine(bundle, "tiny", "fp32", builder=FakeBuilder(), device=DEVICE_A, progress=False)
    assert not orphan.exists() and other.exists()


def test_manifest_is_valid_at_every_instant(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every rename (engine or manifest), the bundle verifies: no listed file is missing or stale."""
    checks: list[str] = []
    real_replace = os.replace

    def checked_replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if Path(dst).parent == bundle:
            Bundle.open(bundle).verify_all()
            checks.append(Path(dst).name)

    def checking_builder(onnx_path: Path, out_path: Path, **kw: Any) -> None:
        Bundle.open(bundle).verify_all()
        FakeBuilder(nonce=b" v2")(onnx_path, out_path, **kw)

    ensure_engine(bundle, "tiny", "fp32", builder=FakeBuilder(), device=DEVICE_A, progress=False)
    monkeypatch.setattr(os, "replace", checked_replace)
    # A forced rebuild with the same key replaces the very file the manifest lists: the riskiest case.
    ensure_engine(bundle, "tiny", "fp32", builder=checking_builder, device=DEVICE_A, force=True, progress=False)
    # A rebuild for another device replaces the entry and deletes the old file.
    ensure_engine(bundle, "tiny", "fp32", builder=checking_builder, device=DEVICE_B, progress=False)
    assert checks.count("manifest.json") >= 3 and any(c.endswith(".engine") for c in checks)
    Bundle.open(bundle).verify_all()


# -- profiles ----------------------------------------------------------------------------------
def test_profile_shapes_from_named_axes() -> None:
    specs = [
        TensorSpec("images", "float32", ("batch", 3, 64, 64)),
        TensorSpec("text_embeddings", "float32", ("num_classes", 512)),
    ]
    shapes = profile_shapes(specs, batch=(1, 2, 4), axes={"num_classes": (1, 80, 1024)})
    assert shapes == {
        "images": ((1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64)),
        "text_embeddings": ((1, 512), (80, 512), (1024, 512)),
    }
    with pytest.raises(UsageError, match=r"text_embeddings\[num_classes\]"):
        profile_shapes(specs)
    with pytest.raises(UsageError, match="min <= opt <= max"):
        profile_shapes(specs[:1], batch=(4, 2, 8))


def test_vocabulary_sets_the_num_classes_range(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", classes=["person", "bus", "car"])
    m = manifest(root)
    m["parts"]["tiny"]["inputs"].append({"name": "text_embeddings", "dtype": "float32", "shape": ["num_classes", 4]})
    (root / "manifest.json").write_text(json.dumps(m))
    fake = FakeBuilder()
    ensure_engine(root, "tiny", "fp32", builder=fake, device=DEVICE_A, progress=False)
    assert fake.calls[0]["shapes"]["text_embeddings"] == ((1, 4), (3, 4), (1024, 4))


# -- a real engine (needs TensorRT 10, cuda-python and a CUDA GPU) -------------------------------
def _trt_unavailable() -> str | None:
    from vlexport.runtime.backends.tensorrt import unavailable_reason

    return unavailable_reason()


_WHY = _trt_unavailable()


@pytest.mark.gpu
@pytest.mark.skipif(_WHY is not None, reason=f"needs TensorRT 10, cuda-python and a CUDA GPU ({_WHY})")
def test_real_engine_matches_onnxruntime(tmp_path: Path) -> None:
    from vlexport.runtime.backends.onnxruntime import OrtBackend
    from vlexport.runtime.backends.tensorrt import TensorRTBackend

    root = make_bundle(tmp_path / "b", precisions=("fp32",))
    io = Bundle.open(root).part("tiny").io
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, SIZE, SIZE), dtype=np.float32)
    with OrtBackend(root / "tiny.onnx", providers=["CPUExecutionProvider"]) as ort_be:
        want = ort_be.infer({"images": x})
    for precision, tol in (("fp32", 1e-5), ("fp16", 1e-2)):
        path = ensure_engine(root, "tiny", precision, progress=True)
        with TensorRTBackend(path, io=io) as be:
            assert [(s.name, s.dtype, s.shape) for s in be.inputs] == [("images", "float32", ("batch", 3, SIZE, SIZE))]
            assert {s.name: s.shape for s in be.outputs} == {"y": ("batch", 3, SIZE, SIZE), "feat": ("batch", 3)}
            assert be.max_batch == 8 and "TensorRT" in be.device
            for n in (3, 1, 3):  # a smaller batch and back: buffers are reused
                got = be.infer({"images": x[:n]})
                for name in ("y", "feat"):
                    np.testing.assert_allclose(got[name], want[name][:n], rtol=tol, atol=tol)
            with pytest.raises(UsageError, match="the engine accepts"):
                be.infer({"images": np.zeros((9, 3, SIZE, SIZE), np.float32)})
        mtime = path.stat().st_mtime_ns
        assert ensure_engine(root, "tiny", precision, progress=False) == path and path.stat().st_mtime_ns == mtime
    assert (root / TIMING_CACHE).is_file()
    Bundle.open(root).verify_all()
    assert engines.current_device()[0].startswith("10.")


def test_detr_bundles_get_an_image_size_range_for_their_dynamic_axes(tmp_path: Path) -> None:
    from vlexport.runtime.bundle import Bundle
    from vlexport.runtime.engine_cache import _default_axes, profile_shapes
    from vlexport.runtime.spec import TensorSpec

    root = make_bundle(tmp_path / "b")
    m = manifest(root)
    m["preprocess"] = {"resize": "detr", "short_side": 800, "max_size": 1333}
    (root / "manifest.json").write_text(json.dumps(m))
    axes = _default_axes(Bundle.open(root))
    assert axes["height"] == axes["width"] == (32, 800, 1333)
    shapes = profile_shapes([TensorSpec("images", "float32", (1, 3, "height", "width"))], axes=axes)
    assert shapes["images"] == ((1, 3, 32, 32), (1, 3, 800, 800), (1, 3, 1333, 1333))
