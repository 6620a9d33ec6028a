"""INT8 export with calibration provenance and the accuracy gate, on the real YOLOv8n and COCO128."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("ultralytics")

from vlexport.calibration.search import search_schedule  # noqa: E402
from vlexport.cli import cli  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


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


def test_cpu_target_search_records_measured_points(tmp_path, assets):
    """The search measures latency and mAP of each point it explores, and keeps the fastest within budget."""
    out = tmp_path / "b"
    r = invoke("yolo", "--checkpoint", assets / "weights" / "yolov8n_coco.pt", "--trust-checkpoint", "--imgsz", "320",
               "--out", out, "--int8", "--int8-target", "cpu", "--calib", assets / "coco128" / "images" / "train2017",
               "--calib-size", "8", "--calib-method", "auto", "--val", assets / "coco128" / "data.yaml",
               "--max-drop", "0")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    ranges = m["calibration"]["ranges"]["detector"]
    assert ranges["method"] == "auto" and sum(ranges["by_candidate"].values()) == ranges["tensors"] > 100
    assert ranges["tied_to_concat_scale"] > 0
    g = m["validation"]["gate"]
    rounds = g["rounds"]
    assert g["target"] == "cpu" and g["search"]["metric"] == "map50_95" and len(g["search"]["order"]) > 20
    assert [p["round"] for p in rounds] == list(range(len(rounds)))
    fp32 = m["validation"]["metrics"]["fp32"]["map50_95"]
    for p in rounds:
        assert p["latency_measured"] and 0 < p["latency_ratio"] < 5 and p["fp32_metric"] == pytest.approx(fp32, abs=1e-4)
        assert p["drop_points"] == pytest.approx(100 * (p["fp32_metric"] - p["int8_metric"]))
        assert p["passed"] == (p["drop_points"] <= 0)
    # The points after round 0 follow the schedule, driven by what each point measured: doubling
    # then bisecting when INT8 misses the budget, else the free and not-slower prefixes.
    later = [p["excluded_groups"] for p in rounds[1:]]
    if rounds[0]["passed"]:
        expected = list(dict.fromkeys(k for k in (g["search"]["free_layers"], g["search"]["not_slower_layers"]) if k))
    else:
        measured = {p["excluded_groups"]: p["passed"] for p in rounds[1:]}
        expected = search_schedule(len(g["search"]["order"]), lambda k: measured[k], 7)
        assert later[0] == 1
    assert later == expected
    assert all(p["excluded_nodes"] >= p["excluded_groups"] for p in rounds)
    chosen = [p for p in rounds if p.get("chosen")]
    if "int8" in m["parts"]["detector"]["files"]:
        assert len(chosen) == 1 and chosen[0]["passed"]
        within = [p for p in rounds if p["passed"]]
        if len(within) > 1:  # the finalists were timed again side by side; that ratio decides
            assert all(0 < p["paired_latency_ratio"] < 5 for p in within)
            assert not any("paired_latency_ratio" in p for p in rounds if not p["passed"])
            assert chosen[0]["paired_latency_ratio"] == min(p["paired_latency_ratio"] for p in within)
            assert "side by side" in g["search"]["final_timing"]
        else:
            assert chosen[0]["latency_ratio"] == min(p["latency_ratio"] for p in within)
        assert len(m["calibration"]["excluded_nodes"]["detector"]) == chosen[0]["excluded_nodes"]
    else:  # no point within a zero budget: refused, with every explored point on record
        assert not chosen and "search round" in m["validation"]["refused"]["detector/int8"]


def test_sclip_gate_measures_miou(tmp_path, assets):
    out = tmp_path / "b"
    r = invoke("sclip", "--preset", "tiny", "--classes", "aeroplane,bird,cow", "--templates", "single", "--int8",
               "--calib", assets / "images", "--calib-size", "3", "--val", assets / "voc", "--max-drop", "100",
               "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    g = m["validation"]["gate"]
    assert g["rounds"][0]["metric"] == "miou" and g["rounds"][0]["passed"]
    metrics = m["validation"]["metrics"]
    assert set(metrics) == {"fp32", "int8"} and 0 <= metrics["int8"]["miou"] <= 1
    assert g["rounds"][0]["int8_metric"] == pytest.approx(metrics["int8"]["miou"], abs=1e-4)  # to_dict rounds


def test_multiscale_gate_measures_foreground_iou(tmp_path, assets):
    out = tmp_path / "b"
    r = invoke("multiscale", "--preset", "tiny", "--imgsz", "128", "--class-name", "person", "--int8",
               "--calib", assets / "images", "--calib-size", "3", "--val", assets / "voc", "--max-drop", "100",
               "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    first = m["validation"]["gate"]["rounds"][0]
    assert first["metric"] == "iou" and first["passed"] and 0 <= first["int8_metric"] <= 1
    assert m["validation"]["metrics"]["fp32"]["images"] == 7  # the VOC pairs, none used for calibration


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


def test_cpu_target_int8_takes_uint8_pixels_end_to_end(tmp_path, assets):
    """The cpu target's INT8 detector takes the letterboxed pixels as uint8; the runtime feeds them
    directly, and gives the same detections as the float tensor quantised by the backend."""
    import cv2
    import numpy as np

    from vlexport import runtime
    from vlexport.runtime.backends.onnxruntime import OrtBackend

    out = tmp_path / "b"
    r = invoke("yolo", "--checkpoint", assets / "weights" / "yolov8n_coco.pt", "--trust-checkpoint", "--imgsz", "320",
               "--out", out, "--int8", "--int8-target", "cpu", "--calib", assets / "coco128" / "images" / "train2017",
               "--calib-size", "4", "--calib-method", "minmax")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"]["pixel_inputs"] == {"detector": {"images": {"scale": pytest.approx(1 / 255), "zero_point": 0}}}
    graph = onnx.load(str(out / "detector.int8.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    shown = invoke("inspect", out)
    assert shown.exit_code == 0 and "takes images as uint8 pixels (scale 0.00392157)" in shown.output
    assert onnx.load(str(out / "detector.onnx")).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    frames = [cv2.imread(str(assets / "images" / n)) for n in ("bus.jpg", "zidane.jpg")]
    task = runtime.load(out, precision="int8", backend="onnxruntime", score_threshold=0.25)
    floats = runtime.load(out, precision="fp32", backend="onnxruntime")
    try:
        assert task.preprocessor.dtype is np.uint8 and floats.preprocessor.dtype is np.float32
        with OrtBackend(out / "detector.int8.onnx", providers=["CPUExecutionProvider"]) as backend:
            for frame in frames:
                pixels = task.preprocessor(frame)[0]
                tensor = floats.preprocessor(frame)[0]
                direct, quantised = backend.infer({"images": pixels}), backend.infer({"images": tensor})
                assert direct.keys() == quantised.keys()
                for k in direct:
                    np.testing.assert_array_equal(direct[k], quantised[k])
        found, reference = task.detect(frames[0]), floats.detect(frames[0])
        assert "person" in found.labels and "person" in reference.labels
        expected, classes = task.detect_batch(frames), task.classes
    finally:
        task.close()
        floats.close()
    # Served as a Triton ensemble, the preprocessing stage emits the pixels the part model takes.
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from vlexport.serve.repository import write_repository
    from vlexport.serve.stage_model import Stages, open_stage_bundle

    repo = write_repository([out], tmp_path / "repo", layout="ensemble", names=["m"], precision="int8").root
    part_config = (repo / "m_detector" / "config.pbtxt").read_text()
    assert "TYPE_UINT8" in part_config and "detector.int8.onnx" in part_config
    assert '"pixels"' in (repo / "m_preprocess" / "config.pbtxt").read_text()
    pre = Stages(open_stage_bundle(repo / "m_preprocess" / "1" / "bundle"), "detector", pixels=True)
    post = Stages(open_stage_bundle(repo / "m_postprocess" / "1" / "bundle"), "detector")
    import onnxruntime as ort

    from vlexport.serve import contract

    session = ort.InferenceSession(str(repo / "m_detector" / "1" / "detector.int8.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for frame, want in zip(frames, expected):  # the exported graph's batch is 1
        feeds = pre.preprocess([frame])
        geometry = feeds.pop("GEOMETRY")
        assert feeds["images"].dtype == np.uint8
        arrays = post.postprocess(dict(zip(names, session.run(names, feeds))), geometry)
        [got] = contract.results_from_outputs("detect", arrays, classes=classes)
        assert got.records() == want.records()
