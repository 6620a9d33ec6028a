"""`vlexport bench`: real measurements on a tiny exported bundle, its outputs, and the bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from vlexport.bench import BenchOptions, latency_stats, run_bench
from vlexport.cli import cli

pytest.importorskip("torch")


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


def _ordered(stats: dict) -> None:
    assert 0 < stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"], stats
    assert stats["min"] <= stats["mean"]


def test_latency_stats_hand_solved():
    # 1..100 ms: linear interpolation puts p50 at 50.5, p90 at 90.1 and p99 at 99.01.
    s = latency_stats(list(range(100, 0, -1)))
    assert s == {"p50": 50.5, "p90": 90.1, "p99": 99.01, "mean": 50.5, "min": 1.0, "runs": 100}
    assert latency_stats([3.0])["p99"] == 3.0
    with pytest.raises(ValueError):
        latency_stats([])


def test_bench_tiny_bundle_on_video(tiny_bundle, assets, tmp_path):
    video = assets / "video" / "car-detection.mp4"
    out = tmp_path / "res" / "tiny.json"
    r = invoke("bench", tiny_bundle, "--source", video, "--max-frames", "20", "--runs", "5", "--warmup", "2",
               "--threads", "1", "--json", out)
    assert r.exit_code == 0, r.output
    print(r.output)  # the table, for the record (pytest -s)
    data = json.loads(out.read_text())
    assert data["schema"] == "vlexport.bench/1" and data["part"] == "detector" and data["family"] == "kdeov"
    first = cv2.VideoCapture(str(video)).read()[1]
    assert (data["frame"]["height"], data["frame"]["width"]) == first.shape[:2]

    ort = {r["precision"]: r for r in data["rows"] if r["runner"] == "onnxruntime"}
    assert set(ort) == {"fp32", "fp16"}
    for row in ort.values():
        assert row["device"] == "CPUExecutionProvider" and row["part"] == "detector"
        lat, e2e = row["latency"]["latency_ms"], row["end_to_end"]["latency_ms"]
        _ordered(lat)
        _ordered(e2e)
        assert lat["runs"] == e2e["runs"] == 5
        # Throughput is frames over the wall time of the timed runs: at most 1000 / the fastest run.
        assert 0 < row["latency"]["per_s"] <= 1000.0 / lat["min"] * 1.001
        assert row["batched"] is None  # the tiny bundle has a fixed batch of 1
        stages = row["end_to_end_stages_ms"]
        assert set(stages) == {"preprocess", "infer", "postprocess"} and all(v > 0 for v in stages.values())
        # The end-to-end runs include the stages the task timed.
        assert e2e["mean"] >= 0.95 * sum(stages.values())

    eager = [r for r in data["rows"] if r["runner"] == "pytorch"]
    assert len(eager) == 1 and eager[0]["device"] == "cpu" and eager[0]["threads"] == 1
    _ordered(eager[0]["latency"]["latency_ms"])

    video_run = data["video"]
    assert video_run["frames"] == 20 and video_run["fps"] > 0
    assert video_run["fps"] == pytest.approx(20 / video_run["seconds"], rel=0.01)
    assert {"preprocess", "infer", "postprocess"} <= set(video_run["latency_ms"])
    for p in video_run["latency_ms"].values():
        assert p["p50"] <= p["p90"] <= p["p99"]

    png = out.with_suffix(".png")  # default: beside the JSON
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left

    table = r.output
    assert "onnxruntime  CPU" in table and "pytorch" in table and "FPS" in table
    assert f"wrote {out}" in table and f"wrote {png}" in table


def test_bench_restricted_synthetic_no_torch(tiny_bundle, tmp_path):
    out = tmp_path / "b.json"
    png = tmp_path / "chart.png"
    r = invoke("bench", tiny_bundle, "--precision", "fp16", "--backend", "onnxruntime", "--runs", "3",
               "--warmup", "0", "--no-torch", "--json", out, "--png", png)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    runtime_rows = [r for r in data["rows"] if r["runner"] != "pytorch"]
    assert [(r["runner"], r["precision"]) for r in runtime_rows] == [("onnxruntime", "fp16")]
    assert [r["note"] for r in data["rows"] if r["runner"] == "pytorch"] == ["skipped (--no-torch)"]
    assert data["video"] is None and data["frame"]["source"] == "synthetic"
    assert cv2.imread(str(png)) is not None


def test_bench_dynamic_batch_throughput(tmp_path):
    from vlexport.export.kdeov import KDEOVExportOptions, export_kdeov

    bundle = tmp_path / "dyn"
    export_kdeov(KDEOVExportOptions(out=bundle, preset="tiny", classes=["person", "car"], templates="single",
                                    dynamic_batch=True))
    report = run_bench(bundle, BenchOptions(runs=3, warmup=1, batch=4, threads=1))
    rows = {r.runner: r for r in report.rows}
    for runner in ("onnxruntime", "pytorch"):
        row = rows[runner]
        assert row.batch == 4 and row.batched is not None and row.batched.per_s > 0
        _ordered(row.batched.latency_ms)
        # Four frames per run: frames/s is 4 runs-worth over the timed wall time.
        assert row.batched.per_s <= 4 * 1000.0 / row.batched.latency_ms["min"] * 1.001
    assert "batch 4" in report.table()


def test_bench_without_torch_and_matplotlib(tiny_bundle, tmp_path):
    # A fresh interpreter where neither can be imported: the table says so, no PNG, exit 0.
    out = tmp_path / "b.json"
    code = ("import sys; sys.modules['torch'] = None; sys.modules['matplotlib'] = None\n"
            "from vlexport.cli import main; sys.argv = ['vlexport'] + sys.argv[1:]; main()")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "bench", str(tiny_bundle), "--runs", "2", "--warmup", "0",
                           "--precision", "fp32", "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch is not installed" in proc.stdout
    assert "matplotlib is not installed" in proc.stdout
    assert not out.with_suffix(".png").exists()
    rows = json.loads(out.read_text())["rows"]
    assert rows[-1]["runner"] == "pytorch" and rows[-1]["latency"] is None


def test_bench_bad_inputs(tiny_bundle, tmp_path):
    out = tmp_path / "never.json"
    assert_one_line_error(invoke("bench", tmp_path / "missing", "--json", out), "bundle not found")
    assert_one_line_error(invoke("bench", tiny_bundle, "--source", tmp_path / "nope.mp4", "--json", out),
                          "nope.mp4")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert_one_line_error(invoke("bench", tiny_bundle, "--source", broken, "--json", out), "broken.mp4")
    assert_one_line_error(invoke("bench", tiny_bundle, "--precision", "fp8", "--json", out), "fp8")
    assert_one_line_error(invoke("bench", tiny_bundle, "--precision", "int8", "--json", out), "int8", "fp32, fp16")
    assert_one_line_error(invoke("bench", tiny_bundle, "--backend", "cuda", "--json", out), "cuda")
    assert_one_line_error(invoke("bench", tiny_bundle, "--batch", "8", "--json", out), "fixed batch of 1")
    assert_one_line_error(invoke("bench", tiny_bundle, "--runs", "0", "--json", out), "--runs")
    assert_one_line_error(invoke("bench", tiny_bundle, "--json", tmp_path), "is a folder")
    assert not out.exists()


def test_bench_help_has_examples():
    r = invoke("bench", "--help")
    assert r.exit_code == 0 and "vlexport bench bundles/" in r.output and "--max-frames" in r.output


def test_synthetic_frame_is_deterministic():
    from vlexport.bench import synthetic_frame

    a, b = synthetic_frame(), synthetic_frame()
    assert a.shape == (480, 640, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, synthetic_frame(seed=1))
