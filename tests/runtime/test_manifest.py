"""The typed manifest: every family round-trips, schema/1 bundles load, bad fields name themselves,
settings are checked in one place, and recording an engine is atomic."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from vlexport.errors import BundleError, OutputError, UsageError
from vlexport.export.bundle_writer import BundleWriter
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.manifest import (
    SCHEMA,
    EngineRecord,
    Manifest,
    Section,
    parse_manifest,
    read_manifest,
    write_manifest,
)
from vlexport.runtime.spec import PartSignature

DATA = Path(__file__).resolve().parents[1] / "data" / "manifests"
# Written by the exporter of today (schema vlexport.bundle/1), kept as they came out.
SCHEMA1_FIXTURES = sorted(DATA.glob("*_schema1.json"))

IMAGES = {"name": "images", "dtype": "float32", "shape": ["batch", 3, 64, 64]}
LETTERBOX = {"size": [64, 64], "resize": "letterbox", "pad_value": 114, "color": "RGB", "scale": 1 / 255,
             "mean": [0, 0, 0], "std": [1, 1, 1]}
SHA = "sha256:" + "ab" * 32


def _part(files: dict[str, str], outputs: list[dict[str, Any]], inputs: list[dict[str, Any]] | None = None,
          engines: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"inputs": inputs or [IMAGES], "outputs": outputs, "files": files, "engines": engines or {}}


def _manifest(family: str, task: str, parts: dict[str, Any], **sections: Any) -> dict[str, Any]:
    files = {rel: SHA for p in parts.values() for rel in p["files"].values()}
    files.update({e["file"]: e["sha256"] for p in parts.values() for e in p["engines"].values()})
    m: dict[str, Any] = {"schema": SCHEMA, "family": family, "task": task, "preset": "t",
                         "provenance": {"torch": "2.4", "opset": 17}, "model": {"arch": family},
                         "preprocess": sections.pop("preprocess", LETTERBOX),
                         "vocabulary": sections.pop("vocabulary", None), "parts": parts,
                         "postprocess": sections.pop("postprocess", {}),
                         "validation": {"parity": {}, "parity_images": {"source": "synthetic", "count": 2}},
                         "warnings": []}
    m.update(sections)
    m.update({"created": "2026-01-01T00:00:00+00:00", "vlexport": "0.1.0", "files": files})
    return m


ENGINE = {"file": "detector.fp16.0123456789abcdef.engine", "sha256": "sha256:" + "cd" * 32,
          "key": {"onnx_sha256": "ab" * 32, "trt_version": "10.3.0.26", "gpu_name": "NVIDIA L4", "precision": "fp16"},
          "onnx": "detector.onnx", "built": "2026-01-01T00:00:00+00:00",
          "profile": {"images": [[1, 3, 64, 64], [1, 3, 64, 64], [8, 3, 64, 64]]}}
DETECT_OUT = [{"name": "boxes", "dtype": "float32", "shape": ["batch", "anchors", 4]},
              {"name": "scores", "dtype": "float32", "shape": ["batch", "anchors"]},
              {"name": "class_ids", "dtype": "int32", "shape": ["batch", "anchors"]}]

FAMILIES: dict[str, dict[str, Any]] = {
    "yolo": _manifest(
        "yolo", "detect",
        {"detector": _part({"fp32": "detector.onnx", "int8": "detector.int8.onnx"}, DETECT_OUT,
                           engines={"fp16": ENGINE})},
        vocabulary={"classes": ["person", "bus"], "templates": None, "mode": "closed"},
        postprocess={"score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 300, "class_agnostic": False},
        calibration={"target": "cpu", "method": "minmax", "source": "coco128", "kind": "images", "count": 8,
                     "seed": 0, "sha256": "ef" * 32, "excluded_nodes": {"detector": []}, "weight_only": {}},
    ),
    "kdeov": _manifest(
        "kdeov", "detect",
        {"detector": _part({"fp32": "detector.onnx"}, DETECT_OUT,
                           inputs=[IMAGES, {"name": "text_embeddings", "dtype": "float32", "shape": ["num_classes", 64]}]),
         "text_encoder": _part({"fp32": "text_encoder.onnx"},
                               [{"name": "text_embeddings", "dtype": "float32", "shape": ["prompts", 64]}],
                               inputs=[{"name": "tokens", "dtype": "int64", "shape": ["prompts", 77]}])},
        vocabulary={"classes": ["cat"], "templates": "default", "mode": "input", "file": "vocab.npz"},
        text_tokenizer={"vocab": "tokenizer/bpe.txt.gz"},
    ),
    "sclip": _manifest(
        "sclip", "segment",
        {"segmenter": _part({"fp32": "segmenter.onnx", "fp16": "segmenter.fp16.onnx"},
                            [{"name": "logits", "dtype": "float32", "shape": ["crops", 2, "h", "w"]}],
                            inputs=[{"name": "crops", "dtype": "float32",
                                     "shape": ["crops", 3, "crop_height", "crop_width"]}])},
        preprocess={"resize": "short_side", "short_side": 336, "max_long_side": 448, "color": "RGB", "scale": 1 / 255,
                    "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]},
        vocabulary={"classes": ["background", "road"], "templates": "default", "mode": "baked"},
        segment={"slide_crop": 224, "slide_stride": 112, "patch_size": 16, "logit_scale": 40.0,
                 "background_index": 0, "pamr": {"steps": 10, "dilations": [8, 16], "where": "runtime"}},
        fp16={"segmenter": {"nodes": 10, "fp32_nodes": 2, "rounds": []}},
    ),
    "multiscale": _manifest(
        "multiscale", "segment",
        {"segmenter": _part({"fp32": "segmenter.onnx"}, [{"name": "logits", "dtype": "float32", "shape": [1, 1, 64, 64]}],
                            inputs=[{"name": "images", "dtype": "float32", "shape": [1, 3, 64, 64]}])},
        segment={"threshold": 0.5, "classes": ["background", "object"]},
    ),
    "captioner": _manifest(
        "captioner", "caption",
        {"encoder": _part({"fp32": "encoder.onnx"}, [{"name": "prefix", "dtype": "float32", "shape": ["batch", 10, 64]}]),
         "decoder": _part({"fp32": "decoder.onnx", "int8": "decoder.int8.onnx"},
                          [{"name": "logits", "dtype": "float32", "shape": ["batch", 50257]}],
                          inputs=[{"name": "input_ids", "dtype": "int64", "shape": ["batch", 1]}])},
        preprocess={"resize": "clip", "size": 64, "interpolation": "bicubic", "color": "RGB", "scale": 1 / 255,
                    "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]},
        caption={"prefix_length": 10, "eos_token_id": 50256, "max_length": 30,
                 "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt"},
                 "decoding": {"method": "beam", "num_beams": 3}},
        calibration={"target": "tensorrt", "method": "entropy", "weight_only": {"decoder": {"bits": 8}}},
    ),
    "detr": _manifest(
        "detr", "detect",
        {"detector": _part({"fp32": "detector.onnx"},
                           [{"name": "pred_logits", "dtype": "float32", "shape": [1, 100, 92]}],
                           inputs=[{"name": "images", "dtype": "float32", "shape": [1, 3, "height", "width"]},
                                   {"name": "orig_size", "dtype": "int64", "shape": [1, 2]}])},
        preprocess={"resize": "detr", "short_side": 800, "max_size": 1333, "color": "RGB", "scale": 1 / 255,
                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        postprocess={"type": "detr", "score_threshold": 0.7, "masks": True, "mask_threshold": 0.5},
    ),
    "tiny-embed": _manifest(
        "tiny", "embed",
        {"image_encoder": _part({"fp32": "image_encoder.onnx"},
                                [{"name": "embeddings", "dtype": "float32", "shape": ["batch", 64]}])},
    ),
}
FAMILIES["detr"]["validation"].update(refused={"detector/fp16": "parity: max_abs 0.3 > 0.05"},
                                      metrics={"fp32": {"map50": 0.5}}, gate={"rounds": []})


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_round_trips(tmp_path: Path, family: str) -> None:
    data = FAMILIES[family]
    path = tmp_path / "manifest.json"
    write_manifest(path, parse_manifest(data))
    back = read_manifest(path)
    assert json.loads(path.read_text()) == data  # nothing lost, nothing added
    assert list(back.to_dict()) == list(data)  # and the keys keep the exporter's order
    assert back.family == data["family"] and back.task == data["task"]
    for name, part in data["parts"].items():
        record = back.parts[name]
        assert isinstance(record.io, PartSignature) and record.files == part["files"]
        assert [s.name for s in record.io.inputs] == [s["name"] for s in part["inputs"]]
        assert {p: e.to_dict() for p, e in record.engines.items()} == part["engines"]


def test_typed_records_expose_what_the_runtime_reads() -> None:
    yolo = parse_manifest(FAMILIES["yolo"])
    assert yolo.calibration is not None and yolo.calibration.target == "cpu"
    engine = yolo.parts["detector"].engines["fp16"]
    assert isinstance(engine, EngineRecord) and engine.profile is not None and engine["file"] == ENGINE["file"]
    assert yolo.parts["detector"].precisions == ["fp32", "int8"] and yolo.classes == ["person", "bus"]
    cap = parse_manifest(FAMILIES["captioner"])
    assert cap.calibration is not None and cap.calibration.weight_only == {"decoder": {"bits": 8}}
    detr = parse_manifest(FAMILIES["detr"])
    assert detr.refused("detector") == {"fp16": "parity: max_abs 0.3 > 0.05"} and detr.refused("other") == {}
    assert detr.validation is not None and detr.validation.extra["metrics"] == {"fp32": {"map50": 0.5}}


@pytest.mark.parametrize("fixture", SCHEMA1_FIXTURES, ids=lambda p: p.stem)
def test_schema1_bundles_written_today_load(tmp_path: Path, fixture: Path) -> None:
    raw = json.loads(fixture.read_text())
    assert raw["schema"] == "vlexport.bundle/1"
    root = tmp_path / "b"
    root.mkdir()
    shutil.copyfile(fixture, root / "manifest.json")
    b = Bundle.open(root)
    assert b.family == raw["family"] and b.part_names == list(raw["parts"])
    assert b.manifest == raw  # the dict view other callers read is the file's data
    for name, part in raw["parts"].items():
        assert b.part(name).files == part["files"]
    write_manifest(tmp_path / "again.json", b.meta)
    assert json.loads((tmp_path / "again.json").read_text()) == raw


def test_schema1_fixtures_cover_detection_and_segmentation() -> None:
    assert {json.loads(p.read_text())["task"] for p in SCHEMA1_FIXTURES} >= {"detect", "segment"}


# -- malformed fields --------------------------------------------------------------------------------
def _set(path: str, value: Any) -> Any:
    def edit(m: dict[str, Any]) -> None:
        *head, last = path.split("/")
        target: Any = m
        for key in head:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is _DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return edit


_DELETE = object()

MALFORMED = [
    ("parts/detector/inputs/0/shape", "x",
     "parts.detector.inputs[0].shape: expected a list of ints or strings, got 'x'"),
    ("parts/detector/inputs/0/shape", [1, 3.5], "parts.detector.inputs[0].shape: expected a list of ints"),
    ("parts/detector/outputs/1/dtype", "float64", "parts.detector.outputs[1].dtype: expected one of"),
    ("parts/detector/inputs/0/name", _DELETE, "parts.detector.inputs[0]: lacks the required key 'name'"),
    ("parts/detector/inputs", {"images": 1}, "parts.detector.inputs: expected a list of tensors"),
    ("parts/detector/files/fp64", "x.onnx", "parts.detector.files.fp64: unknown precision"),
    ("parts/detector/files/fp32", 3, "parts.detector.files.fp32: expected a non-empty string, got 3"),
    ("parts/detector/engines/fp16/sha256", None, "parts.detector.engines.fp16.sha256: expected a non-empty string"),
    ("parts/detector/engines/fp16/key", "k", "parts.detector.engines.fp16.key: expected a JSON object"),
    ("parts/detector", [], "parts.detector: expected a JSON object"),
    ("files", [], "files: expected a JSON object"),
    ("files/detector.onnx", 1, "files.detector.onnx: expected a non-empty string"),
    ("family", "", "family: expected a non-empty string"),
    ("task", _DELETE, "lacks the required key 'task'"),
    ("preprocess", 3, "preprocess: expected a JSON object, got 3"),
    ("postprocess", [], "postprocess: expected a JSON object"),
    ("vocabulary/classes", "person", "vocabulary.classes: expected a list of names"),
    ("calibration/target", "gpu", "calibration.target: expected 'tensorrt' or 'cpu', got 'gpu'"),
    ("validation/refused", {"detector/int8": 3}, "validation.refused.detector/int8: expected a non-empty string"),
    ("schema", "vlexport.bundle/9", "schema: unknown bundle schema 'vlexport.bundle/9'"),
]


@pytest.mark.parametrize(("field", "value", "message"), MALFORMED, ids=[m[0] + "=" + repr(m[1])[:12] for m in MALFORMED])
def test_a_malformed_field_is_named(tmp_path: Path, field: str, value: Any, message: str) -> None:
    data = copy.deepcopy(FAMILIES["yolo"])
    _set(field, value)(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError) as err:
        read_manifest(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") or text.startswith(f"{path} lacks")
    assert "\n" not in text and message in text, text


def test_the_example_error_reads_as_documented(tmp_path: Path) -> None:
    data = copy.deepcopy(FAMILIES["yolo"])
    data["parts"]["detector"]["inputs"][0]["shape"] = "x"
    with pytest.raises(BundleError) as err:
        parse_manifest(data, "manifest.json")
    assert str(err.value) == (
        "manifest.json: parts.detector.inputs[0].shape: expected a list of ints or strings, got 'x'")


def test_not_json_or_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("{ not json")
    with pytest.raises(BundleError, match="is not valid JSON"):
        read_manifest(path)
    path.write_text("[1, 2]")
    with pytest.raises(BundleError, match="does not hold a JSON object"):
        read_manifest(path)


def test_a_bad_manifest_refuses_to_open_as_a_bundle(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    data = copy.deepcopy(FAMILIES["sclip"])
    data["parts"]["segmenter"]["outputs"][0]["shape"] = {"h": 1}
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"parts.segmenter.outputs\[0\].shape"):
        Bundle.open(root)


def test_the_writer_refuses_a_malformed_manifest_before_publishing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(BundleError, match=r"parts.p.files.fp32: expected a non-empty string"):
        with BundleWriter(out) as w:
            w.commit({"family": "f", "task": "t", "preprocess": {}, "parts": {"p": {"files": {"fp32": 1}}}})
    assert not out.exists()


# -- typed settings ------------------------------------------------------------------------------------
def _section(data: dict[str, Any]) -> Section:
    return parse_manifest(_manifest("tiny", "detect", {}, postprocess=data)).section("postprocess", where="/b")


def test_section_numbers_choices_and_flags() -> None:
    s = _section({"score_threshold": 0.3, "max_detections": 5, "class_agnostic": True, "method": "beam"})
    assert s.number("score_threshold", 0.25, min=0, max=1) == 0.3
    assert s.number("iou_threshold", 0.5, min=0, max=1) == 0.5  # absent: the default
    assert s.number("max_detections", 300, integer=True, min=1) == 5
    assert s.number("max_long_side", None, integer=True, min=1) is None
    assert s.flag("class_agnostic", False) is True and s.flag("masks", False) is False
    assert s.choice("method", ("greedy", "beam"), "greedy") == "beam"
    # A caller's override wins and is checked as the caller's mistake.
    assert s.number("score_threshold", 0.25, min=0, max=1, override=0.9) == 0.9
    with pytest.raises(UsageError, match=r"^score_threshold must be a number between 0 and 1, got 2$"):
        s.number("score_threshold", 0.25, min=0, max=1, override=2)
    with pytest.raises(UsageError, match="max_detections must be a positive integer, got 1.5"):
        s.number("max_detections", 300, integer=True, min=1, override=1.5)
    with pytest.raises(UsageError, match="class_agnostic must be true or false, got 'yes'"):
        s.flag("class_agnostic", False, override="yes")
    with pytest.raises(UsageError, match=r"method must be one of \['greedy', 'beam'\], got 'sample'"):
        s.choice("method", ("greedy", "beam"), override="sample")


@pytest.mark.parametrize(("data", "read", "message"), [
    ({"score_threshold": 2}, lambda s: s.number("score_threshold", 0.25, min=0, max=1),
     "/b: postprocess.score_threshold must be a number between 0 and 1, got 2"),
    ({"score_threshold": True}, lambda s: s.number("score_threshold", 0.25, min=0, max=1),
     "/b: postprocess.score_threshold must be a number between 0 and 1, got True"),
    ({"max_detections": 0}, lambda s: s.number("max_detections", 300, integer=True, min=1),
     "/b: postprocess.max_detections must be a positive integer, got 0"),
    ({"logit_scale": float("nan")}, lambda s: s.number("logit_scale", 40.0, min=0, exclusive=True),
     "/b: postprocess.logit_scale must be a positive number, got nan"),
    ({"threshold": 1.0}, lambda s: s.number("threshold", 0.5, min=0, max=1, exclusive=True),
     "/b: postprocess.threshold must be a number strictly between 0 and 1, got 1.0"),
    ({"masks": 1}, lambda s: s.flag("masks", False), "/b: postprocess.masks must be true or false, got 1"),
    ({"method": "x"}, lambda s: s.choice("method", ("greedy",), "greedy"),
     "/b: postprocess.method must be one of ['greedy'], got 'x'"),
    ({}, lambda s: s.number("slide_crop", integer=True, min=1), "/b: postprocess.slide_crop is missing"),
    ({"decoding": 3}, lambda s: s.section("decoding"), "/b: postprocess.decoding must be an object, got 3"),
])
def test_a_bad_manifest_setting_is_the_bundles_error(data: dict[str, Any], read: Any, message: str) -> None:
    with pytest.raises(BundleError) as err:
        read(_section(data))
    assert str(err.value) == message


def test_nested_sections_and_absent_sections() -> None:
    m = parse_manifest(FAMILIES["captioner"])
    cap = m.section("caption", where="/b")
    assert cap.present and cap.section("decoding").number("num_beams", 1, integer=True, min=1) == 3
    with pytest.raises(BundleError, match="/b: caption.decoding.method must be one of"):
        cap.section("decoding").choice("method", ("greedy",), "greedy")
    assert not m.section("segment").present and len(m.section("segment")) == 0


# -- recording engines -----------------------------------------------------------------------------------
def _bundle(tmp_path: Path) -> Bundle:
    with BundleWriter(tmp_path / "b") as w:
        w.path("detector.onnx").write_bytes(b"onnx")
        data = {k: v for k, v in FAMILIES["tiny-embed"].items() if k not in ("files", "created", "vlexport")}
        data["parts"] = {"detector": _part({"fp32": "detector.onnx"}, DETECT_OUT)}
        root = w.commit(data)
    (root / "detector.fp16.0123456789abcdef.engine").write_bytes(b"engine one")  # built, not yet recorded
    return Bundle.open(root)


def _record(file: str, data: bytes, **key: Any) -> EngineRecord:
    import hashlib

    return EngineRecord(file=file, sha256=f"sha256:{hashlib.sha256(data).hexdigest()}",
                        key={**ENGINE["key"], **key}, onnx="detector.onnx", built="2026-01-01T00:00:00+00:00")


def test_record_engine_writes_through_the_one_writer(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    first = _record("detector.fp16.0123456789abcdef.engine", b"engine one")
    assert b.record_engine("detector", "fp16", first) == set()
    again = Bundle.open(b.root)
    assert again.part("detector").engines["fp16"] == first
    assert again.manifest["files"][first.file] == first.sha256 and again.verify(first.file).is_file()
    # A new engine for the same (part, precision) replaces the entry; the old file leaves the hashes.
    (b.root / "detector.fp16.fedcba9876543210.engine").write_bytes(b"engine two")
    second = _record("detector.fp16.fedcba9876543210.engine", b"engine two", gpu_name="NVIDIA H100")
    assert b.record_engine("detector", "fp16", second) == {first.file}
    assert first.file not in read_manifest(b.manifest_path).files
    Bundle.open(b.root).verify_all()


def test_record_engine_keeps_the_previous_manifest_if_writing_fails(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    b = _bundle(tmp_path)
    before = b.manifest_path.read_bytes()
    record = _record("detector.fp16.0123456789abcdef.engine", b"engine one")
    # The rename that publishes the new manifest fails (a full or read-only disk).
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "manifest.json":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match="cannot update .*manifest.json: No space left on device"):
        b.record_engine("detector", "fp16", record)
    monkeypatch.setattr(os, "replace", real_replace)
    assert b.manifest_path.read_bytes() == before
    assert b.part("detector").engines == {} and record.file not in b.meta.files  # the open bundle too
    assert [p.name for p in b.root.iterdir() if p.name.endswith(".tmp")] == []
    # Failing halfway through writing the JSON (a value JSON cannot hold) leaves it intact as well.
    with pytest.raises(TypeError):
        b.record_engine("detector", "fp16", _record(record.file, b"engine one", gpu_name=object()))
    assert b.manifest_path.read_bytes() == before and b.part("detector").engines == {}
    Bundle.open(b.root).verify_all()


def test_manifest_dataclass_builds_what_the_writer_publishes(tmp_path: Path) -> None:
    from vlexport.runtime.manifest import PartRecord
    from vlexport.runtime.spec import TensorSpec

    io = PartSignature(inputs=(TensorSpec("images", "float32", ("batch", 3, 8, 8)),),
                       outputs=(TensorSpec("embeddings", "float32", ("batch", 4)),))
    with BundleWriter(tmp_path / "b") as w:
        w.path("image_encoder.onnx").write_bytes(b"onnx")
        root = w.commit(Manifest(family="tiny", task="embed", preset="t", preprocess=dict(LETTERBOX),
                                 parts={"image_encoder": PartRecord("image_encoder", io, {"fp32": "image_encoder.onnx"})},
                                 extra={"warnings": []}))
    b = Bundle.open(root)
    assert b.meta.schema == SCHEMA and b.part("image_encoder").io == io and b.verify_all() == ["image_encoder.onnx"]
    assert list(b.manifest)[-3:] == ["created", "vlexport", "files"]
