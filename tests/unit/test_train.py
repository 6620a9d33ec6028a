"""Feature-alignment training on real COCO128 images with the tiny preset."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vlexport.errors import SourceError, UsageError
from vlexport.models.kdeov.checkpoint import load_kdeov_checkpoint
from vlexport.models.kdeov.model import build_kdeov
from vlexport.models.kdeov.distill_train import ImageFolderDataset, train_feature_alignment

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets"))
COCO = ASSETS / "coco128" / "images" / "train2017"


@pytest.fixture()
def eight_images(tmp_path) -> Path:
    """A folder with 8 real COCO128 images (symlinks) and one file that is not an image."""
    files = sorted(COCO.glob("*.jpg"))[:8] if COCO.is_dir() else []
    if len(files) < 8:
        pytest.skip(f"shared assets missing (set VLEXPORT_ASSETS): 8 images in {COCO}")
    folder = tmp_path / "images"
    folder.mkdir()
    for f in files:
        (folder / f.name).symlink_to(f)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


def test_image_folder_dataset(eight_images, caplog):
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(eight_images, image_size=128)
    assert len(ds) == 8
    assert "broken.jpg" in caplog.text
    img = ds[0]
    assert img.shape == (3, 128, 128) and img.dtype == torch.float32
    assert 0.0 <= img.min().item() and img.max().item() <= 1.0
    # Letterbox padding is grey 114 (COCO images are not square).
    assert torch.isclose(img, torch.tensor(114 / 255)).any()


def test_image_folder_dataset_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        ImageFolderDataset(tmp_path / "nope", 128)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no readable images"):
        ImageFolderDataset(tmp_path / "empty", 128)


def test_training_lowers_the_loss_and_checkpoint_reloads(eight_images, tmp_path):
    from vlexport.models.clip.towers import FrozenCLIPImageEncoder

    torch.manual_seed(0)
    model = build_kdeov("tiny")
    teacher = FrozenCLIPImageEncoder(model.config.clip_model, model.config.clip_pretrained)
    loader = DataLoader(ImageFolderDataset(eight_images, model.config.image_size), batch_size=4, shuffle=False)
    out = tmp_path / "kdeov_tiny.pt"

    history = train_feature_alignment(model, loader, teacher, steps=12, lr=3e-3, checkpoint_out=out, progress=False)

    assert len(history) == 12 and all(torch.isfinite(torch.tensor(history)))
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < first, f"loss did not go down: {history}"
    assert not model.training

    config, state = load_kdeov_checkpoint(out)
    assert config == model.config
    reloaded = build_kdeov(checkpoint=out)
    images = next(iter(loader))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), model.encode_image(images))
    assert torch.load(out, weights_only=True)["extra"]["loss_history"] == history


def test_training_argument_errors(eight_images):
    from vlexport.models.clip.towers import FrozenCLIPImageEncoder

    model = build_kdeov("tiny")
    teacher = FrozenCLIPImageEncoder("tiny", None)
    loader = DataLoader(ImageFolderDataset(eight_images, 128), batch_size=4)
    with pytest.raises(UsageError, match="steps"):
        train_feature_alignment(model, loader, teacher, steps=0, progress=False)
    with pytest.raises(UsageError, match="no batches"):
        train_feature_alignment(model, [], teacher, steps=1, progress=False)

    class WideTeacher(torch.nn.Module):
        embed_dim = 512

    with pytest.raises(UsageError, match="teacher embed_dim 512"):
        train_feature_alignment(model, loader, WideTeacher(), steps=1, progress=False)


def test_image_that_fails_to_decode_is_skipped(eight_images, caplog):
    # A JPEG signature passes the header check; the body does not decode.
    (eight_images / "000_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    ds = ImageFolderDataset(eight_images, image_size=64)
    index = [f.name for f in ds.files].index("000_truncated.jpg")
    with caplog.at_level(logging.WARNING):
        img = ds[index]
    # The next readable image is returned in its place.
    assert img.shape == (3, 64, 64)
    torch.testing.assert_close(img, ds.load((index + 1) % len(ds)))
    assert "000_truncated.jpg" in caplog.text
