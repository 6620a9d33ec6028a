"""A real Triton server (from the nvidia-pytriton wheel) on 127.0.0.1, for the whole session.

The server's environment (its own venv, numpy<2) is built once and kept across runs in a fixed
folder: ``$VLEXPORT_TEST_TRITON_ENV``, else ``~/.cache/vlexport/triton-env-tests`` (the session's
isolated ``VLEXPORT_CACHE`` would rebuild it every run). The repository is written with
:func:`vlexport.serve.repository.write_repository` when it exists, else with the minimal model in
``minimal_model.py`` (same tensor names). Teardown stops the server by its PID and checks that
no process and no shared-memory file is left.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

HERE = Path(__file__).resolve().parent
ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", HERE.parents[2] / "shared" / "assets"))
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


def write_minimal_repository(bundles: dict[str, Path], out: Path, max_batch_size: int = 8,
                             max_queue_delay_us: int = 2000, instances: int = 1) -> Path:
    """A python-layout repository of the minimal model: ``out/<name>/{config.pbtxt,1/model.py,1/bundle}``."""
    from vlexport.runtime.bundle import Bundle

    outputs = {
        "detect": [("BOXES", "TYPE_FP32", "[-1, 4]"), ("SCORES", "TYPE_FP32", "[-1]"),
                   ("LABELS", "TYPE_INT32", "[-1]"), ("CLASS_NAMES", "TYPE_STRING", "[-1]")],
        "segment": [("LABEL_MAP", "TYPE_INT32", "[-1, -1]")],
        "caption": [("CAPTION", "TYPE_STRING", "[1]")],
    }
    for name, path in bundles.items():
        task = Bundle.open(path).task
        outs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in outputs[task])
        config = f'''name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [1] optional: true }},
  {{ name: "IMAGE_BGR" data_type: TYPE_UINT8 dims: [-1, -1, 3] optional: true }}
]
output [
{outs}
]
dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "vlexport_task" value {{ string_value: "{task}" }} }}
'''
        version = out / name / "1"
        version.mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(config)
        shutil.copy(HERE / "minimal_model.py", version / "model.py")
        shutil.copytree(path, version / "bundle")
    return out


def write_repo(bundles: dict[str, Path], out: Path, **options) -> Path:
    """The project's writer (vlexport.serve.repository) when it is there, else the minimal model's."""
    import importlib.util

    # Looked up by name: the writer comes from a branch of its own; until it is merged the minimal
    # model stands in (same contract).
    if importlib.util.find_spec("vlexport.serve.repository") is None:
        return write_minimal_repository(bundles, out, **options)
    write_repository = importlib.import_module("vlexport.serve.repository").write_repository
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
def photos() -> dict[str, Path]:
    if not (ASSETS / "images" / "bus.jpg").is_file():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return {n: ASSETS / "images" / n for n in PHOTOS}
