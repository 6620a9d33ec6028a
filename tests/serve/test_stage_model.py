"""The ensemble's pre/post-processing models without the server: the runtime's letterbox and
selection around the part, run here with onnxruntime, give the runtime task's own results."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import decoded

import vlexport.runtime as vr
from vlexport.errors import BundleError
from vlexport.serve import contract as c
from vlexport.serve.repository import write_repository
from vlexport.serve.stage_model import Stages, decode_geometry, encode_geometry, open_stage_bundle


def _through_stages(repo, name, part, frames):
    """Pre-process, run the part file the repository holds (onnxruntime), post-process: what the ensemble does."""
    import onnxruntime as ort

    pre = Stages(open_stage_bundle(repo / f"{name}_preprocess" / "1" / "bundle"), part)
    post = Stages(open_stage_bundle(repo / f"{name}_postprocess" / "1" / "bundle"), part)
    feeds = pre.preprocess(frames)
    geometry = feeds.pop("GEOMETRY")
    [graph] = (repo / f"{name}_{part}" / "1").glob("*.onnx")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds)))
    return post.postprocess(outputs, geometry)


@pytest.mark.parametrize("kind", ["detect", "segment"])
def test_the_ensemble_stages_equal_the_runtime(kind, detect_bundle, segment_bundle, photos, tmp_path):
    bundle = detect_bundle if kind == "detect" else segment_bundle
    part = "detector" if kind == "detect" else "segmenter"
    source = tmp_path / "source"
    bundle.rename(source)
    repo = write_repository([source], tmp_path / "repo", layout="ensemble", names=["m"]).root
    frames = [decoded(photos["bus.jpg"]), decoded(photos["zidane.jpg"])]
    arrays = _through_stages(repo, "m", part, frames)
    with vr.load(source, backend="onnxruntime") as task:
        local = task.detect_batch(frames) if kind == "detect" else task.segment_batch(frames)
        classes = task.classes
    for got, want in zip(c.results_from_outputs(kind, arrays, classes=classes), local):
        if kind == "detect":
            assert got.records() == want.records() and len(want) > 0
        else:
            np.testing.assert_array_equal(got.label_map, want.label_map)


def test_geometry_round_trip(detect_bundle, photos):
    from vlexport.runtime.preprocess import Preprocessor

    _, [info] = Preprocessor(vr.Bundle.open(detect_bundle).preprocess).batch([decoded(photos["bus.jpg"])])
    assert decode_geometry(encode_geometry(info)) == info


def test_a_tampered_stage_copy_is_refused(detect_bundle, tmp_path):
    repo = write_repository([detect_bundle], tmp_path / "repo", layout="ensemble", names=["m"]).root
    vocab = repo / "m_postprocess" / "1" / "bundle" / "vocab.npz"
    vocab.write_bytes(b"changed")
    with pytest.raises(BundleError, match="does not match its sha256"):
        open_stage_bundle(vocab.parent)
