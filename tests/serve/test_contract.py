"""The served tensor contract: its fixed names and types, and runtime result -> arrays -> result round trips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import vlexport.runtime as vr
from vlexport.errors import UsageError
from vlexport.runtime.results import Caption, Detections
from vlexport.runtime.segmentation import Segmentation
from vlexport.serve import contract as c


def same_detections(a: Detections, b: Detections) -> None:
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    assert a.labels == b.labels
    assert a.records() == b.records()


def test_the_fixed_contract():
    assert [(t.name, t.data_type, t.dims, t.optional) for t in c.INPUTS] == [
        ("IMAGE", "TYPE_STRING", (1,), True), ("IMAGE_BGR", "TYPE_UINT8", (-1, -1, 3), True)]
    got = {task: [(t.name, t.data_type, t.dims) for t in defs] for task, defs in c.TASK_OUTPUTS.items()}
    assert got == {
        "detect": [("BOXES", "TYPE_FP32", (-1, 4)), ("SCORES", "TYPE_FP32", (-1,)), ("LABELS", "TYPE_INT32", (-1,)),
                   ("CLASS_NAMES", "TYPE_STRING", (-1,))],
        "segment": [("LABEL_MAP", "TYPE_INT32", (-1, -1))],
        "caption": [("CAPTION", "TYPE_STRING", (1,))],
    }
    assert [t.name for t in c.outputs_for("caption")] == ["CAPTION", "TOKEN_IDS", "SCORE"]
    assert c.TASK_OUTPUTS["detect"][3].wire == "BYTES" and c.TASK_OUTPUTS["detect"][0].dtype is np.float32


def test_detections_of_a_real_run_round_trip(detect_bundle, assets):
    img = cv2.imread(str(assets / "images" / "bus.jpg"))
    with vr.load(detect_bundle, backend="onnxruntime") as task:
        local = task.detect(img)
    assert len(local) > 0
    arrays = c.outputs_from_result("detect", local)
    assert arrays["BOXES"].shape == (1, len(local), 4) and arrays["BOXES"].dtype == np.float32
    assert arrays["LABELS"].dtype == np.int32 and arrays["CLASS_NAMES"].dtype == np.object_
    assert arrays["CLASS_NAMES"][0, 0] == local.labels[0].encode()
    same_detections(c.result_from_outputs("detect", arrays), local)


def test_a_batch_with_different_counts_is_padded_and_stripped():
    one = Detections([[1.5, 2.25, 30, 40]], [0.875], [2], ["car"])
    three = Detections([[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]], [0.9, 0.8, 0.7], [0, 1, 0], ["a", "b", "a"])
    none = Detections.empty()
    arrays = c.outputs_from_results("detect", [one, three, none])
    assert arrays["BOXES"].shape == (3, 3, 4)
    assert arrays["LABELS"][0].tolist() == [2, c.PAD, c.PAD]
    back = c.results_from_outputs("detect", arrays)
    for got, want in zip(back, [one, three, none]):
        same_detections(got, want)


def test_segmentation_round_trip_with_different_sizes():
    a = Segmentation(np.array([[0, 1, 1], [1, 0, 0]], np.int32), ["bg", "x"])
    b = Segmentation(np.ones((4, 2), np.int32), ["bg", "x"])
    arrays = c.outputs_from_results("segment", [a, b])
    assert arrays["LABEL_MAP"].shape == (2, 4, 3)
    back = c.results_from_outputs("segment", arrays, classes=["bg", "x"])
    for got, want in zip(back, [a, b]):
        np.testing.assert_array_equal(got.label_map, want.label_map)
        assert got.classes == want.classes and got.to_dict() == want.to_dict()
    with pytest.raises(UsageError, match="class names"):
        c.result_from_outputs("segment", arrays)


def test_caption_round_trip_keeps_text_ids_and_score():
    cap = Caption("a bus on a street, ünïcode", [64, 1323, 319], -1.2345678901234)
    arrays = c.outputs_from_result("caption", cap)
    assert arrays["CAPTION"].shape == (1, 1) and arrays["SCORE"].dtype == np.float64
    back = c.result_from_outputs("caption", arrays)
    assert back.to_dict() == cap.to_dict() and back.score == cap.score
    # A client that asks for CAPTION alone still gets a Caption.
    assert c.result_from_outputs("caption", {"CAPTION": arrays["CAPTION"]}).text == cap.text


def test_bad_task_and_missing_output_are_usage_errors():
    with pytest.raises(UsageError, match="cannot be served"):
        c.outputs_for("embed")
    with pytest.raises(UsageError, match="no LABELS output"):
        c.result_from_outputs("detect", {"SCORES": np.zeros((1, 0), np.float32)})
    with pytest.raises(UsageError, match="no batch row 2"):
        c.result_from_outputs("caption", {"CAPTION": np.array([[b"x"]], object)}, index=2)


def test_the_serve_package_is_torch_free(detect_bundle, tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import vlexport.serve.contract, vlexport.serve.python_model, vlexport.serve.stage_model\n"
        "from vlexport.serve import write_repository\n"
        f"write_repository([{str(detect_bundle)!r}], {str(tmp_path / 'repo')!r})\n"
        "bad = [m for m in ('torch', 'vlexport.export', 'vlexport.models') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
