"""The Python-backend model's own logic, without the server: decoding, validation, batching,
and loading its bundle (verified) from a written repository. Real JPEG/PNG bytes, real models."""

from __future__ import annotations

import importlib.util
import json

import cv2
import numpy as np
import pytest
from serve_helpers import decoded

import vlexport.runtime as vr
from vlexport.errors import BundleError, UsageError
from vlexport.serve import contract as c
from vlexport.serve.python_model import (RequestError, decode_image, model_settings, open_bundle_task,
                                         request_frames, run_requests)
from vlexport.serve.repository import write_repository


def as_image_input(*blobs: bytes) -> np.ndarray:
    return np.array([[b] for b in blobs], dtype=np.object_)


def test_decode_real_jpeg_and_png(photos):
    for name, data in photos.items():
        img = decode_image(data)
        np.testing.assert_array_equal(img, cv2.imread(str(__import__("serve_helpers").ASSETS / "images" / name)))
        assert img.dtype == np.uint8 and img.shape[2] == 3


def test_corrupt_and_empty_bytes_give_one_line(photos):
    jpeg = photos["bus.jpg"]
    with pytest.raises(RequestError, match=r"^IMAGE 0: 100 bytes that OpenCV cannot decode as an image"):
        decode_image(jpeg[:100])  # a truncated JPEG: header only
    with pytest.raises(RequestError, match="cannot decode"):
        decode_image(b"\x00" * 64, 0)
    with pytest.raises(RequestError, match="^IMAGE 3: the image bytes are empty$"):
        decode_image(b"", 3)
    with pytest.raises(RequestError, match="got text"):
        decode_image("bus.jpg")


def test_request_validation(photos):
    bus = photos["bus.jpg"]
    frames = request_frames(as_image_input(bus, photos["smarties.png"]), None)
    assert [f.shape for f in frames] == [decoded(bus).shape, decoded(photos["smarties.png"]).shape]
    bgr = np.stack([decoded(bus)] * 2)
    assert len(request_frames(None, bgr)) == 2
    cases = [
        ((None, None), "exactly one of the inputs IMAGE .* the request has neither"),
        ((as_image_input(bus), bgr), "the request has both"),
        ((None, bgr.astype(np.float32)), "^IMAGE_BGR: got dtype float32, expected UINT8"),
        ((None, bgr[..., :2]), r"IMAGE_BGR: got shape \[2, 1080, 810, 2\], expected \[B, H, W, 3\]"),
        ((None, bgr[:0]), "IMAGE_BGR: the request holds no image"),
        ((None, np.zeros((1, 0, 4, 3), np.uint8)), "empty image"),
        ((np.zeros((1, 1), np.float32), None), "IMAGE: got dtype float32, expected BYTES"),
        ((as_image_input(bus).reshape(1, 1, 1), None), r"IMAGE: got shape \[1, 1, 1\], expected \[B, 1\]"),
        ((np.zeros((0, 1), object), None), "IMAGE: the request holds no image"),
        ((as_image_input(bus, b"not a jpeg"), None), "IMAGE 1: 10 bytes that OpenCV cannot decode"),
    ]
    for (image, image_bgr), message in cases:
        with pytest.raises(RequestError, match=message) as e:
            request_frames(image, image_bgr)
        assert "\n" not in str(e.value) and isinstance(e.value, UsageError)


def test_a_batch_of_requests_with_bad_ones(detect_bundle, photos):
    bus, zidane = photos["bus.jpg"], photos["zidane.jpg"]
    with vr.load(detect_bundle, backend="onnxruntime") as task:
        local = task.detect_batch([decoded(bus), decoded(zidane)])
        answers = run_requests(task, "detect", [
            (as_image_input(bus), None),
            (as_image_input(bus[:50]), None),  # corrupt
            (None, decoded(zidane)[None]),
            (None, None),  # empty
            (None, np.zeros((1, 8, 8, 3), np.float32)),  # wrong dtype
        ])
    assert isinstance(answers[1], str) and answers[1].startswith("IMAGE 0: 50 bytes")
    assert "neither" in answers[3] and "float32" in answers[4]
    for arrays, want in ((answers[0], local[0]), (answers[2], local[1])):
        got = c.result_from_outputs("detect", arrays)
        assert got.records() == want.records()
        np.testing.assert_array_equal(got.boxes, want.boxes)


def test_segment_requests_give_the_local_label_map(segment_bundle, photos):
    frames = [decoded(photos["apple.jpg"]), decoded(photos["road.jpg"])]
    with vr.load(segment_bundle, backend="onnxruntime") as task:
        local = task.segment_batch(frames)
        answers = run_requests(task, "segment", [(as_image_input(photos["apple.jpg"], photos["road.jpg"]), None)])
    back = c.results_from_outputs("segment", answers[0], classes=task.classes)
    for got, want in zip(back, local):
        np.testing.assert_array_equal(got.label_map, want.label_map)


def _import_model_py(path):
    spec = importlib.util.spec_from_file_location(f"served_model_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _triton_args(repo, name):
    """The ``args`` Triton hands to initialize: the model config as JSON."""
    from google.protobuf import json_format

    from vlexport.serve.config import check_config

    message = check_config(name, (repo / name / "config.pbtxt").read_text())
    return {"model_config": json_format.MessageToJson(message, preserving_proto_field_name=True),
            "model_name": name, "model_version": "1", "model_repository": str(repo / name)}


def test_the_written_model_loads_its_verified_bundle_and_refuses_a_tampered_one(detect_bundle, tmp_path, photos):
    repo = write_repository([detect_bundle], tmp_path / "repo", names=["det"], backend="onnxruntime", threads=1).root
    args = _triton_args(repo, "det")
    assert model_settings(json.loads(args["model_config"])) == {"backend": "onnxruntime", "threads": 1}
    module = _import_model_py(repo / "det" / "1" / "model.py")
    model = module.TritonPythonModel()
    model.initialize(args)
    try:
        assert model.kind == "detect" and model.task.backend.name == "onnxruntime"
        [arrays] = run_requests(model.task, model.kind, [(as_image_input(photos["bus.jpg"]), None)])
        assert set(arrays) == {"BOXES", "SCORES", "LABELS", "CLASS_NAMES"}
    finally:
        model.finalize()
    vocab = repo / "det" / "1" / "bundle" / "vocab.npz"
    vocab.write_bytes(vocab.read_bytes() + b"x")  # not the graph: every file is checked
    with pytest.raises(RuntimeError, match=r"^model 'det' cannot load its bundle: .*'vocab.npz' does not match its sha256"):
        module.TritonPythonModel().initialize(args)
    with pytest.raises(BundleError, match="does not match its sha256"):
        open_bundle_task(repo / "det" / "1" / "bundle", {})
