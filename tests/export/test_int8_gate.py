"""INT8 export with calibration provenance and the accuracy gate, on the real YOLOv8n and COCO128."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

pytest.importorskip("ultralytics")

from vlexport.calibration.gate import head_nodes  # noqa: E402
from vlexport.cli import cli  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_head_nodes_are_the_output_specific_branches(tmp_path):
    # x → trunk → (box_conv → boxes), (cls_conv → scores): the trunk reaches both outputs.
    def conv(name, i, o, w):
        return helper.make_node("Conv", [i, w], [o], name=name)

    w = [helper.make_tensor(n, TensorProto.FLOAT, [1, 1, 1, 1], [1.0]) for n in ("w0", "w1", "w2")]
    g = helper.make_graph(
        [conv("trunk", "x", "t", "w0"), conv("box_conv", "t", "boxes", "w1"), conv("cls_conv", "t", "scores", "w2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)], w)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    assert head_nodes(path, ["trunk", "box_conv", "cls_conv"]) == ["box_conv", "cls_conv"]


def test_int8_export_records_provenance_and_passes_the_gate(tmp_path, assets):
    out = tmp_path / "b"
    calib = assets / "coco128" / "images" / "train2017"
    r = invoke("yolo", "--checkpoint", assets / "weights" / "yolov8n_coco.pt", "--trust-checkpoint", "--imgsz", "320",
               "--out", out, "--int8", "--calib", calib, "--calib-size", "8", "--calib-method", "minmax",
               "--val", assets / "coco128" / "data.yaml", "--max-drop", "100")
    assert r.exit_code == 0, r.output
    assert "mAP50-95" in r.output and "int8" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["parts"]["detector"]["files"]["int8"] == "detector.int8.onnx"
    c = m["calibration"]
    assert (c["method"], c["count"], c["seed"], c["target"]) == ("minmax", 8, 0, "tensorrt")
    assert c["source"] == str(calib) and len(c["sha256"]) == 64
    assert c["excluded_nodes"] == {"detector": []}  # within budget at round 0
    metrics = m["validation"]["metrics"]
    assert set(metrics) == {"fp32", "int8"}
    assert metrics["fp32"]["images"] == metrics["int8"]["images"] == 120  # 128 minus the 8 calibration images
    assert metrics["fp32"]["map50_95"] > 0.2  # real COCO weights, even at 320
    g = m["validation"]["gate"]
    assert g["max_drop"] == 100 and g["rounds"][0]["excluded_nodes"] == 0
    q = onnx.load(str(out / "detector.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)


def _empty_folder(p):
    p.mkdir()
    return p


def _write(data: bytes):
    def make(p):
        p.write_bytes(data)
        return p
    return make


@pytest.mark.parametrize("name, make, needle", [
    ("empty", _empty_folder, "no images"),
    ("broken.mp4", _write(b"not a video"), "broken.mp4"),
    ("notes.txt", _write(b"hello"), "notes.txt"),
], ids=["empty-folder", "unreadable-video", "wrong-kind"])
def test_bad_calibration_sources(tmp_path, assets, name, make, needle):
    src = make(tmp_path / name)
    r = invoke("yolo", "--checkpoint", assets / "weights" / "yolov8n_coco.pt", "--trust-checkpoint", "--imgsz", "320",
               "--out", tmp_path / "b", "--int8", "--calib", src)
    assert r.exit_code == 1, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_exclusion_plan_grows_heads_first_then_the_rest():
    from vlexport.calibration.gate import exclusion_plan

    heads = [f"h{i}" for i in range(8)]
    rest = [f"r{i}" for i in range(40)]
    plan = exclusion_plan(heads, rest)
    assert plan[0] == heads[:2] and plan[1] == heads[:4] and plan[2] == heads
    assert plan[3] == heads + rest[:2] and plan[-1] == heads + rest[:14]
    assert all(len(a) < len(b) for a, b in zip(plan, plan[1:]))
    assert exclusion_plan([], ["a"]) == [["a"]]
    with_decoding = exclusion_plan(heads, rest, decoding=["h7", "h6"])
    assert with_decoding[0] == ["h7", "h6"] and with_decoding[1] == ["h7", "h6"] + ["h0", "h1", "h2", "h3"][:2]
    assert set(with_decoding[2]) == set(heads) and with_decoding[3] == with_decoding[2] + rest[:2]


def test_int8_the_gate_cannot_pass_is_refused_and_the_rest_written(tmp_path, assets):
    """Like any lower precision that fails its check: FP32 is written, INT8 left out with the reason."""
    from vlexport.export.bundle_export import PrecisionOptions
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    calib = assets / "coco128" / "images" / "train2017"
    prec = PrecisionOptions(int8=True, calib=str(calib), calib_size=1, calib_method="minmax",
                            val=str(assets / "coco128" / "data.yaml"), max_drop=0.0, max_gate_rounds=0)
    report = export_yolo(YoloExportOptions(checkpoint=assets / "weights" / "yolov8n_coco.pt", trust_checkpoint=True,
                                           imgsz=160, out=tmp_path / "b", precision=prec))
    assert report.gate[0]["drop_points"] > 0  # one calibration image at 160 px: INT8 loses accuracy
    m = json.loads((report.path / "manifest.json").read_text())
    assert m["parts"]["detector"]["files"] == {"fp32": "detector.onnx"}
    assert not (report.path / "detector.int8.onnx").exists()
    assert "points of mAP50-95 below FP32" in m["validation"]["refused"]["detector/int8"]
    assert m["validation"]["gate"]["rounds"] == report.gate and "int8" in m["validation"]["metrics"]
    from vlexport.errors import ExportError

    prec.strict = True
    with pytest.raises(ExportError, match="below FP32"):
        export_yolo(YoloExportOptions(checkpoint=assets / "weights" / "yolov8n_coco.pt", trust_checkpoint=True,
                                      imgsz=160, out=tmp_path / "strict", precision=prec))
    assert not (tmp_path / "strict").exists()
