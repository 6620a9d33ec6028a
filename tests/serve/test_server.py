"""A real Triton server serving YOLOv8n and a tiny DETR gives exactly what the in-process runtime gives.

HTTP and gRPC, encoded JPEG bytes (``IMAGE``) and raw BGR (``IMAGE_BGR``), on the shared photos;
bad requests get a clear error and the server keeps serving; dynamic batching forms batches.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from serve_helpers import DETR, YOLO
from vlexport.runtime import load
from vlexport.serve.client import RemoteError, RemoteTask
from vlexport.serve.contract import result_from_outputs

PROTOCOLS = ("http", "grpc")


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.fixture(scope="module")
def local(yolo_bundle, detr_bundle):
    tasks = {YOLO: load(yolo_bundle), DETR: load(detr_bundle)}
    yield tasks
    for t in tasks.values():
        t.close()


def _same(remote, local_dets) -> None:
    assert remote.labels == local_dets.labels
    np.testing.assert_array_equal(remote.class_ids, local_dets.class_ids)
    assert remote.boxes.shape == local_dets.boxes.shape
    if len(local_dets):
        assert np.abs(remote.boxes - local_dets.boxes).max() <= 1e-4
        assert np.abs(remote.scores - local_dets.scores).max() <= 1e-5


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", [YOLO, DETR])
def test_served_detections_equal_the_runtime(server, local, photo_paths, protocol, model):
    remote = RemoteTask(_url(server, protocol), model, protocol)
    assert remote.task_name == "detect"
    found = 0
    for name, path in photo_paths.items():
        bgr = cv2.imread(str(path))
        want = local[model].detect(bgr)
        found += len(want)
        # raw pixels
        _same(remote.detect(bgr), want)
        assert remote.timings["network"] > 0
        # the photo file's own JPEG bytes, decoded by the server
        blob = np.array([[path.read_bytes()]], dtype=np.object_)
        arrays = remote.infer_arrays({"IMAGE": (blob, "BYTES")})
        _same(result_from_outputs("detect", arrays), want)
    assert found > 0, "the photos should give detections to compare"
    if model == YOLO:
        assert "bus" in local[YOLO].detect(cv2.imread(str(photo_paths["bus.jpg"]))).labels
    remote.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(server, photo_paths, protocol):
    remote = RemoteTask(_url(server, protocol), YOLO, protocol)
    bgr = cv2.imread(str(photo_paths["zidane.jpg"]))
    cases = {
        "wrong dtype": ({"IMAGE_BGR": (bgr[None].astype(np.float32), "FP32")}, ("IMAGE_BGR", "FP32")),
        "wrong shape": ({"IMAGE_BGR": (np.zeros((1, 8, 8, 4), np.uint8), "UINT8")}, ("IMAGE_BGR", "shape")),
        "corrupt JPEG": ({"IMAGE": (np.array([[b"\xff\xd8\xff\xe0 not a jpeg"]], np.object_), "BYTES")},
                         ("IMAGE 0", "cannot decode")),
        "empty bytes": ({"IMAGE": (np.array([[b""]], np.object_), "BYTES")}, ("IMAGE 0", "empty")),
        "no input": ({}, ("0 inputs",)),  # refused by Triton itself, before the model
    }
    for what, (inputs, needles) in cases.items():
        with pytest.raises(RemoteError) as e:
            remote.infer_arrays(inputs)
        msg = str(e.value)
        assert "\n" not in msg, what
        for needle in needles:
            assert needle.lower() in msg.lower(), f"{what}: {msg}"
        # ...and the next good request is served
        assert len(remote.detect(bgr)) > 0, what
    remote.close()


def test_dynamic_batching_forms_batches(server, photo_paths):
    remote = RemoteTask(server.grpc_url, YOLO, "grpc")
    before = _batch_sizes(remote.statistics())
    bgr = cv2.resize(cv2.imread(str(photo_paths["bus.jpg"])), (320, 416))  # one shape: batchable
    clients = [RemoteTask(server.grpc_url, YOLO, "grpc") for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: clients[i % 8].detect(bgr), range(48)))
    assert all(r.labels == results[0].labels for r in results)
    for _ in range(50):  # the last execution's figures land just after its responses
        after = _batch_sizes(remote.statistics())
        formed = {size: n - before.get(size, 0) for size, n in after.items() if n - before.get(size, 0) > 0}
        if sum(size * n for size, n in formed.items()) >= 48:
            break
        time.sleep(0.1)
    assert sum(size * n for size, n in formed.items()) == 48, formed
    assert max(formed) > 1, f"no batch larger than 1 formed: {formed}"
    for c in clients + [remote]:
        c.close()


def _batch_sizes(stats: dict) -> dict[int, int]:
    model = stats["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model.get("batch_stats", [])}


def test_a_model_that_fails_to_load_is_a_clear_error_and_nothing_is_left(server_env, tmp_path):
    from serve_helpers import _alive
    from vlexport.serve.server import ServerError, TritonServer, shm_regions

    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
                                        'input [{ name: "X" data_type: TYPE_FP32 dims: [1] }]\n'
                                        'output [{ name: "Y" data_type: TYPE_FP32 dims: [1] }]\n')
    (model / "1" / "model.py").write_text("class TritonPythonModel:\n    def initialize(self, args):\n"
                                          "        raise RuntimeError('this model refuses to load')\n")
    before = shm_regions()
    srv = TritonServer(tmp_path / "repo", env=server_env, log_path=tmp_path / "server.log", ready_timeout=60)
    with pytest.raises(ServerError) as e:
        srv.start()
    msg = str(e.value)
    assert "\n" not in msg and "failed to load 'broken'" in msg and "this model refuses to load" in msg, msg
    assert str(tmp_path / "server.log") in msg
    assert srv.pid is not None and srv.process is None and not _alive(srv.pid)
    assert not (shm_regions() - before)


def test_env_errors_name_the_problem(tmp_path, monkeypatch):
    import sys

    from vlexport.errors import DependencyError
    from vlexport.serve import env as env_mod

    log = tmp_path / "install.log"
    with pytest.raises(DependencyError, match=f"installing X failed \\(exit 3\\); see {log}"):
        env_mod._run_logged([sys.executable, "-c", "print('pip says no'); raise SystemExit(3)"], log, "installing X")
    assert "pip says no" in log.read_text()
    monkeypatch.setenv("VLEXPORT_TRITON_ENV", str(tmp_path / "env"))
    monkeypatch.setattr(env_mod, "BASE_PYTHON", str(tmp_path / "no-python3.11"))
    with pytest.raises(DependencyError, match="no-python3.11"):
        env_mod.ensure_server_env()
