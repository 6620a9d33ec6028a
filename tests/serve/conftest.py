"""Fixtures of the serving tests: real bundles (the runtime tests' tiny detector, a tiny binary
segmenter, the exported tiny captioner, the shared YOLOv8n, a tiny DETR), the shared photos, and a
real Triton server (from the nvidia-pytriton wheel) on 127.0.0.1 for the whole session.

The server's environment (its own venv, numpy<2) is built once and kept across runs in a fixed
folder: ``$VLEXPORT_TEST_TRITON_ENV``, else ``~/.cache/vlexport/triton-env-tests`` (the session's
isolated ``VLEXPORT_CACHE`` would rebuild it every run). Teardown stops the server by its PID and
checks that no process and no shared-memory file is left.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("onnx")

pytest.importorskip("tritonclient.grpc.model_config_pb2")
pytest.importorskip("tritonclient.http")

from serve_helpers import (ASSETS, WEIGHTS, PHOTOS, YOLO, DETR, _alive, env_root,  # noqa: E402
                           write_binary_segment_bundle, write_bundle, write_repo)


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


@pytest.fixture(scope="session")
def photo_paths() -> dict[str, Path]:
    if not (ASSETS / "images" / "bus.jpg").is_file():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return {n: ASSETS / "images" / n for n in PHOTOS}
