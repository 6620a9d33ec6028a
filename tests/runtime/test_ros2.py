"""The ROS 2 integration: message conversions, the detector core and run-time vocabulary changes.

Everything but the last test runs without ROS; the node test needs rclpy (not on PyPI: it comes
with a ROS 2 installation) and skips where it is missing.
"""

from __future__ import annotations

import array
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import write_bundle

from vlexport.errors import SourceError, UsageError
from vlexport.ros2 import (
    VocabularyEncoder,
    compressed_to_bgr,
    detections_to_fields,
    image_msg_to_bgr,
    image_to_bgr,
    load_embeddings_file,
    parse_class_names,
)
from vlexport.ros2.core import DetectorCore
from vlexport.runtime.results import Detections


def _rng_image(h: int = 5, w: int = 7, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _pack(pixels: np.ndarray, pad: int) -> tuple[int, bytes]:
    """Rows of ``pixels`` (H, W, C) as a message buffer with ``pad`` junk bytes after each row."""
    h = pixels.shape[0]
    rows = pixels.reshape(h, -1)
    junk = np.full((h, pad), 0xAB, np.uint8)
    return rows.shape[1] + pad, np.concatenate([rows, junk], axis=1).tobytes()


# -- images ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [0, 3, 9])
def test_color_encodings_with_row_padding(pad):
    bgr = _rng_image()
    h, w = bgr.shape[:2]
    step, data = _pack(bgr, pad)
    out = image_to_bgr("bgr8", h, w, step, data)
    np.testing.assert_array_equal(out, bgr)
    assert out.flags.c_contiguous and out.flags.writeable
    step, data = _pack(np.ascontiguousarray(bgr[:, :, ::-1]), pad)
    np.testing.assert_array_equal(image_to_bgr("rgb8", h, w, step, data), bgr)
    alpha = np.full((h, w, 1), 77, np.uint8)
    step, data = _pack(np.concatenate([bgr, alpha], axis=2), pad)
    np.testing.assert_array_equal(image_to_bgr("bgra8", h, w, step, data), bgr)
    step, data = _pack(np.concatenate([bgr[:, :, ::-1], alpha], axis=2), pad)
    np.testing.assert_array_equal(image_to_bgr("rgba8", h, w, step, data), bgr)


def test_mono8_from_a_message_with_array_data():
    gray = _rng_image(c=1, seed=1)
    step, data = _pack(gray, 5)
    # rclpy gives `data` as array.array('B').
    msg = SimpleNamespace(encoding="mono8", height=5, width=7, step=step, data=array.array("B", data))
    out = image_msg_to_bgr(msg)
    assert out.shape == (5, 7, 3)
    for ch in range(3):
        np.testing.assert_array_equal(out[:, :, ch], gray[:, :, 0])


def test_a_trimmed_last_row_is_accepted_and_bad_buffers_are_refused():
    bgr = _rng_image()
    step, data = _pack(bgr, 4)
    np.testing.assert_array_equal(image_to_bgr("bgr8", 5, 7, step, data[:-4]), bgr)
    with pytest.raises(SourceError, match="120 bytes, need 121"):
        image_to_bgr("bgr8", 5, 7, step, data[:-5])
    with pytest.raises(SourceError, match="step 20 is shorter than a row of 21 bytes"):
        image_to_bgr("bgr8", 5, 7, 20, data)
    with pytest.raises(UsageError, match="'16UC1' is not read directly"):
        image_to_bgr("16UC1", 5, 7, 14, bytes(70))


def test_compressed_images_decode_to_bgr():
    bgr = _rng_image(16, 12)
    ok, png = cv2.imencode(".png", bgr)
    assert ok
    np.testing.assert_array_equal(compressed_to_bgr(png.tobytes()), bgr)
    with pytest.raises(SourceError, match="could not be decoded"):
        compressed_to_bgr(b"not an image")


# -- detections → Detection2DArray fields ------------------------------------------------------
def test_detections_map_to_detection2d_fields():
    dets = Detections(
        np.array([[10, 20, 50, 100], [0.5, 1.5, 2.5, 4.5]], np.float32),
        np.array([0.875, 0.25], np.float32),
        np.array([2, 0], np.int64),
        ["car", "person"],
        track_ids=np.array([7, -1]),
    )
    f = detections_to_fields(dets, frame_id="camera_optical", stamp=(1700000000, 250000000))
    header = {"stamp": {"sec": 1700000000, "nanosec": 250000000}, "frame_id": "camera_optical"}
    assert f["header"] == header
    first, second = f["detections"]
    assert first == {
        "header": header,
        "id": "7",
        "bbox": {"center": {"position": {"x": 30.0, "y": 60.0}, "theta": 0.0}, "size_x": 40.0, "size_y": 80.0},
        "results": [{"hypothesis": {"class_id": "car", "score": 0.875}}],
    }
    assert second["id"] == ""  # untracked
    assert second["bbox"]["center"]["position"] == {"x": 1.5, "y": 3.0}
    assert (second["bbox"]["size_x"], second["bbox"]["size_y"]) == (2.0, 3.0)
    by_index = detections_to_fields(dets, class_id_format="index")
    assert [d["results"][0]["hypothesis"]["class_id"] for d in by_index["detections"]] == ["2", "0"]
    assert detections_to_fields(Detections.empty())["detections"] == []
    with pytest.raises(UsageError, match="unknown class id format"):
        detections_to_fields(dets, class_id_format="code")


# -- vocabulary ---------------------------------------------------------------------------------
def test_class_names_are_parsed_from_lists_and_strings():
    assert parse_class_names(" person, red car ,,") == ["person", "red car"]
    assert parse_class_names(["forklift", " pallet "]) == ["forklift", "pallet"]
    with pytest.raises(UsageError, match="vocabulary is empty"):
        parse_class_names(["", " "])
    with pytest.raises(UsageError, match=r"\['car'\] more than once"):
        parse_class_names("car,bus,car")


BLACK = np.zeros((640, 640, 3), np.uint8)  # letterbox is the identity; the brightness anchor scores 0


def _truck_file(tmp_path: Path) -> Path:
    path = tmp_path / "extra.npz"
    # 'truck' points where the fake detector's 'car' anchors (4 and 5) point.
    np.savez(path, classes=np.array(["truck", "boat"]), embeddings=np.array([[0, 0, 1, 0], [0, 1, 0, 0]], np.float32))
    return path


def test_vocabulary_from_a_file_and_from_the_bundle_gives_hand_computed_detections(tmp_path):
    bundle = write_bundle(tmp_path / "b", vocab_mode="input")
    core = DetectorCore(bundle, vocabulary=["truck"], vocabulary_file=_truck_file(tmp_path), threads=1)
    assert core.classes == ["truck"] and core.default_classes == ["person", "bus", "car"]
    f = core.process(BLACK, "cam", (12, 34))
    # One class: anchors 1-3 score 0 for it, anchors 5 (0.6) and 4 (0.3) remain, in score order.
    got = [(d["results"][0]["hypothesis"]["class_id"], round(d["results"][0]["hypothesis"]["score"], 4),
            d["bbox"]["center"]["position"], d["bbox"]["size_x"], d["bbox"]["size_y"]) for d in f["detections"]]
    assert got == [("truck", 0.6, {"x": 50.0, "y": 30.0}, 100.0, 40.0),
                   ("truck", 0.3, {"x": 400.0, "y": 500.0}, 200.0, 200.0)]
    assert f["header"]["stamp"] == {"sec": 12, "nanosec": 34} and f["header"]["frame_id"] == "cam"
    # Names from the bundle's own vocab.npz and the file mix, in the order given.
    assert core.set_vocabulary(["boat", "person"]) == ["boat", "person"]
    labels = {d["results"][0]["hypothesis"]["class_id"] for d in core.process(BLACK)["detections"]}
    assert labels == {"boat", "person"}  # anchors 3 (boat 0.7) and 1 (person 0.9)
    core.set_vocabulary(core.default_classes)
    assert core.classes == ["person", "bus", "car"]
    core.close()


def test_names_nobody_can_embed_and_baked_bundles_are_refused(tmp_path):
    core = DetectorCore(write_bundle(tmp_path / "in", vocab_mode="input"), threads=1)
    with pytest.raises(UsageError, match="no embedding for \\['forklift'\\].*--with-text-encoder"):
        core.set_vocabulary(["person", "forklift"])
    assert core.classes == ["person", "bus", "car"]  # unchanged
    core.close()
    baked = DetectorCore(write_bundle(tmp_path / "baked"), threads=1)
    with pytest.raises(UsageError, match="baked into the graph.*--vocab-mode input"):
        baked.set_vocabulary(["person"])
    with pytest.raises(UsageError, match="baked"):
        VocabularyEncoder(baked.task.bundle)
    baked.close()
    with pytest.raises(UsageError, match="not found"):
        load_embeddings_file(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", names=np.array(["a"]))
    with pytest.raises(UsageError, match="expected 'classes' and 'embeddings'"):
        load_embeddings_file(tmp_path / "bad.npz")


def test_tracking_and_threshold_in_the_core(tmp_path):
    pytest.importorskip("supervision")
    core = DetectorCore(write_bundle(tmp_path / "b"), track=True, score_threshold=0.5, threads=1)
    first = core.process(BLACK)["detections"]
    second = core.process(BLACK)["detections"]
    # Threshold 0.5: person 0.9, bus 0.7 and car 0.6 remain; each keeps its id across frames.
    assert [d["results"][0]["hypothesis"]["class_id"] for d in first] == ["person", "bus", "car"]
    ids = [d["id"] for d in first]
    assert all(ids) and len(set(ids)) == 3 and [d["id"] for d in second] == ids
    core.set_score_threshold(None)  # the bundle's 0.25: car 0.3 comes back
    assert len(core.process(BLACK)["detections"]) == 4
    with pytest.raises(UsageError, match="between 0 and 1"):
        core.set_score_threshold(2)
    core.set_tracking(False)
    assert all(d["id"] == "" for d in core.process(BLACK)["detections"])
    core.close()


# -- a real --vocab-mode input bundle with a text encoder ----------------------------------------
@pytest.fixture(scope="module")
def kdeov_input_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from vlexport.export.kdeov import KDEOVExportOptions, export_kdeov

    out = tmp_path_factory.mktemp("kdeov") / "tiny-input"
    export_kdeov(KDEOVExportOptions(out=out, preset="tiny", classes=["person", "bus", "car"], templates="single",
                                    vocab_mode="input", with_text_encoder=True))
    return out


def _reference_embeddings(names: list[str], bundle: Path) -> np.ndarray:
    """The export's own bake (PyTorch text tower), for names the bundle never saw."""
    import json

    from vlexport.models.clip.towers import FrozenCLIPTextEncoder
    from vlexport.models.clip.text import build_text_embeddings, resolve_templates

    te = json.loads((bundle / "manifest.json").read_text())["provenance"]["text_encoder"]
    encoder = FrozenCLIPTextEncoder(te["model"], te["pretrained"], allow_random=True)
    assert encoder.weights_sha256 == te["weights_sha256"]  # the same tower the bundle exported
    templates_id, templates = resolve_templates("single")
    return build_text_embeddings(encoder, names, templates, templates_id).embeddings


def test_new_class_names_are_embedded_by_the_bundles_text_encoder(kdeov_input_bundle):
    names = ["forklift", "traffic cone", "person"]
    enc = VocabularyEncoder(kdeov_input_bundle)
    assert enc.has_text_encoder
    got = enc.encode(names)
    np.testing.assert_allclose(got, _reference_embeddings(names, kdeov_input_bundle), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    enc.close()


def test_core_with_new_classes_matches_the_task_with_reference_embeddings(kdeov_input_bundle, assets):
    from vlexport.runtime.tasks.detect import DetectTask

    img = cv2.imread(str(assets / "images" / "bus.jpg"))
    names = ["forklift", "bus"]
    # Threshold 0: the untrained student's per-class sigmoid scores stay far below the default 0.25.
    core = DetectorCore(kdeov_input_bundle, vocabulary=names, threads=1, score_threshold=0.0)
    got = core.detect(img)
    task = DetectTask(kdeov_input_bundle, threads=1, score_threshold=0.0)
    task.set_vocabulary(names, _reference_embeddings(names, kdeov_input_bundle))
    want = task.detect(img)
    assert len(want) > 0 and got.labels == want.labels and set(got.labels) <= set(names)
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
    core.close()
    task.close()


# -- the node itself (needs a ROS 2 installation) -------------------------------------------------
def test_node_publishes_stamped_detections_and_changes_vocabulary(tmp_path):
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("vision_msgs")
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2DArray

    from vlexport.ros2.node import DetectionNode

    np.savez(tmp_path / "extra.npz", classes=np.array(["truck"]), embeddings=np.array([[0, 0, 1, 0]], np.float32))
    bundle = write_bundle(tmp_path / "b", vocab_mode="input")
    rclpy.init()
    try:
        node = DetectionNode(parameter_overrides=[
            Parameter("bundle", value=str(bundle)),
            Parameter("image_topic", value="/vlexport_test/image"),
            Parameter("detections_topic", value="/vlexport_test/detections"),
            Parameter("vocabulary_file", value=str(tmp_path / "extra.npz")),
        ])
        helper = rclpy.create_node("vlexport_test_helper")
        received: list = []
        helper.create_subscription(Detection2DArray, "/vlexport_test/detections", received.append, 10)
        pub = helper.create_publisher(Image, "/vlexport_test/image", 10)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.add_node(helper)

        def send_and_wait(sec: int) -> Detection2DArray:
            msg = Image(height=640, width=640, encoding="bgr8", step=640 * 3,
                        data=array.array("B", BLACK.tobytes()))
            msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = sec, 5, "cam"
            received.clear()
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                pub.publish(msg)
                executor.spin_once(timeout_sec=0.1)
            assert received, "no detections published"
            return received[-1]

        out = send_and_wait(41)
        assert (out.header.stamp.sec, out.header.stamp.nanosec, out.header.frame_id) == (41, 5, "cam")
        assert {d.results[0].hypothesis.class_id for d in out.detections} == {"person", "bus", "car"}
        result = node.set_parameters([Parameter("vocabulary", value=["truck"])])[0]
        assert result.successful, result.reason
        out = send_and_wait(42)
        assert [d.results[0].hypothesis.class_id for d in out.detections] == ["truck", "truck"]
        assert node.set_parameters([Parameter("bundle", value="/elsewhere")])[0].successful is False
        node.destroy_node()
        helper.destroy_node()
    finally:
        rclpy.try_shutdown()
