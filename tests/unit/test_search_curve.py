"""The INT8 search's curve: a PNG of every explored point, and `vlexport inspect --plot`."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from vlexport.calibration.search_curve import label_offsets, plot_search
from vlexport.cli import cli
from vlexport.errors import UsageError

pytest.importorskip("matplotlib")

GATE = {"data": "coco128/data.yaml", "max_drop": 1.0, "target": "cpu", "rounds": [
    {"round": 0, "excluded_groups": 0, "excluded_nodes": 0, "latency_ratio": 0.46, "latency_measured": True,
     "metric": "map50_95", "int8_metric": 0.452, "fp32_metric": 0.47, "drop_points": 1.8, "passed": False},
    {"round": 1, "excluded_groups": 1, "excluded_nodes": 3, "latency_ratio": 0.47, "latency_measured": True,
     "metric": "map50_95", "int8_metric": 0.459, "fp32_metric": 0.47, "drop_points": 1.1, "passed": False},
    {"round": 2, "excluded_groups": 2, "excluded_nodes": 6, "latency_ratio": 0.49, "latency_measured": True,
     "metric": "map50_95", "int8_metric": 0.465, "fp32_metric": 0.47, "drop_points": 0.5, "passed": True,
     "chosen": True},
]}


def _png(path):
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] > 200 and img.shape[1] > 300
    return img


def test_curve_is_a_png_with_the_points(tmp_path):
    assert plot_search(GATE, tmp_path / "c.png")
    img = _png(tmp_path / "c.png")
    assert float(np.std(img)) > 5  # not a blank canvas
    old = {"max_drop": 1.0, "rounds": [{"round": 0, "excluded_nodes": 0, "int8_map50_95": 0.46, "drop_points": 0.4}]}
    assert plot_search(old, tmp_path / "old.png")  # bundles from before the search: by layers float
    _png(tmp_path / "old.png")
    with pytest.raises(UsageError, match="no INT8 precision search"):
        plot_search({}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_inspect_plot(tmp_path, tiny_bundle):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    r = CliRunner().invoke(cli, ["inspect", str(bundle), "--plot", str(tmp_path / "none.png")])
    assert r.exit_code == 1 and "no INT8 precision search" in r.output and "Traceback" not in r.output
    m = json.loads((bundle / "manifest.json").read_text())
    m.setdefault("validation", {})["gate"] = GATE
    (bundle / "manifest.json").write_text(json.dumps(m))
    r = CliRunner().invoke(cli, ["inspect", str(bundle), "--plot", str(tmp_path / "curve.png")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    _png(tmp_path / "curve.png")


def test_labels_of_close_points_are_stacked_not_overprinted():
    # Three points within a hundredth of each other and one far away (the shape of a YOLOv8n search).
    xs, ys = [0.426, 0.430, 0.433, 0.60], [46.0, 46.01, 46.02, 46.5]
    offsets = label_offsets(xs, ys)
    spots = [(dx, dy) for dx, dy, _ in offsets[:3]]
    assert len(set(spots)) == 3  # no two close labels in the same place
    assert [dy for _, dy, _ in offsets[:3]] == sorted(dy for _, dy, _ in offsets[:3])
    assert offsets[3][2] == "right" and offsets[3][0] < 0  # the rightmost label extends inwards
    assert offsets[0][2] == "left"
    far = label_offsets([0.40, 0.60], [44.0, 47.0])
    assert far[0][1] == far[1][1]  # distant points keep the default height
    assert label_offsets([], []) == []
    # The FP32 point at 1.0x widens the axes: the INT8 points are then not at its right edge.
    assert [ha for _, _, ha in label_offsets([0.40, 0.45], [46.0, 46.5], [(1.0, 47.0)])] == ["left", "left"]
