"""FP16 that fails its checks: the FP32 island search, and refusing a lower precision instead of the bundle.

The small model adds a large constant and takes it off again, ``(conv(x) + 10001) - 10000``: in FP16
the constant rounds to 10000 and the result loses its +1 (no activation comes near FP16's range, so
:func:`overflowing_nodes` keeps nothing). Keeping the Add and the Sub in FP32 fixes it; nothing less does.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from vlexport.errors import BundleError, ExportError
from vlexport.export.fp16 import overflowing_nodes
from vlexport.export.part import OutputTolerance, Part
from vlexport.export.bundle_export import ExportPlan, PrecisionOptions, write_bundle
from vlexport.export.samples import parity_batch
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.spec import PartSignature, TensorSpec

PRE = {"size": [32, 32], "resize": "letterbox", "pad_value": 114, "color": "RGB",
       "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]}


class Offset(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.register_buffer("up", torch.tensor(10001.0))
        self.register_buffer("down", torch.tensor(10000.0))

    def forward(self, x):
        return self.conv2((self.conv1(x) + self.up) - self.down)


def _plan(quantize: bool = False, int8_tol: OutputTolerance | None = None) -> ExportPlan:
    torch.manual_seed(0)
    images, source = parity_batch(PRE, None, 2)
    tolerances = {"fp32": {"out": OutputTolerance(max_abs=1e-3)}, "fp16": {"out": OutputTolerance(min_cosine=0.999)}}
    if int8_tol is not None:
        tolerances["int8"] = {"out": int8_tol}
    part = Part("net", Offset().eval(),
                PartSignature((TensorSpec("images", "float32", (1, 3, 32, 32)),), (TensorSpec("out", "float32", (1, 4, 32, 32)),)),
                make_inputs=lambda x: (x,), tolerances=tolerances, quantize=quantize)
    return ExportPlan(family="test", task="test", preset="t", parts=[part], parity_images=images,
                      parity_source=source, preprocess=PRE)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def _cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_search_keeps_the_cancellation_in_fp32(tmp_path):
    out = tmp_path / "b"
    report = write_bundle(_plan(), out, precision=PrecisionOptions(fp16=True))
    assert sorted(report.files) == ["manifest.json", "net.fp16.onnx", "net.onnx"] and report.refused == {}
    m = json.loads((out / "manifest.json").read_text())
    info = m["fp16"]["net"]
    fp32 = onnx.load(str(out / "net.onnx")).graph
    op_of = {n.name: n.op_type for n in fp32.node}
    # The island: the Add and the Sub, nothing else (the convolutions stay FP16).
    assert sorted(op_of[n] for n in info["kept_fp32_nodes"]) == ["Add", "Sub"]
    assert info["island_nodes"] == info["kept_fp32_nodes"] and info["overflowing_nodes"] == []
    assert (info["fp32_nodes"], info["nodes"]) == (2, 4)
    rounds = info["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and [r["passed"] for r in rounds] == [False, True]
    assert rounds[0]["parity"]["out"]["cosine"] < 0.99 and "cosine" in rounds[0]["violations"][0]
    assert rounds[1]["kept_nodes"] == 2 and rounds[1]["violations"] == []
    assert m["validation"]["parity"]["net/fp16"]["out"]["cosine"] >= 0.999
    assert "refused" not in m["validation"]

    fp16 = onnx.load(str(out / "net.fp16.onnx")).graph
    weights = {i.name: i.data_type for i in fp16.initializer}
    assert weights["conv1.weight"] == weights["conv2.weight"] == onnx.TensorProto.FLOAT16
    assert weights["up"] == weights["down"] == onnx.TensorProto.FLOAT
    # The Add's result reaches the Sub in FP32, not through an FP16 round trip.
    sub = next(n for n in fp16.node if n.op_type == "Sub")
    producer = {o: n for n in fp16.node for o in n.output}
    assert producer[sub.input[0]].op_type == "Add"
    # Re-measured on other inputs: FP16 agrees with FP32.
    x = np.random.default_rng(5).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    assert overflowing_nodes(out / "net.onnx", [{"images": x}]) == []
    assert _cosine(_run(out / "net.onnx", x), _run(out / "net.fp16.onnx", x)) >= 0.999


def test_fp16_that_still_fails_is_refused_and_fp32_written(tmp_path, caplog):
    out = tmp_path / "b"
    with caplog.at_level(logging.WARNING, logger="vlexport"):
        report = write_bundle(_plan(), out, precision=PrecisionOptions(fp16=True, max_fp16_rounds=0))
    assert sorted(report.files) == ["manifest.json", "net.onnx"]
    assert list(report.refused) == ["net/fp16"] and "cosine" in report.refused["net/fp16"]
    warning = [r.getMessage() for r in caplog.records if "net/fp16" in r.getMessage()]
    assert len(warning) == 1 and "\n" not in warning[0] and "refused" in warning[0] and "cosine 0.9" in warning[0]
    m = json.loads((out / "manifest.json").read_text())
    assert m["parts"]["net"]["files"] == {"fp32": "net.onnx"}
    assert set(m["files"]) == {"net.onnx"}
    assert m["validation"]["refused"] == report.refused
    assert "net/fp16" not in m["validation"]["parity"] and "net/fp32" in m["validation"]["parity"]
    assert m["fp16"]["net"]["refused"] == report.refused["net/fp16"]
    assert [r["passed"] for r in m["fp16"]["net"]["rounds"]] == [False]
    bundle = Bundle.open(out)
    assert bundle.verify_all() == ["net.onnx"] and bundle.refused("net") == {"fp16": report.refused["net/fp16"]}


def test_strict_keeps_the_old_rule_nothing_written(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(ExportError, match=r"no bundle was written: net/fp16 out: cosine 0\.9\d+ < 0\.999"):
        write_bundle(_plan(), out, precision=PrecisionOptions(fp16=True, max_fp16_rounds=0, strict=True))
    assert list(tmp_path.iterdir()) == []


def test_int8_that_fails_parity_is_refused(tmp_path, assets):
    out = tmp_path / "b"
    # A tolerance no INT8 graph meets: the refusal path, not the quantiser's quality, is under test.
    prec = PrecisionOptions(fp16=True, int8=True, calib=str(assets / "images"), calib_size=2, calib_method="minmax")
    report = write_bundle(_plan(quantize=True, int8_tol=OutputTolerance(max_abs=1e-9)), out, precision=prec)
    assert sorted(report.files) == ["manifest.json", "net.fp16.onnx", "net.onnx"]
    assert list(report.refused) == ["net/int8"] and "max-abs error" in report.refused["net/int8"]
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["parts"]["net"]["files"]) == {"fp32", "fp16"}
    assert m["calibration"]["excluded_nodes"] == {}  # no INT8 graph left
    with pytest.raises(ExportError, match="net/int8 out: max-abs error"):
        write_bundle(_plan(quantize=True, int8_tol=OutputTolerance(max_abs=1e-9)), tmp_path / "c",
                     precision=PrecisionOptions(**{**prec.__dict__, "strict": True}))
    assert not (tmp_path / "c").exists()


def test_runtime_and_inspect_name_the_refusal(tmp_path, assets):
    """A real task bundle (tiny multi-scale segmenter) whose FP16 is held to a check no FP16 graph meets."""
    from vlexport.cli import cli
    from vlexport.export.multiscale import MultiScaleExportOptions, build_plan
    from vlexport.runtime import load

    out = tmp_path / "seg"
    plan = build_plan(MultiScaleExportOptions(out=out, preset="tiny", imgsz=64, parity_count=1))
    part = plan.parts[0]
    part.tolerances = {**part.tolerances, "fp16": {"logits": OutputTolerance(max_abs=1e-9)}}
    report = write_bundle(plan, out, precision=PrecisionOptions(fp16=True, max_fp16_rounds=1))
    assert list(report.refused) == ["segmenter/fp16"] and "after 1 round(s)" in report.refused["segmenter/fp16"]
    with pytest.raises(BundleError, match=r"has no fp16 file: the export refused it \(logits: max-abs error"):
        load(out, precision="fp16")
    with load(out) as task:
        assert task.precision == "fp32"
        assert task.segment(np.full((48, 64, 3), 127, np.uint8)) is not None
    r = CliRunner().invoke(cli, ["inspect", str(out)], catch_exceptions=False)
    assert r.exit_code == 0 and "refused    segmenter/fp16: logits: max-abs error" in r.output, r.output


def test_cli_has_strict():
    from vlexport.cli import cli
    from vlexport.export.command import precision_from
    from vlexport.registry import get_family

    for family in ("kdeov", "yolo", "sclip", "captioner", "detr", "multiscale"):
        r = CliRunner().invoke(cli, [family, "--help"])
        assert r.exit_code == 0 and "--strict" in r.output, (family, r.output)
        # The flag, parsed as the command parses it, reaches the export's precision options.
        for args, strict in (([], False), (["--strict"], True)):
            required = ["--checkpoint", "model.pt"] if family == "yolo" else []
            kw = dict(cli.commands[family].make_context(family, ["--fp16", *required, *args]).params)
            prec = precision_from(get_family(family).load("options")(**kw))
            assert prec.strict is strict and prec.fp16 is True, family


def test_parity_images_are_not_called_calibration(tmp_path, assets, caplog):
    import shutil

    from vlexport.export.multiscale import MultiScaleExportOptions, export_multiscale

    folder = tmp_path / "val"
    folder.mkdir()
    shutil.copy(assets / "images" / "bus.jpg", folder)
    with caplog.at_level(logging.WARNING, logger="vlexport"):
        export_multiscale(MultiScaleExportOptions(out=tmp_path / "b", preset="tiny", imgsz=64, parity_source=str(folder),
                                                  parity_count=2))
    fewer = [r.getMessage() for r in caplog.records if "fewer than" in r.getMessage()]
    assert fewer == [f"parity: {folder} has 1 usable image(s), fewer than the 2 asked for"]


# -- real size: DETR R50 (random weights) ---------------------------------------------------------


def _fp32_nodes_run_in_fp32(fp32_path, fp16_path, info) -> list[str]:
    """The recorded FP32 set, checked against the FP16 graph: each of its nodes reads and writes FP32."""
    from onnx import TensorProto

    g32 = onnx.load(str(fp32_path)).graph
    recorded = [n.name for n in g32.node if n.op_type in info["kept_fp32_op_types"] or n.name in set(info["kept_fp32_nodes"])]
    m16 = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_path)))
    g16 = m16.graph
    elem = {v.name: v.type.tensor_type.elem_type for v in [*g16.input, *g16.value_info, *g16.output]}
    elem.update({t.name: t.data_type for t in g16.initializer})
    by_name = {n.name: n for n in g16.node}
    for name in recorded:
        types = {elem.get(t) for t in [*by_name[name].input, *by_name[name].output] if t}
        assert TensorProto.FLOAT16 not in types, (name, by_name[name].op_type)
    assert any(t.data_type == TensorProto.FLOAT16 for t in g16.initializer)  # the rest is FP16
    return recorded


def test_detr_r50_fp16_records_its_fp32_nodes_and_keeps_the_top10_boxes(tmp_path, assets):
    """DETR R50 (random weights) at 320/480: FP16 written with its FP32 set recorded; the 10 highest-scoring
    queries of the FP16 graph keep their boxes (IoU >= 0.99 with the FP32 graph's, same inputs)."""
    import cv2

    from vlexport.cli import cli
    from vlexport.runtime.detr_preprocess import detr_preprocess

    out = tmp_path / "detr"
    r = CliRunner().invoke(cli, ["detr", "--preset", "r50", "--size", "320", "--max-size", "480", "--fp16",
                                 "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["parts"]["detector"]["files"]) == {"fp32", "fp16"} and "refused" not in m["validation"]
    info = m["fp16"]["detector"]
    assert info["rounds"][-1]["passed"] and info["rounds"][-1]["detr"]["topk_agreement"] == 1.0
    recorded = _fp32_nodes_run_in_fp32(out / "detector.onnx", out / "detector.fp16.onnx", info)
    assert len(recorded) == info["fp32_nodes"] > 0 and info["nodes"] > 10 * info["fp32_nodes"]
    s32 = ort.InferenceSession(str(out / "detector.onnx"), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(str(out / "detector.fp16.onnx"), providers=["CPUExecutionProvider"])
    for name in ("bus.jpg", "zidane.jpg"):
        frame = cv2.imread(str(assets / "images" / name))
        x, _ = detr_preprocess(frame, 320, 480)
        feed = {"images": x[None], "orig_size": np.array([[frame.shape[1], frame.shape[0]]], np.float32)}
        b32, _, _ = s32.run(["boxes", "scores", "labels"], feed)
        b16, sc16, _ = s16.run(["boxes", "scores", "labels"], feed)
        top = np.argsort(-sc16[0], kind="stable")[:10]
        a, b = b32[0][top].astype(np.float64), b16[0][top].astype(np.float64)
        lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
        inter = np.clip(rb - lt, 0, None).prod(1)
        areas = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        iou = inter / (areas - inter)
        assert iou.min() >= 0.99, (name, iou)

