"""The client side: `vlexport run --server` equals a local run; `vlexport serve` starts and stops cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from serve_helpers import ASSETS, YOLO, _alive, write_repo
from vlexport.cli import cli
from vlexport.errors import UsageError
from vlexport.runtime.run import RunRequest, run_bundles
from vlexport.serve.client import RemoteError, RemoteTask

VIDEO = ASSETS / "video" / "bottle-detection.mp4"  # bottles from the first frame (the cars come later)
FRAMES = 6
_TIMES = ("t_monotonic", "t_wall")


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for k in _TIMES:
            rec.pop(k)
        out.append(rec)
    return out


def _close_boxes(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        da, db = ra.pop("detections"), rb.pop("detections")
        assert ra == rb
        assert [d["label"] for d in da] == [d["label"] for d in db]
        assert [d["class_id"] for d in da] == [d["class_id"] for d in db]
        for x, y in zip(da, db):  # JSON boxes are rounded to 0.01 px: equal up to one rounding step
            assert np.abs(np.subtract(x["box"], y["box"])).max() <= 0.0100001
            assert abs(x["score"] - y["score"]) <= 1e-4


def test_run_with_a_server_gives_the_local_records_and_a_network_stage(server, yolo_bundle, tmp_path):
    if not VIDEO.is_file():
        pytest.skip(f"no {VIDEO}")
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    run_bundles(RunRequest(source=VIDEO, bundle=yolo_bundle, jsonl=local, max_frames=FRAMES, progress=False))
    stats_json = tmp_path / "stats.json"
    r = CliRunner().invoke(cli, ["run", "--server", server.http_url, "--model", YOLO, "--source", str(VIDEO),
                                 "--jsonl", str(remote), "--save", str(tmp_path / "remote.mp4"),
                                 "--stats-json", str(stats_json), "--max-frames", str(FRAMES), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "network" in r.output
    a, b = _records(local), _records(remote)
    assert len(a) == FRAMES and sum(len(x["detections"]) for x in a) > 0
    _close_boxes(a, b)
    stats = json.loads(stats_json.read_text())
    assert stats["frames_processed"] == FRAMES
    assert stats["latency_ms"]["network"]["p50"] > 0
    assert (tmp_path / "remote.mp4").stat().st_size > 0


def test_grpc_run_through_the_library(server, yolo_bundle, tmp_path):
    if not VIDEO.is_file():
        pytest.skip(f"no {VIDEO}")
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    run_bundles(RunRequest(source=VIDEO, bundle=yolo_bundle, jsonl=local, max_frames=3, progress=False))
    stats = run_bundles(RunRequest(source=VIDEO, server=server.grpc_url, model=YOLO, protocol="grpc", jsonl=remote,
                                   max_frames=3, progress=False))
    assert "network" in stats.latency_ms
    _close_boxes(_records(local), _records(remote))


def test_the_task_comes_from_the_parameter_or_the_outputs(server):
    task = RemoteTask(server.http_url, YOLO)
    assert task.task_name == "detect" and callable(task.detect)
    assert not hasattr(task, "caption") and not hasattr(task, "segment")
    config = dict(task.config)
    config.pop("parameters", None)  # a model written without the vlexport_task parameter
    assert task._find_task(config) == "detect"
    config["output"] = [{"name": "LOGITS"}]
    with pytest.raises(RemoteError, match="not a vlexport model"):
        task._find_task(config)
    task.close()


def test_client_errors_are_one_line(server):
    with pytest.raises(RemoteError, match="not ready|unknown model|not found"):
        RemoteTask(server.http_url, "no-such-model")
    with pytest.raises(UsageError, match="protocol"):
        RemoteTask(server.http_url, YOLO, "carrier-pigeon")
    with pytest.raises(UsageError, match="--server and --model"):
        RunRequest(source=VIDEO, server=server.http_url).plan()


def _start_serve(repo: Path, server_env, stderr: int) -> subprocess.Popen:
    """`vlexport serve REPO` in a subprocess on free ports, with this tree's vlexport and the test server env."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               VLEXPORT_TRITON_ENV=str(server_env.root))
    return subprocess.Popen([sys.executable, "-c", "from vlexport.cli import main; main()", "serve", str(repo),
                             "--http-port", "0", "--grpc-port", "0"], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env)


def test_serve_command_starts_answers_and_stops_on_ctrl_c(server_env, yolo_bundle, tmp_path):
    from vlexport.serve.server import shm_regions

    repo = write_repo({YOLO: yolo_bundle}, tmp_path / "repo")
    before = shm_regions()
    proc = _start_serve(repo, server_env, stderr=subprocess.PIPE)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("model"):
                break
        out = "".join(lines)
        assert re.search(r"^model\s+yolo v1: READY", out, re.M), out + proc.stderr.read() if proc.poll() else out
        http = re.search(r"^http\s+(\S+)", out, re.M).group(1)
        assert http.startswith("127.0.0.1:")
        server_pids = _children(proc.pid)
        assert server_pids, "no tritonserver child process"
        task = RemoteTask(http, YOLO)
        assert task.task_name == "detect"
        task.close()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
        assert rc == 130, err
        assert "interrupted" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in server_pids:
        assert not _alive(pid), f"process {pid} left running"
    assert not (shm_regions() - before), "shared-memory files left"


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


def test_jpeg_encoded_frames_give_nearly_the_same_detections(server, photo_paths):
    import cv2

    bgr = cv2.imread(str(photo_paths["bus.jpg"]))
    exact = RemoteTask(server.http_url, YOLO).detect(bgr)
    jpeg = RemoteTask(server.http_url, YOLO, encoding="jpeg", jpeg_quality=95)
    dets = jpeg.detect(bgr)
    assert sorted(dets.labels) == sorted(exact.labels) and "bus" in dets.labels
    assert jpeg.timings["preprocess"] > 0  # the encoding, on this side


def test_a_killed_serve_command_takes_its_server_with_it(server_env, yolo_bundle, tmp_path):
    """SIGKILL gives `vlexport serve` no chance to stop Triton: the parent-death signal does it."""
    from vlexport.serve.server import shm_regions

    repo = write_repo({YOLO: yolo_bundle}, tmp_path / "repo")
    before = shm_regions()
    proc = _start_serve(repo, server_env, stderr=subprocess.DEVNULL)
    server_pids: list[int] = []
    try:
        for line in proc.stdout:
            if line.startswith("model"):
                break
        server_pids = _children(proc.pid)
        assert server_pids, "no tritonserver child process"
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in server_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in server_pids), "tritonserver outlived the killed `vlexport serve`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in server_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for leftover in shm_regions() - before:  # a server stopped by SIGTERM alone may leave its regions
            leftover.unlink(missing_ok=True)
