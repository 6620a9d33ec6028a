"""Fixtures of the serving tests: real bundles (the runtime tests' tiny detector, a tiny binary
segmenter, the exported tiny captioner, the shared YOLOv8n, a tiny DETR), the shared photos, and a
real Triton server (from the nvidia-pytriton wheel) on 127.0.0.1 for the whole session.

The server's environment (its own venv, numpy<2) is built once and kept across runs in a fixed
folder: ``$VLEXPORT_TEST_TRITON_ENV``, else ``~/.cache/vlexport/triton-env-tests`` (the session's
isolated ``VLEXPORT_CACHE`` would rebuild it every run). Teardown stops the server by its PID and
checks that no process and no shared-memory file is left.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

pytest.importorskip("tritonclient.grpc.model_config_pb2")
pytest.importorskip("tritonclient.http")

_spec = importlib.util.spec_from_file_location("vlexport_tests_runtime_helpers",
                                               Path(__file__).resolve().parents[1] / "runtime" / "conftest.py")
runtime_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtime_helpers)
write_bundle = runtime_helpers.write_bundle
CLASSES = runtime_helpers.CLASSES

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets"))
SEG_CLASSES = ["background", "bright"]


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write_binary_segment_bundle(root: Path, size: int = 64, batch: int | str = "batch") -> Path:
    """A real multiscale-family bundle: logits = 10 * mean over channels - 5 (bright pixels are the object)."""
    root.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Constant", [], ["ten"], value=helper.make_tensor("ten_v", TensorProto.FLOAT, [], [10.0])),
        helper.make_node("Constant", [], ["five"], value=helper.make_tensor("five_v", TensorProto.FLOAT, [], [5.0])),
        helper.make_node("Mul", ["m", "ten"], ["m10"]),
        helper.make_node("Sub", ["m10", "five"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_binary",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(root / "segmenter.onnx"))
    manifest = {
        "schema": "vlexport.bundle/1", "family": "multiscale", "task": "segment", "preset": "tiny",
        "preprocess": {"size": [size, size], "resize": "letterbox", "pad_value": 0, "color": "RGB",
                       "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "vocabulary": {"classes": SEG_CLASSES},
        "parts": {"segmenter": {
            "inputs": [{"name": "images", "dtype": "float32", "shape": [batch, 3, size, size]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [batch, 1, size, size]}],
            "files": {"fp32": "segmenter.onnx"}, "engines": {}}},
        "postprocess": None,
        "segment": {"threshold": 0.5, "classes": SEG_CLASSES},
        "files": {"segmenter.onnx": _sha(root / "segmenter.onnx")},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture
def detect_bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "yolo-tiny")


@pytest.fixture
def segment_bundle(tmp_path: Path) -> Path:
    return write_binary_segment_bundle(tmp_path / "seg-tiny")


@pytest.fixture(scope="session")
def caption_bundle(tiny_caption_bundle: Path) -> Path:
    return tiny_caption_bundle


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """The shared photos' encoded bytes (JPEG and PNG), by file name."""
    folder = ASSETS / "images"
    if not (folder / "bus.jpg").is_file():
        pytest.skip(f"shared assets not found at {ASSETS} (set VLEXPORT_ASSETS)")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".png")}


def decoded(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


HERE = Path(__file__).resolve().parent
WEIGHTS = ASSETS / "weights" / "yolov8n_coco.pt"
PHOTOS = ("bus.jpg", "zidane.jpg")
#: Model names in the session's repository.
YOLO, DETR = "yolo", "detr"


def env_root() -> Path:
    return Path(os.environ.get("VLEXPORT_TEST_TRITON_ENV") or Path.home() / ".cache" / "vlexport" / "triton-env-tests")


@pytest.fixture(scope="session")
def server_env():
    """The server environment (built the first time: about a minute with a warm pip cache)."""
    from vlexport.serve import env as env_mod

    if not Path(env_mod.BASE_PYTHON).is_file():
        pytest.skip(f"{env_mod.BASE_PYTHON} not found (the Python-backend stub needs it)")
    old = os.environ.get("VLEXPORT_TRITON_ENV")
    os.environ["VLEXPORT_TRITON_ENV"] = str(env_root())
    try:
        t0 = time.monotonic()
        env = env_mod.ensure_server_env(progress=print)
        print(f"server env ready in {time.monotonic() - t0:.1f} s: {env.root}")
        yield env
    finally:
        if old is None:
            os.environ.pop("VLEXPORT_TRITON_ENV", None)
        else:
            os.environ["VLEXPORT_TRITON_ENV"] = old


@pytest.fixture(scope="session")
def yolo_bundle(tmp_path_factory) -> Path:
    """The shared YOLOv8n (COCO) exported to a bundle, once per session."""
    if not WEIGHTS.is_file():
        pytest.skip(f"shared assets not found at {ASSETS} (set VLEXPORT_ASSETS)")
    pytest.importorskip("ultralytics")
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    out = tmp_path_factory.mktemp("yolo") / "b"
    export_yolo(YoloExportOptions(checkpoint=WEIGHTS, out=out, trust_checkpoint=True, parity_count=1))
    return out


@pytest.fixture(scope="session")
def detr_bundle(tmp_path_factory) -> Path:
    """A tiny DETR (random weights, sharpened classes so that it detects) at short side 256."""
    torch = pytest.importorskip("torch")
    from vlexport.export.detr import DETRExportOptions, export_detr
    from vlexport.models.detr.model import build_detr

    torch.manual_seed(1)
    model = build_detr("tiny").eval()
    detr = model.detr if hasattr(model, "detr") else model
    with torch.no_grad():
        detr.class_embed.weight.mul_(20)
    tmp = tmp_path_factory.mktemp("detr")
    import argparse

    args = argparse.Namespace(lr=1e-4, backbone="resnet18", dilation=False, position_embedding="sine", enc_layers=2,
                              dec_layers=2, dim_feedforward=128, hidden_dim=64, dropout=0.1, nheads=4, num_queries=10,
                              pre_norm=False, masks=False, aux_loss=True, dataset_file="coco")
    ckpt = tmp / "detr-tiny.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 1}, ckpt)
    out = tmp / "b"
    export_detr(DETRExportOptions(out=out, checkpoint=ckpt, size=256, max_size=400, score_threshold=0.3))
    return out


def write_repo(bundles: dict[str, Path], out: Path, **options) -> Path:
    """A python-layout repository of ``bundles`` (name -> bundle) written by the project's writer."""
    from vlexport.serve.repository import write_repository

    write_repository(list(bundles.values()), out, layout="python", names=list(bundles), **options)
    return out


@pytest.fixture(scope="session")
def repo(tmp_path_factory, yolo_bundle, detr_bundle) -> Path:
    return write_repo({YOLO: yolo_bundle, DETR: detr_bundle}, tmp_path_factory.mktemp("repo") / "models")


@pytest.fixture(scope="session")
def server(server_env, repo, tmp_path_factory):
    """A TritonServer on 127.0.0.1 serving ``repo``; stopped by its PID in teardown, no shm file left."""
    from vlexport.serve.server import TritonServer, shm_regions

    before = shm_regions()
    srv = TritonServer(repo, env=server_env, log_path=tmp_path_factory.mktemp("triton") / "server.log")
    srv.start()
    pid = srv.pid
    try:
        yield srv
    finally:
        srv.stop()
        assert not _alive(pid), f"tritonserver {pid} still running"
        left = shm_regions() - before
        assert not left, f"shared-memory files left: {sorted(map(str, left))}"


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; /proc says which.
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


@pytest.fixture(scope="session")
def photo_paths() -> dict[str, Path]:
    if not (ASSETS / "images" / "bus.jpg").is_file():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return {n: ASSETS / "images" / n for n in PHOTOS}
