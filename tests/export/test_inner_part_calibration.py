"""An inner part (fed by another part) calibrates on what the preceding part really outputs."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from vlexport.data.readers import calibration_frames
from vlexport.export.part import Part
from vlexport.export.bundle_export import ExportPlan, PrecisionOptions, write_bundle
from vlexport.export.samples import parity_batch
from vlexport.runtime.preprocess import Preprocessor
from vlexport.runtime.spec import PartSignature, TensorSpec

PRE = {"size": [64, 64], "resize": "letterbox", "pad_value": 114, "color": "RGB",
       "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]}


def test_decoder_calibrates_from_recorded_encoder_outputs(tmp_path, assets):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU()).eval()
    head = nn.Conv2d(8, 4, 1).eval()
    images, source = parity_batch(PRE, str(assets / "images"), 2)
    enc_part = Part("encoder", encoder, PartSignature((TensorSpec("images", "float32", (1, 3, 64, 64)),),
                                               (TensorSpec("features", "float32", (1, 8, 16, 16)),)),
                    make_inputs=lambda x: (x,))
    head_part = Part("head", head, PartSignature((TensorSpec("features", "float32", (1, 8, 16, 16)),),
                                          (TensorSpec("out", "float32", (1, 4, 16, 16)),)),
                     make_inputs=lambda x: (encoder(x).detach(),), quantize=True,
                     calib_from="encoder", calib_feeds=lambda rec: {"features": rec["features"]})
    plan = ExportPlan(family="test", task="test", preset="t", parts=[enc_part, head_part], parity_images=images,
                      parity_source=source, preprocess=PRE)
    calib_src = str(assets / "coco128" / "images" / "train2017")
    out = tmp_path / "b"
    write_bundle(plan, out, precision=PrecisionOptions(int8=True, calib=calib_src, calib_size=4, calib_method="minmax"))

    # What the encoder outputs on the calibration images, through the same pre-processing.
    pre = Preprocessor(PRE)
    frames = calibration_frames(calib_src, 4, seed=0).frames
    with torch.no_grad():
        feats = [encoder(torch.from_numpy(pre(f)[0])).numpy() for f in frames]
    expected_scale = max(np.abs(f).max() for f in feats) / 127.0

    q = onnx.load(str(out / "head.int8.onnx"))
    consts = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    quant = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "features"]
    assert len(quant) == 1
    scale = float(consts[quant[0].input[1]])
    assert abs(scale - expected_scale) / expected_scale < 1e-3
    assert not (out / "encoder.int8.onnx").exists()  # only parts marked quantize get INT8
