"""The captioner end to end: train a tiny one on real photos, export it, decode with the runtime.

The tiny model is trained until PyTorch's greedy decode reproduces every training caption; the
exported bundle must then give exactly PyTorch's tokens (and so the captions), image by image.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vlexport.errors import BundleError, UsageError  # noqa: E402

N_IMAGES = 4


@pytest.fixture(scope="module")
def tokenizer_dir(assets):
    return assets / "tokenizers" / "gpt2"


@pytest.fixture(scope="module")
def trained(assets, tokenizer_dir, tmp_path_factory):
    """A tiny captioner trained on 4 COCO128 photos with captions written from their labels."""
    from vlexport.models.captioner.train import load_caption_data, train_captioner
    from vlexport.models.captioner.model import build_captioner, save_captioner
    from vlexport.runtime.tokenizer import GPT2Tokenizer

    samples = []
    for s in load_caption_data(assets / "coco128" / "data.yaml"):
        if s.caption not in {x.caption for x in samples}:
            samples.append(s)
        if len(samples) == N_IMAGES:
            break
    tok = GPT2Tokenizer.from_folder(tokenizer_dir)
    torch.manual_seed(0)
    model = build_captioner("tiny")
    losses = train_captioner(model, samples, tok, steps=150, lr=3e-3, batch_size=N_IMAGES, progress=False)
    ckpt = save_captioner(model, tmp_path_factory.mktemp("cap") / "captioner.pt")
    return model, samples, tok, losses, ckpt


def _images(samples, model):
    from vlexport.data.readers import read_image
    from vlexport.runtime.tasks.caption import clip_preprocess

    enc = model.encoder
    return [read_image(s.image) for s in samples], torch.cat([
        torch.from_numpy(clip_preprocess(read_image(s.image), enc.image_size, enc.mean, enc.std)[0]) for s in samples])


def test_tiny_captioner_learns_to_reproduce_its_captions(trained):
    model, samples, tok, losses, _ = trained
    assert losses[-1] < 0.1 * losses[0]
    _, x = _images(samples, model)
    tokens = model.generate(x, max_length=20)
    for s, t in zip(samples, tokens):
        assert tok.decode(t).strip() == s.caption


def test_checkpoint_round_trip_gives_the_same_tokens(trained):
    from vlexport.models.captioner.model import load_captioner

    model, samples, _, _, ckpt = trained
    again = load_captioner(ckpt)
    _, x = _images(samples, model)
    assert again.generate(x, max_length=20) == model.generate(x, max_length=20)


@pytest.fixture(scope="module")
def trained_bundle(trained, tokenizer_dir, tmp_path_factory):
    from vlexport.export.captioner import CaptionerExportOptions, export_captioner
    from vlexport.export.bundle_export import PrecisionOptions

    _, samples, _, _, ckpt = trained
    out = tmp_path_factory.mktemp("bundles") / "cap"
    report = export_captioner(CaptionerExportOptions(
        out=out, checkpoint=ckpt, tokenizer=str(tokenizer_dir), parity_source=str(samples[0].image.parent),
        parity_count=2, max_length=20, precision=PrecisionOptions(fp16=True)))
    return report


def test_export_records_whole_decode_parity(trained_bundle):
    manifest = json.loads((trained_bundle.path / "manifest.json").read_text())
    decode = manifest["validation"]["decode"]
    assert decode["fp32"]["steps"] == 20
    assert decode["fp32"]["prefix_max_abs"] < 1e-4
    assert decode["fp32"]["logits_max_abs"] < 1e-3
    assert decode["fp32"]["tokens_identical"] == 1.0
    assert decode["fp16"]["tokens_identical"] > 0.9
    assert manifest["caption"]["prefix_length"] == 4
    assert (trained_bundle.path / "tokenizer" / "vocab.json").is_file()
    assert "tokenizer/merges.txt" in manifest["files"]


def test_runtime_greedy_decode_gives_pytorchs_tokens_image_by_image(trained, trained_bundle):
    from vlexport.runtime import load

    model, samples, _, _, _ = trained
    frames, x = _images(samples, model)
    expected = model.generate(x, max_length=20)
    with load(trained_bundle.path, precision="fp32") as task:
        for frame, want, s in zip(frames, expected, samples):
            cap = task.caption(frame)
            assert cap.token_ids == want
            assert cap.text.strip() == s.caption
        # The recompute path (no cache) decodes the same tokens.
    with load(trained_bundle.path, precision="fp32", use_cache=False) as task:
        assert task.caption(frames[0]).token_ids == expected[0]


def test_beam_search_on_the_trained_model_finds_the_caption(trained, trained_bundle):
    from vlexport.runtime import load

    model, samples, _, _, _ = trained
    frames, _ = _images(samples, model)
    with load(trained_bundle.path, precision="fp32", method="beam", num_beams=3) as task:
        assert task.caption(frames[1]).text.strip() == samples[1].caption


# ----------------------------------------------------------------------------------- bad input
def test_missing_tokenizer_files_are_one_clear_error(trained, tmp_path):
    from vlexport.export.captioner import CaptionerExportOptions, export_captioner

    empty = tmp_path / "tok"
    empty.mkdir()
    with pytest.raises(UsageError, match="vocab"):
        export_captioner(CaptionerExportOptions(out=tmp_path / "b", checkpoint=trained[4], tokenizer=str(empty)))
    assert not (tmp_path / "b").exists()


def test_bundle_whose_tokenizer_file_is_gone_fails_at_load(trained_bundle, tmp_path):
    from vlexport.runtime import load

    copy = tmp_path / "cap"
    shutil.copytree(trained_bundle.path, copy)
    (copy / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(BundleError, match="merges.txt"):
        load(copy)


def test_encoder_and_decoder_disagreeing_on_the_prefix_is_refused(trained_bundle, tmp_path):
    from vlexport.runtime import load

    copy = tmp_path / "cap"
    shutil.copytree(trained_bundle.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["caption"]["prefix_length"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="prefix"):
        load(copy)


def test_max_length_zero_is_refused(trained_bundle):
    from vlexport.runtime import load

    with pytest.raises(UsageError, match="at least 1"):
        load(trained_bundle.path, max_length=0)


def test_cli_export_refuses_max_length_zero_in_one_line(trained, tokenizer_dir, tmp_path):
    from click.testing import CliRunner

    from vlexport.cli import cli

    res = CliRunner().invoke(cli, ["captioner", "--checkpoint", str(trained[4]), "--tokenizer", str(tokenizer_dir),
                                   "--max-length", "0", "--out", str(tmp_path / "b")])
    assert res.exit_code == 1
    assert "max-length must be at least 1" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------- real size
@pytest.mark.slow
def test_real_size_parity_vit_b32_gpt2_small(tokenizer_dir, tmp_path):
    """ViT-B/32 encoder + GPT-2 small (random weights): encoder < 1e-4, 20 cached steps < 1e-3, same tokens."""
    from vlexport.export.captioner import CaptionerExportOptions, export_captioner
    from vlexport.runtime import load

    report = export_captioner(CaptionerExportOptions(
        out=tmp_path / "cap", preset="vitb32-gpt2", tokenizer=str(tokenizer_dir), parity_count=1, parity_steps=20))
    decode = json.loads((report.path / "manifest.json").read_text())["validation"]["decode"]["fp32"]
    assert decode["prefix_max_abs"] < 1e-4
    assert decode["logits_max_abs"] < 1e-3
    assert decode["tokens_identical"] == 1.0
    parity = report.parity
    assert parity["encoder/fp32"]["prefix"]["max_abs"] < 1e-4
    assert parity["decoder/fp32"]["logits"]["max_abs"] < 1e-3
    frame = (np.arange(300 * 400 * 3) % 251).astype(np.uint8).reshape(300, 400, 3)
    with load(report.path, max_length=20) as task:
        cap = task.caption(frame)
    assert 1 <= len(cap.token_ids) <= 20


# ----------------------------------------------------------------------------------- video and CLI
def test_cli_run_captions_an_image_and_a_video_on_schedule(trained, trained_bundle, assets, tmp_path):
    from click.testing import CliRunner

    from vlexport.cli import cli

    _, samples, _, _, _ = trained
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(trained_bundle.path), "--source", str(samples[2].image),
                              "--jsonl", str(tmp_path / "one.jsonl"), "--save", str(tmp_path / "one.jpg"),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "one.jsonl").read_text().splitlines()[0])
    assert rec["frame"] == 0 and rec["caption"]["text"] == samples[2].caption
    assert (tmp_path / "one.jpg").stat().st_size > 0
    photos = tmp_path / "photos"  # a folder of photos is not a stream: every one is captioned
    photos.mkdir()
    for s in samples:
        shutil.copy(s.image, photos / s.image.name)
    res = runner.invoke(cli, ["run", str(trained_bundle.path), "--source", str(photos), "--jsonl",
                              str(tmp_path / "all.jsonl"), "--no-progress"])
    assert res.exit_code == 0, res.output
    texts = [json.loads(line)["caption"]["text"] for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert texts == [s.caption for s in sorted(samples, key=lambda s: s.image.name)]
    res = runner.invoke(cli, ["run", str(trained_bundle.path), "--source", str(assets / "video" / "car-detection.mp4"),
                              "--caption-every-frames", "3", "--max-frames", "7", "--jsonl", str(tmp_path / "v.jsonl"),
                              "--save", str(tmp_path / "v.mp4"), "--no-progress"])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(7))
    captioned = [r["frame"] for r in records if "caption" in r]
    assert captioned == [0, 3, 6]  # every 3rd frame, each caption attached to the frame it was computed on
    import cv2

    cap = cv2.VideoCapture(str(tmp_path / "v.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 7
    cap.release()


def test_cli_run_refuses_a_bundle_in_the_wrong_role(trained_bundle, tiny_bundle, assets, tmp_path):
    from click.testing import CliRunner

    from vlexport.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["run", "--caption", str(tiny_bundle), "--source", str(assets / "images" / "bus.jpg"),
                              "--no-progress"])
    assert res.exit_code == 1 and "--caption" in res.output and "is a detect bundle" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["run", str(trained_bundle.path), "--caption", str(trained_bundle.path), "--source",
                              str(assets / "images" / "bus.jpg"), "--no-progress"])
    assert res.exit_code == 1 and "two caption bundles" in res.output


def test_int8_encoder_and_gated_weight_only_int8_decoder(trained, tokenizer_dir, tmp_path):
    """--int8: the encoder is calibrated (QDQ); the decoder gets 8-bit weights, kept because its greedy
    tokens still match PyTorch's; the runtime picks it on a CPU and captions as before."""
    from vlexport.export.captioner import CaptionerExportOptions, export_captioner
    from vlexport.export.bundle_export import PrecisionOptions
    from vlexport.runtime import load

    model, samples, _, _, ckpt = trained
    calib = str(samples[0].image.parent)
    report = export_captioner(CaptionerExportOptions(
        out=tmp_path / "cap8", checkpoint=ckpt, tokenizer=str(tokenizer_dir), parity_source=calib, max_length=20,
        precision=PrecisionOptions(int8=True, calib=calib, calib_size=8, int8_target="cpu")))
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["parts"]["decoder"]["files"]["int8"] == "decoder.int8.onnx"
    assert manifest["calibration"]["weight_only"]["decoder"]["quantized_nodes"] >= 1
    gate = manifest["validation"]["decode"]["decoder_int8_gate"]
    assert gate["kept"] and gate["tokens_identical"] >= gate["min_agreement"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(report.path / "decoder.int8.onnx")).graph.node}
    assert "MatMulNBits" in ops
    # 4-bit weights (--decoder-bits 4): a trained model's greedy tokens still match PyTorch's.
    from vlexport.calibration.weight_only import quantize_weights
    from vlexport.export.captioner import decode_parity

    info = quantize_weights(report.path / "decoder.onnx", tmp_path / "decoder.w4.onnx", bits=4)
    assert info["bits"] == 4 and info["block_size"] == 32
    bits = [a.i for n in onnx.load(str(tmp_path / "decoder.w4.onnx")).graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"]
    assert bits and set(bits) == {4}
    _, x = _images(samples, model)
    w4 = decode_parity(model, report.path / "encoder.onnx", tmp_path / "decoder.w4.onnx", x, 20)
    assert w4["tokens_identical"] >= 0.95
    frames, _ = _images(samples, model)
    with load(report.path) as task:  # CPU default: the int8 decoder (and the cpu-target int8 encoder)
        assert task.decoder_precision == "int8"
        texts = [task.caption(f).text.strip() for f in frames]
    assert sum(t == s.caption for t, s in zip(texts, samples)) >= len(samples) - 1


def test_captions_run_beside_detection_without_holding_it_up(trained_bundle, tiny_bundle, assets, tmp_path):
    from vlexport.runtime import load
    from vlexport.runtime.run import run_on_source

    with load(tiny_bundle) as det, load(trained_bundle.path, precision="fp32") as cap:
        stats = run_on_source(det, assets / "video" / "car-detection.mp4", jsonl=tmp_path / "r.jsonl",
                              save=tmp_path / "r.mp4", progress=False, max_frames=40, caption=cap,
                              caption_every_frames=5)
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert stats.frames == 40 and [r["frame"] for r in records] == list(range(40))
    assert all("detections" in r for r in records)  # every frame detected, whatever the captioner does
    captioned = [r["frame"] for r in records if "caption" in r]
    # Each caption sits in the record of the frame it was computed on, every 5 frames of this file.
    assert captioned == [0, 5, 10, 15, 20, 25, 30, 35]
    with load(trained_bundle.path, precision="fp32") as cap:
        import cv2

        video = cv2.VideoCapture(str(assets / "video" / "car-detection.mp4"))
        frames = [video.read()[1] for _ in range(11)]
        video.release()
        assert records[10]["caption"]["text"] == cap.caption(frames[10]).text  # the right frame's caption
