"""`vlexport triton`: repositories of both layouts whose every config parses against Triton's own
ModelConfig schema, written atomically, from verified bundles."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from serve_helpers import write_bundle
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import vlexport.serve.repository as repository
from vlexport.cli import cli
from vlexport.errors import BundleError, ExportError, OutputError, UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.manifest import EngineRecord
from vlexport.serve import contract as c
from vlexport.serve.config import check_config
from vlexport.serve.repository import write_repository

PYTHON_MODEL = Path(repository.__file__).with_name("python_model.py")


def parsed(repo: Path, name: str) -> model_config_pb2.ModelConfig:
    """The model's config.pbtxt as Triton's server parses it."""
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def tensors(entries) -> list[tuple[str, str, list[int]]]:
    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in entries]


def params(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_python_layout_for_detect_segment_and_caption(detect_bundle, tiny_segment_bundle, caption_bundle, tmp_path):
    report = write_repository([detect_bundle, tiny_segment_bundle, caption_bundle], tmp_path / "repo",
                              names=["yolo", "seg", "cap"], max_batch_size=4, max_queue_delay_us=500,
                              preferred_batch_sizes=[4, 2], instances=2, instance_kind="gpu", precision="fp32")
    repo = report.root
    assert report.names == ["yolo", "seg", "cap"] and sorted(p.name for p in repo.iterdir()) == ["cap", "seg", "yolo"]
    for name, task in (("yolo", "detect"), ("seg", "segment"), ("cap", "caption")):
        config = parsed(repo, name)
        assert config.name == name and config.backend == "python" and config.max_batch_size == 4
        assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
            (2, "KIND_GPU")]
        assert tensors(config.input) == [("IMAGE", "TYPE_STRING", [1]), ("IMAGE_BGR", "TYPE_UINT8", [-1, -1, 3])]
        assert all(t.optional for t in config.input)
        assert tensors(config.output) == [(t.name, t.data_type, list(t.dims)) for t in c.outputs_for(task)]
        p = params(config)
        assert p["vlexport_task"] == task and p["precision"] == "fp32" and p["backend"] == ""
        version = repo / name / "1"
        assert (version / "model.py").read_bytes() == PYTHON_MODEL.read_bytes()
        copy = Bundle.open(version / "bundle")
        assert sorted(copy.verify_all()) == sorted(Bundle.open(report.models[["yolo", "seg", "cap"].index(name)].bundle)
                                                   .meta.files)
    assert json.loads(params(parsed(repo, "yolo"))["vlexport_classes"]) == ["person", "bus", "car"]
    assert json.loads(params(parsed(repo, "seg"))["vlexport_classes"]) == Bundle.open(tiny_segment_bundle).section(
        "segment")["classes"]
    assert "yolo [python, max_batch_size 4]" in report.summary() and "CLASS_NAMES STRING [-1]" in report.summary()


def test_ensemble_layout_for_detect_and_segment(detect_bundle, tiny_segment_bundle, tmp_path):
    report = write_repository([detect_bundle, tiny_segment_bundle], tmp_path / "repo", layout="ensemble",
                              names=["det", "seg"], instance_kind="KIND_GPU")
    repo = report.root
    assert report.names == ["det_preprocess", "det_detector", "det_postprocess", "det",
                            "seg_preprocess", "seg_segmenter", "seg_postprocess", "seg"]
    for name in report.names:
        assert parsed(repo, name).name == name
    part = parsed(repo, "det_detector")
    assert part.platform == "onnxruntime_onnx" and part.max_batch_size == 8 and part.dynamic_batching is not None
    assert tensors(part.input) == [("images", "TYPE_FP32", [3, 640, 640])]
    assert tensors(part.output) == [("boxes", "TYPE_FP32", [-1, 4]), ("scores", "TYPE_FP32", [-1]),
                                    ("class_ids", "TYPE_INT32", [-1])]
    assert part.default_model_filename == "detector.onnx" and (repo / "det_detector" / "1" / "detector.onnx").is_file()
    ens = parsed(repo, "det")
    assert ens.platform == "ensemble" and ens.max_batch_size == 8
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["det_preprocess", "det_detector", "det_postprocess"]
    assert dict(steps[1].input_map) == dict((k, v) for k, v in steps[0].output_map.items() if k == "images")
    assert set(steps[2].input_map.values()) == set(steps[1].output_map.values()) | {"GEOMETRY"}
    assert tensors(ens.output) == [(t.name, t.data_type, list(t.dims)) for t in c.TASK_OUTPUTS["detect"]]
    pre = parsed(repo, "det_preprocess")
    assert pre.backend == "python" and params(pre) == {"stage": "preprocess", "part": "detector"}
    # The pre/post-processing copies hold the manifest and the small files, not the graph.
    held = sorted(p.name for p in (repo / "det_postprocess" / "1" / "bundle").iterdir())
    assert held == ["manifest.json", "vocab.npz"]
    seg = parsed(repo, "seg_segmenter")
    # The multiscale export fixes its batch at 1: no batch dim, full dims.
    assert seg.max_batch_size == 0 and tensors(seg.output) == [("logits", "TYPE_FP32", [1, 1, 128, 128])]
    assert tensors(parsed(repo, "seg").output) == [("LABEL_MAP", "TYPE_INT32", [1, -1, -1])]


def test_a_fixed_batch_of_one_gives_max_batch_size_0_and_full_dims(tmp_path):
    bundle = write_bundle(tmp_path / "fixed", batch=1)
    repo = write_repository([bundle], tmp_path / "repo", layout="ensemble").root
    part = parsed(repo, "fixed_detector")
    assert part.max_batch_size == 0 and not part.HasField("dynamic_batching")
    assert tensors(part.input) == [("images", "TYPE_FP32", [1, 3, 640, 640])]
    assert parsed(repo, "fixed").max_batch_size == 0
    assert tensors(parsed(repo, "fixed").input) == [("IMAGE", "TYPE_STRING", [1, 1])]
    assert tensors(parsed(repo, "fixed_preprocess").output)[-1] == ("GEOMETRY", "TYPE_FP64", [1, 7])


def test_built_engines_give_a_tensorrt_plan_model(detect_bundle, tmp_path):
    built = tmp_path / "built"
    shutil.copytree(detect_bundle, built)
    engine = built / "engines" / "detector.fp16.plan"
    engine.parent.mkdir()
    engine.write_bytes(b"a serialized TensorRT engine stands here")
    sha = "sha256:" + hashlib.sha256(engine.read_bytes()).hexdigest()
    Bundle.open(built).record_engine("detector", "fp16", EngineRecord(
        file="engines/detector.fp16.plan", sha256=sha, key={"trt": "10.0"}, onnx="detector.onnx",
        built="2026-01-01T00:00:00", profile={"images": [[1, 3, 640, 640], [2, 3, 640, 640], [4, 3, 640, 640]]}))
    repo = write_repository([built], tmp_path / "repo", layout="ensemble", max_batch_size=16).root
    part = parsed(repo, "built_detector")
    assert part.platform == "tensorrt_plan" and part.default_model_filename == "detector.fp16.plan"
    assert part.max_batch_size == 4  # the engine's profile caps --max-batch
    assert (repo / "built_detector" / "1" / "detector.fp16.plan").read_bytes() == engine.read_bytes()
    assert parsed(repo, "built").max_batch_size == 4


def test_multi_pass_bundles_are_refused_in_the_ensemble_layout(caption_bundle, tmp_path):
    with pytest.raises(UsageError, match="serve it with --layout python"):
        write_repository([caption_bundle], tmp_path / "repo", layout="ensemble")
    assert not (tmp_path / "repo").exists()


def test_a_config_outside_the_schema_is_an_error_naming_the_model():
    with pytest.raises(ExportError, match=r"^model 'm': its config.pbtxt does not fit Triton's ModelConfig schema"):
        check_config("m", 'name: "m"\nmax_batch: 4\n')
    with pytest.raises(ExportError, match="model 'm'"):
        check_config("m", 'name: "m"\ninstance_group [ { kind: KIND_TPU } ]\n')
    with pytest.raises(ExportError, match="names the model 'other'"):
        check_config("m", 'name: "other"\n')


def test_an_interrupted_write_leaves_nothing(detect_bundle, tmp_path, monkeypatch):
    copies = []
    real_copy = shutil.copyfile

    def copy_then_interrupt(src, dst, **kwargs):
        if copies:
            raise KeyboardInterrupt  # Ctrl-C after the first file
        copies.append(dst)
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(repository.shutil, "copyfile", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_repository([detect_bundle], tmp_path / "repo")
    assert copies and not (tmp_path / "repo").exists() and leftovers(tmp_path) == []
    # Over an existing repository (--overwrite), the old one stays whole.
    monkeypatch.undo()
    write_repository([detect_bundle], tmp_path / "repo", names=["old"])
    copies.clear()
    monkeypatch.setattr(repository.shutil, "copyfile", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_repository([detect_bundle], tmp_path / "repo", names=["new"], overwrite=True)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["old"] and leftovers(tmp_path) == []


def test_overwrite_is_needed_to_replace(detect_bundle, tmp_path):
    write_repository([detect_bundle], tmp_path / "repo", names=["a"])
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        write_repository([detect_bundle], tmp_path / "repo", names=["b"])
    write_repository([detect_bundle], tmp_path / "repo", names=["b"], overwrite=True)
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["b"] and leftovers(tmp_path) == []


def test_a_tampered_bundle_writes_nothing(detect_bundle, tmp_path):
    other = write_bundle(tmp_path / "other")
    onnx_file = other / "detector.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="'detector.onnx' does not match its sha256"):
        write_repository([detect_bundle, other], tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and leftovers(tmp_path) == []


def test_bad_options_and_names(detect_bundle, tmp_path):
    out = tmp_path / "repo"
    cases = [
        (dict(names=["a", "b"]), "got 2 --name for 1 bundles"),
        (dict(names=["bad name"]), "model name 'bad name' is not usable"),
        (dict(layout="grpc"), "layout must be one of"),
        (dict(max_batch_size=0), "max batch size must be an integer of at least 1"),
        (dict(preferred_batch_sizes=[16]), "preferred batch size 16 is above the max batch size 8"),
        (dict(instance_kind="tpu"), "instance kind must be one of"),
        (dict(precision="int4"), "unknown precision 'int4'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            write_repository([detect_bundle], out, **kwargs)
    with pytest.raises(UsageError, match="two bundles would be served as 'yolo-tiny'"):
        write_repository([detect_bundle, detect_bundle], out)
    embed = write_bundle(tmp_path / "emb", task="embed")
    with pytest.raises(UsageError, match="is a embed bundle; Triton serves"):
        write_repository([embed], out)
    assert not out.exists()


def test_the_cli_writes_and_reports(detect_bundle, tiny_segment_bundle, tmp_path):
    runner = CliRunner()
    out = tmp_path / "repo"
    args = ["triton", str(detect_bundle), str(tiny_segment_bundle), "--out", str(out), "--name", "yolo",
            "--name", "seg", "--max-batch", "4", "--instances", "2", "--threads", "1"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (python layout, 2 model(s))" in result.output
    assert "seg [python, max_batch_size 4]" in result.output and "LABEL_MAP INT32 [-1, -1]" in result.output
    assert params(parsed(out, "yolo"))["threads"] == "1"
    again = runner.invoke(cli, args)
    assert again.exit_code == 1 and again.output.count("\n") == 1 and "--overwrite" in again.output
    assert runner.invoke(cli, args + ["--overwrite", "--layout", "ensemble", "--kind", "gpu"]).exit_code == 0
    assert parsed(out, "yolo_detector").platform == "onnxruntime_onnx"
    assert "Examples:" in runner.invoke(cli, ["triton", "--help"]).output
