"""CaptionTask: CLIP pre-processing, region mapping, Caption results and drawing, and the task on a
real exported (untrained, tiny) captioner compared with PyTorch token by token."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.draw import draw_caption, wrap_text
from vlexport.runtime.results import Caption, FrameStamp
from vlexport.runtime.tasks.caption import CropInfo, clip_preprocess, regions_to_source

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets")) / "tokenizers" / "gpt2"


def _frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# -- pre-processing ------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,size,resized,left,top", [
    (37, 53, 16, (22, 16), 3, 0),  # landscape: long side int(16 * 53 / 37) = 22
    (60, 30, 20, (20, 40), 0, 10),  # portrait
    (20, 25, 20, (25, 20), 2, 0),  # short side already right: no resize; (25 - 20) / 2 = 2.5 rounds to 2
    (24, 24, 24, (24, 24), 0, 0),  # already the network size
])
def test_clip_preprocess_equals_a_direct_computation(h, w, size, resized, left, top) -> None:
    bgr = _frame(h, w)
    tensor, info = clip_preprocess(bgr, size, MEAN, STD)
    assert tensor.shape == (1, 3, size, size) and tensor.dtype == np.float32
    assert info == CropInfo(src_shape=(h, w), resized=resized, left=left, top=top, size=size)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    img = rgb if resized == (w, h) else np.asarray(Image.fromarray(rgb).resize(resized, Image.Resampling.BICUBIC))
    want = np.empty((3, size, size))
    for c in range(3):
        want[c] = (img[top : top + size, left : left + size, c] / 255.0 - MEAN[c]) / STD[c]
    np.testing.assert_allclose(tensor[0], want, atol=1e-5)


def test_clip_preprocess_matches_torchvision_on_a_pil_image() -> None:
    """open_clip's Resize(size, BICUBIC) + CenterCrop(size) on the PIL image: same size, offsets and pixels."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    for h, w, size in [(37, 53, 16), (61, 30, 20), (20, 25, 20), (101, 77, 32), (30, 90, 48)]:  # last one enlarges
        bgr = _frame(h, w, seed=h)
        ours, info = clip_preprocess(bgr, size, (0, 0, 0), (1, 1, 1), scale=1.0)
        pil = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
        resized = tvf.resize(pil, size, interpolation=InterpolationMode.BICUBIC)
        assert resized.size == info.resized
        crop = np.asarray(tvf.center_crop(resized, size))
        np.testing.assert_array_equal(ours[0], crop.transpose(2, 0, 1).astype(np.float32))
        bgr_order, _ = clip_preprocess(bgr, size, (0, 0, 0), (1, 1, 1), scale=1.0, rgb=False)
        np.testing.assert_array_equal(bgr_order[0], ours[0][::-1])


def test_crop_info_maps_the_crop_back_to_the_centre_of_the_frame() -> None:
    # A 200x100 (w x h) frame at size 50: resized to 100x50, crop starts at x = 25 (50 source pixels).
    _, info = clip_preprocess(_frame(100, 200), 50, MEAN, STD)
    assert info.resized == (100, 50) and info.left == 25
    np.testing.assert_allclose(info.to_source(np.array([[0, 0, 50, 50], [-10, -5, 60, 70]])),
                               [[50, 0, 150, 100], [30, 0, 170, 100]])  # the second one clipped to the frame


def test_regions_to_source_thresholds_sorts_and_maps() -> None:
    info = CropInfo(src_shape=(100, 200), resized=(100, 50), left=25, top=0, size=50)
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]], np.float32)
    objectness = np.array([0.5, -3.0, 2.0], np.float32)  # probabilities 0.62, 0.05, 0.88
    class_logits = np.array([[0, 1, 0], [5, 0, 0], [2, 0, 3]], np.float32)
    xyxy, prob, ids = regions_to_source(boxes, objectness, class_logits, info, 0.5)
    np.testing.assert_allclose(prob, [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-0.5))], rtol=1e-6)
    assert ids.tolist() == [2, 1]
    # Region 2: cx, cy, w, h = 12.5, 25, 25, 50 input pixels -> x 0..25, y 0..50 -> source x 50..100, y 0..100.
    # Region 0: x 20..30, y 15..35 -> source x 90..110, y 30..70.
    np.testing.assert_allclose(xyxy, [[50, 0, 100, 100], [90, 30, 110, 70]], atol=1e-4)
    empty = regions_to_source(boxes, objectness, class_logits, info, 0.99)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,) and empty[2].shape == (0,)


# -- results and drawing --------------------------------------------------------------------------
def test_caption_result_validates_and_serialises() -> None:
    stamp = FrameStamp(3, 1.5, 1700000000.25)
    c = Caption("a bus", [257, 1323], -1.23456, stamp, boxes=[[1, 2, 3, 4]], objectness=[0.9],
                class_ids=[5], labels=["bus"])
    d = c.to_dict()
    assert d == {"frame": 3, "t_monotonic": 1.5, "t_wall": 1700000000.25, "caption": "a bus",
                 "token_ids": [257, 1323], "score": -1.2346,
                 "regions": [{"box": [1.0, 2.0, 3.0, 4.0], "objectness": 0.9, "class_id": 5, "label": "bus"}]}
    assert json.loads(json.dumps(d)) == d
    plain = Caption("a bus", [257, 1323])
    assert "regions" not in plain.to_dict() and plain.regions() == []
    with pytest.raises(ValueError, match="give both or neither"):
        Caption("x", [1], boxes=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="objectness: got shape"):
        Caption("x", [1], boxes=np.zeros((2, 4)), objectness=np.zeros(3))
    with pytest.raises(ValueError, match="token_ids"):
        Caption("x", [1.5])


def test_wrap_text_keeps_lines_inside_the_width() -> None:
    text = "a very long caption about a red double decker bus parked next to a supercalifragilisticexpialidocious sign"
    lines = wrap_text(text, 150, 0.5, 1)
    assert len(lines) > 2
    assert all(cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0] <= 150 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")  # nothing lost, long word cut


def test_draw_caption_puts_a_dark_band_at_the_bottom_and_leaves_the_input_alone() -> None:
    frame = np.full((240, 320, 3), 200, np.uint8)
    before = frame.copy()
    out = draw_caption(frame, Caption("a grey wall " * 8, [1]))
    np.testing.assert_array_equal(frame, before)
    assert out.shape == frame.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:100], frame[:100])  # the picture above the band is untouched
    dark = np.flatnonzero(np.median(out.reshape(240, -1), axis=1) < 100)  # the band's rows
    assert dark.size > 30 and dark.max() == 239 and np.all(np.diff(dark) == 1)  # several lines, at the bottom
    white = np.flatnonzero(out.reshape(240, -1).max(axis=1) == 255)  # white text, inside the band only
    assert white.size and white.min() >= dark.min()
    # Regions are drawn as boxes; an empty caption draws no band.
    boxed = draw_caption(frame, Caption("", [], boxes=[[10, 10, 100, 100]], objectness=[0.9]))
    assert not np.array_equal(boxed[10, 10:100], frame[10, 10:100])
    np.testing.assert_array_equal(boxed[200:], frame[200:])


def test_caption_task_is_registered_and_refuses_other_bundles(tmp_path: Path) -> None:
    from conftest import write_bundle

    import vlexport.runtime as vr
    from vlexport.runtime.tasks import TASKS, task_class
    from vlexport.runtime.tasks.caption import CaptionTask

    assert "caption" in TASKS and task_class("caption") is CaptionTask
    root = write_bundle(tmp_path / "b", size=(64, 64))
    with pytest.raises(BundleError, match="no 'caption' settings"):
        vr.load(root, task="caption")
    with pytest.raises(UsageError, match="unknown caption option"):
        vr.load(root, task="caption", score_threshold=0.3)


# -- the task on a real exported captioner --------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny, untrained captioner (random weights) saved and exported once: FP32, max_length 6."""
    torch = pytest.importorskip("torch")
    if not (TOKENIZER / "encoder.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {TOKENIZER}")
    from vlexport.export.captioner import CaptionerExportOptions, export_captioner
    from vlexport.models.captioner.model import build_captioner, load_captioner, save_captioner

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("caption")
    ckpt = save_captioner(build_captioner("tiny").eval(), tmp / "tiny.pt")
    report = export_captioner(CaptionerExportOptions(out=tmp / "bundle", checkpoint=ckpt, tokenizer=str(TOKENIZER),
                                                     parity_count=1, parity_steps=2, max_length=6))
    return load_captioner(ckpt).eval(), report.path


def _frames() -> list[np.ndarray]:
    return [_frame(120, 160, seed=1), _frame(90, 70, seed=2)]


def _tensors(model, frames):
    import torch

    enc = model.encoder
    return [torch.from_numpy(clip_preprocess(f, enc.image_size, enc.mean, enc.std)[0]) for f in frames]


def _torch_step(model):
    """PyTorch's decoder step in the decoding module's step-function form (None past = empty)."""
    import torch

    from vlexport.models.captioner.model import CaptionDecoderStep
    from vlexport.models.captioner.gpt2 import empty_cache

    step = CaptionDecoderStep(model.gpt2).eval()

    @torch.no_grad()
    def fn(prefix, ids, mask, past):
        b = ids.shape[0]
        past_t = empty_cache(model.gpt2.config, b) if past is None else torch.from_numpy(past)
        logits, present = step(torch.from_numpy(prefix), torch.from_numpy(ids), torch.from_numpy(mask), past_t)
        return logits.numpy(), present.numpy()

    return fn


def test_greedy_captions_equal_pytorchs_tokens(exported) -> None:
    import vlexport.runtime as vr
    from vlexport.runtime.tasks.caption import CaptionTask
    from vlexport.runtime.tokenizer import GPT2Tokenizer

    model, root = exported
    frames = _frames()
    tok = GPT2Tokenizer.from_folder(TOKENIZER)
    with vr.load(root) as task:
        assert isinstance(task, CaptionTask) and task.precision == "fp32" and task.decoder_precision == "fp32"
        caps = task.caption_batch(frames, [FrameStamp(i, 0.0, 0.0) for i in range(2)])
        assert set(task.timings) == {"preprocess", "infer", "postprocess"}
        d = task.describe()
        assert d["decoder_backend"] == "onnxruntime" and d["method"] == "greedy" and d["max_length"] == 6
    for frame, x, cap in zip(frames, _tensors(model, frames), caps):
        want = model.generate(x, max_length=6)[0]
        assert cap.token_ids == want
        assert cap.text == tok.decode(want).strip()
    assert caps[1].stamp.index == 1


def test_beam_search_and_the_uncached_loop_match_pytorch(exported) -> None:
    import torch

    import vlexport.runtime as vr
    from vlexport.runtime.decoding import beam_search

    model, root = exported
    frame = _frames()[0]
    with torch.no_grad():
        prefix = model.encoder(_tensors(model, [frame])[0]).numpy()
    want = beam_search(_torch_step(model), prefix, num_beams=3, max_length=6, eos_token_id=50256,
                       length_penalty=0.5, repetition_penalty=1.3)
    with vr.load(root, method="beam", num_beams=3, length_penalty=0.5, repetition_penalty=1.3) as task:
        got = task.caption(frame)
        steps = task.last_steps
    assert got.token_ids == want.token_ids and got.score == pytest.approx(want.score, abs=1e-3)
    with vr.load(root, method="beam", num_beams=3, length_penalty=0.5, repetition_penalty=1.3,
                 use_cache=False) as task:
        again = task.caption(frame)
        assert again.token_ids == got.token_ids and task.last_steps == steps


def test_regions_are_the_encoders_predictions_in_source_pixels(exported) -> None:
    import torch

    import vlexport.runtime as vr
    from vlexport.models.captioner.model import CaptionEncoderGraph

    model, root = exported
    frame = _frames()[0]  # 160x120 (w x h): the crop is the central square
    with torch.no_grad():
        _, boxes, obj, cls = (t[0].numpy() for t in CaptionEncoderGraph(model)(_tensors(model, [frame])[0]))
    with vr.load(root, objectness_threshold=0.0) as task:
        cap = task.caption(frame)
        names = task.settings["region_classes"]
    order = np.argsort(-obj, kind="stable")
    s = model.encoder.image_size
    # The short side (120 px) becomes s px, the long one int(s * 160 / 120): per-axis gains; the crop
    # starts half the excess from the left.
    new_w = int(s * 160 / 120)
    gx, gy, left = new_w / 160, s / 120, round((new_w - s) / 2)
    cx, cy, w, h = (boxes[order] * s).T
    want = np.stack([(cx - w / 2 + left) / gx, (cy - h / 2) / gy, (cx + w / 2 + left) / gx, (cy + h / 2) / gy], 1)
    want = np.clip(want, 0, [160, 120, 160, 120])
    np.testing.assert_allclose(cap.boxes, want, atol=1e-2)
    np.testing.assert_allclose(cap.objectness, 1 / (1 + np.exp(-obj[order])), atol=1e-5)
    assert cap.class_ids.tolist() == cls[order].argmax(1).tolist()
    assert cap.labels == [names[i] for i in cap.class_ids]


def test_option_and_bundle_errors(exported, tmp_path: Path) -> None:
    import vlexport.runtime as vr

    _, root = exported
    with pytest.raises(UsageError, match="max length must be at least 1"):
        vr.load(root, max_length=0)
    with pytest.raises(UsageError, match="decoding method"):
        vr.load(root, method="sampling")
    with pytest.raises(UsageError, match="exceeds the decoder's 128 positions"):
        vr.load(root, max_length=200)  # the tiny GPT-2 has 128 positions
    with pytest.raises(UsageError, match="unknown caption option"):
        vr.load(root, temperature=0.7)
    with pytest.raises(BundleError, match="has no int8 file"):
        vr.load(root, precision="int8")

    def broken(change) -> Path:
        copy = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(root, copy)
        m = json.loads((copy / "manifest.json").read_text())
        change(m, copy)
        (copy / "manifest.json").write_text(json.dumps(m))
        return copy

    gone = broken(lambda m, c: (c / "tokenizer" / "vocab.json").unlink())
    with pytest.raises(BundleError, match="tokenizer/vocab.json"):
        vr.load(gone)
    prefix = broken(lambda m, c: m["caption"].update(prefix_length=5))
    with pytest.raises(BundleError, match="the encoder makes 4 prefix tokens but the decoder was exported for 5"):
        vr.load(prefix)
    layers = broken(lambda m, c: m["caption"].update(num_layers=3))
    with pytest.raises(BundleError, match="past_key_values"):
        vr.load(layers)
    eos = broken(lambda m, c: m["caption"].update(eos_token_id=50255))
    with pytest.raises(BundleError, match="end-of-text token is 50256"):
        vr.load(eos)
    bad_len = broken(lambda m, c: m["caption"].update(max_length=0))
    with pytest.raises(BundleError, match="max length must be at least 1"):
        vr.load(bad_len)
