"""KDEOV's detection path: training on labelled boxes, per-class sigmoid scores, resume, text-tower checks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vlexport.cli import cli

pytest.importorskip("ultralytics")

IMGSZ = 320


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def person_split(tmp_path_factory, assets) -> Path:
    """A YOLO data.yaml over 12 COCO128 images with people in them (labels found beside the images)."""
    coco = assets / "coco128"
    chosen = []
    for label in sorted((coco / "labels" / "train2017").glob("*.txt")):
        classes = [line.split()[0] for line in label.read_text().splitlines() if line.strip()]
        if "0" in classes and len(chosen) < 12:
            chosen.append(coco / "images" / "train2017" / f"{label.stem}.jpg")
    work = tmp_path_factory.mktemp("person-split")
    (work / "train.txt").write_text("".join(f"{p}\n" for p in chosen))
    names = (coco / "data.yaml").read_text().split("names:", 1)[1]
    yaml = work / "train.yaml"
    yaml.write_text(f"path: {coco}\ntrain: {work / 'train.txt'}\nval: {work / 'train.txt'}\nnames:{names}")
    return yaml


@pytest.fixture(scope="module")
def person_student(tmp_path_factory, assets, person_split) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("student") / "person.pt"
    r = invoke("train-kdeov", "--data", person_split, "--backbone-weights", assets / "weights" / "yolov8n_coco_state_dict.pt",
               "--classes", "person", "--templates", "single", "--imgsz", IMGSZ, "--steps", 60, "--batch-size", 8,
               "--checkpoint-every", 30, "--out", out)
    assert r.exit_code == 0, r.output
    from vlexport.models.kdeov.checkpoint import kdeov_checkpoint_extra

    return out, kdeov_checkpoint_extra(out)


def test_training_records_vocabulary_text_tower_and_learns(person_student):
    path, extra = person_student
    assert extra["vocabulary"] == ["person"] and extra["images"] == 12
    assert extra["text_tower"]["model"] == "ViT-B-32" and extra["text_tower"]["activation"] == "quickgelu"
    assert len(extra["text_tower"]["weights_sha256"]) == 64
    assert extra["train"]["step"] == 60 and extra["train"]["options"]["freeze"] == "heads"
    # The class loss of the last step is far below the first one's (a random projection starts at the prior).
    assert extra["train"]["last_loss"]["cls_loss"] < 2.0


def test_resume_continues_the_step_count(person_student, person_split, tmp_path):
    path, _ = person_student
    copy = tmp_path / "resumed.pt"
    copy.write_bytes(path.read_bytes())
    r = invoke("train-kdeov", "--data", person_split, "--resume", copy, "--steps", 70, "--batch-size", 8, "--out", copy)
    assert r.exit_code == 0, r.output
    from vlexport.models.kdeov.checkpoint import kdeov_checkpoint_extra

    assert kdeov_checkpoint_extra(copy)["train"]["step"] == 70
    r = invoke("train-kdeov", "--data", person_split, "--resume", copy, "--steps", 50, "--out", copy)
    assert r.exit_code == 1 and "already ran 70 steps" in r.output


def _person_boxes(assets: Path, image: np.ndarray) -> np.ndarray:
    """People found by the COCO YOLOv8n the student started from (the reference of where people are)."""
    from ultralytics import YOLO

    yolo = YOLO(str(assets / "weights" / "yolov8n_coco.pt"))
    res = yolo.predict(image, imgsz=640, conf=0.5, classes=[0], verbose=False)[0]
    return res.boxes.xyxy.cpu().numpy()


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    return inter / ((a[:, 2:] - a[:, :2]).prod(-1)[:, None] + (b[:, 2:] - b[:, :2]).prod(-1)[None] - inter)


def test_one_class_vocabulary_on_a_real_photo(person_student, assets, tmp_path):
    """--classes person: scores spread over (0, 1), detections only where people are."""
    from vlexport import runtime

    path, _ = person_student
    out = tmp_path / "person-bundle"
    r = invoke("kdeov", "--checkpoint", path, "--classes", "person", "--templates", "single", "--out", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["postprocess"]["scoring"]["kind"] == "sigmoid"
    assert manifest["provenance"]["trained_vocabulary"] == ["person"]

    image = cv2.imread(str(assets / "images" / "bus.jpg"))
    task = runtime.load(out, precision="fp32")
    tensor, _ = task.preprocessor.batch([image])
    raw = task.backend.infer({"images": tensor})["scores"]  # every anchor's person score
    assert raw.min() < 0.05 and raw.max() > 0.5  # a softmax over one class would be 1.0 everywhere
    assert 0.0 < float(np.mean(raw)) < 0.2
    dets = task.detect(image)
    assert len(dets.boxes) >= 2 and (dets.scores > 0.25).all() and (dets.scores < 1.0).all()
    people = _person_boxes(assets, image)
    assert len(people) >= 3
    best = _iou(np.asarray(dets.boxes, np.float32), people).max(axis=1)
    assert (best > 0.5).all(), f"detections away from every person: IoU {best}"
    # Adding a class leaves the person scores unchanged: classes are scored independently.
    two = tmp_path / "two-bundle"
    r = invoke("kdeov", "--checkpoint", path, "--classes", "person,bus", "--templates", "single", "--out", two)
    assert r.exit_code == 0, r.output
    both = runtime.load(two, precision="fp32").detect(image)
    persons = both.class_ids == 0
    np.testing.assert_allclose(np.sort(both.scores[persons])[::-1][: len(dets.scores)],
                               np.sort(dets.scores)[::-1][: persons.sum()], atol=1e-5)


def test_class_names_never_trained_on_do_not_fire_everywhere(person_student, assets):
    """Texts the student never saw score low at every location, and person still fires.

    With a constant direction in the region embeddings (an earlier design of the detector
    initialisation), about half of all unseen texts scored high at every location and won the
    per-location best class over the trained ones.
    """
    from vlexport.models.kdeov.model import build_kdeov

    path, _ = person_student
    model = build_kdeov(checkpoint=path)
    assert float(model.region_norm_floor) > 0  # set by the detector initialisation
    person = _person_text_embedding(model)
    unseen = torch.nn.functional.normalize(torch.randn(40, person.shape[1], generator=torch.Generator().manual_seed(0)),
                                           dim=-1)
    image = cv2.resize(cv2.imread(str(assets / "images" / "bus.jpg")), (IMGSZ, IMGSZ))
    tensor = torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        _, probs = model.detect_raw(tensor, torch.cat([person, unseen]))  # [1, N, 41]
    assert probs[0, :, 0].max() > 0.5
    assert probs[0, :, 1:].max() < 0.05, f"an unseen text scores {float(probs[0, :, 1:].max()):.3f} somewhere"


def _person_text_embedding(model) -> torch.Tensor:
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder

    encoder = FrozenCLIPTextEncoder(model.config.clip_model, model.config.clip_pretrained,
                                    activation=model.config.clip_activation, allow_random=True)
    return torch.nn.functional.normalize(encoder.encode(["a photo of a person."]).float(), dim=-1)


def test_exporting_with_another_text_tower_is_refused(person_student, tmp_path):
    path, _ = person_student
    r = invoke("kdeov", "--checkpoint", path, "--classes", "person", "--templates", "single", "--clip-activation",
               "gelu", "--out", tmp_path / "b")
    assert r.exit_code == 1
    assert "trained against another CLIP text tower" in r.output and "activation 'quickgelu'" in r.output
    assert not (tmp_path / "b").exists()


def test_old_checkpoint_format_is_a_clear_error(tmp_path):
    from vlexport.errors import CheckpointError
    from vlexport.models.kdeov.checkpoint import load_kdeov_checkpoint

    old = tmp_path / "old.pt"
    torch.save({"format": "vlexport.kdeov/1", "config": {}, "state_dict": {}}, old)
    with pytest.raises(CheckpointError, match="train it again"):
        load_kdeov_checkpoint(old)


def test_bad_training_arguments(tmp_path, person_split):
    r = invoke("train-kdeov", "--out", tmp_path / "x.pt")
    assert r.exit_code == 1 and "--data DATASET" in r.output
    r = invoke("train-kdeov", "--data", person_split, "--classes", "unicorn", "--preset", "tiny", "--steps", 1,
               "--out", tmp_path / "x.pt")
    assert r.exit_code == 1 and "unicorn" in r.output
    assert not (tmp_path / "x.pt").exists()
