"""The training commands: `train-kdeov` and `train-captioner` (each one library call)."""

from __future__ import annotations

from pathlib import Path

import click

from vlexport.cli.group import cli
from vlexport.errors import UsageError
from vlexport.export.command import clip_activation_option, parse_classes
from vlexport.export.exporter import require_export_extra


@cli.command("train-kdeov")
@click.option("--data", type=click.Path(path_type=Path),
              help="Labelled detection dataset (YOLO data.yaml/folder or COCO json): train the detection path.")
@click.option("--images", type=click.Path(path_type=Path),
              help="Folder of unlabelled images: distil the CLIP image tower into the pooled embedding (global).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint to write (.pt, tensors only).")
@click.option("--preset", default="yolov8n-vitb32", show_default=True)
@click.option("--backbone-weights", type=click.Path(path_type=Path),
              help="Ultralytics checkpoint to start the backbone, neck and box head from (e.g. the COCO YOLOv8n).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow loading pickled (Ultralytics) checkpoints.")
@click.option("--classes", help="With --data: train only these class names of the dataset, comma-separated (e.g. base classes).")
@click.option("--templates", default="imagenet80", show_default=True, help="With --data: prompt templates of the class embeddings.")
@click.option("--clip-model", help="With --data: open_clip model of the frozen text tower (default: the preset's).")
@click.option("--clip-pretrained", help="With --data: open_clip pretrained tag or a local weights file.")
@clip_activation_option
@click.option("--freeze", default="heads", show_default=True, type=click.Choice(["heads", "backbone", "none"]),
              help="With --data: what stays fixed: heads (backbone, neck, class and box branches), backbone, or none.")
@click.option("--distill-regions", "region_distill_weight", default=0.0, show_default=True, type=click.FloatRange(0),
              help="With --data: weight pulling region embeddings towards CLIP's embedding of each box crop (ViLD).")
@click.option("--steps", default=None, type=click.IntRange(1), help="Optimiser steps [default: 200 with --data, 100 with --images].")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Images per step [default: 16 with --data, 8 with --images].")
@click.option("--lr", default=None, type=float, help="Learning rate [default: 5e-4 with --data, 1e-3 with --images].")
@click.option("--imgsz", type=int, help="Training image size (default: the preset's).")
@click.option("--checkpoint-every", default=100, show_default=True, type=click.IntRange(0),
              help="With --data: write the checkpoint every N steps (0: only at the end).")
@click.option("--resume", type=click.Path(path_type=Path), help="With --data: continue a checkpoint written by train-kdeov --data.")
@click.option("--device", help="cpu or cuda [default: a GPU when there is one].")
@click.option("--dino-weight", default=0.0, show_default=True, type=click.FloatRange(0),
              help="With --images: weight of DINO self-distillation added to the loss (0: off).")
def train_kdeov_cmd(data: Path | None, images: Path | None, out: Path, preset: str, backbone_weights: Path | None,
                    trust_checkpoint: bool, classes: str | None, templates: str, clip_model: str | None,
                    clip_pretrained: str | None, clip_activation: str | None, freeze: str,
                    region_distill_weight: float, steps: int | None, batch_size: int, lr: float | None,
                    imgsz: int | None, checkpoint_every: int, resume: Path | None, device: str | None,
                    dino_weight: float) -> None:
    """Train the KDEOV student: its detection path on labelled boxes (--data), or its global image
    embedding by distilling the CLIP image tower on unlabelled images (--images). CPU is fine.

    \b
    Examples:
      vlexport train-kdeov --data coco128/data.yaml --backbone-weights yolov8n_coco_state_dict.pt --out student.pt
      vlexport train-kdeov --data coco128/data.yaml --classes "person,car,dog" --distill-regions 1 --out base.pt
      vlexport train-kdeov --data coco128/data.yaml --resume student.pt --steps 600 --out student.pt
      vlexport train-kdeov --images coco128/images/train2017 --preset tiny --steps 50 --out student.pt
      vlexport kdeov --checkpoint student.pt --fp16
    """
    require_export_extra()
    if (data is None) == (images is None):
        raise UsageError("pass --data DATASET (detection) or --images FOLDER (global distillation), not both or neither")
    if data is not None:
        from vlexport.models.kdeov.detection_train import DetectionTrainOptions, train_kdeov_on_dataset

        names = None if classes is None else parse_classes(classes, None)
        options = DetectionTrainOptions(steps=steps or 200, batch_size=batch_size or 16, lr=lr or 5e-4, freeze=freeze,
                                        region_distill_weight=region_distill_weight,
                                        checkpoint_every=checkpoint_every, device=device)
        history = train_kdeov_on_dataset(data, out, preset=preset, backbone_weights=backbone_weights,
                                         trust_checkpoint=trust_checkpoint, classes=names, templates=templates,
                                         clip_model=clip_model, clip_pretrained=clip_pretrained,
                                         clip_activation=clip_activation, image_size=imgsz, options=options,
                                         resume=resume)
        click.secho(f"checkpoint written: {out}  (loss {history[0]['loss']:.4f} → {history[-1]['loss']:.4f} "
                    f"over {len(history)} steps)", fg="green")
        return
    from vlexport.models.kdeov.distill_train import train_kdeov_on_folder

    history = train_kdeov_on_folder(images, out, preset=preset, backbone_weights=backbone_weights,
                                    trust_checkpoint=trust_checkpoint, steps=steps or 100, batch_size=batch_size or 8,
                                    lr=lr or 1e-3, image_size=imgsz, dino_weight=dino_weight)
    click.secho(f"checkpoint written: {out}  (loss {history[0]:.4f} → {history[-1]:.4f} over {len(history)} steps)", fg="green")


@cli.command("train-captioner")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="A JSONL of {image, caption, boxes} or a YOLO dataset (captions written from its labels).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint to write (.pt, tensors only).")
@click.option("--preset", default="tiny", show_default=True, help="tiny or vitb32-gpt2.")
@click.option("--gpt2", "gpt2_weights", help="Start GPT-2 from these weights (hub name in the HF cache, folder or file).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="GPT-2 tokenizer folder [default: the HF cache's gpt2].")
@click.option("--limit", type=click.IntRange(1), help="Use only the first N samples.")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--no-boxes", is_flag=True, help="Train the language model only (ignore box targets).")
def train_captioner_cmd(data: Path, out: Path, preset: str, gpt2_weights: str | None, tokenizer: Path | None,
                        limit: int | None, steps: int, batch_size: int, lr: float, no_boxes: bool) -> None:
    """Train the captioner (AdamW, CPU is fine) and write a checkpoint for `vlexport captioner`.

    \b
    Example:
      vlexport train-captioner --data coco128/data.yaml --limit 4 --preset tiny --steps 300 \\
          --tokenizer assets/tokenizers/gpt2 --out cap.pt
    """
    require_export_extra()
    from vlexport.models.captioner.train import train_captioner_on_data

    losses, n_images = train_captioner_on_data(data, out, preset=preset, gpt2_weights=gpt2_weights, tokenizer=tokenizer,
                                               limit=limit, steps=steps, lr=lr, batch_size=batch_size,
                                               use_boxes=not no_boxes)
    click.secho(f"checkpoint written: {out}  (loss {losses[0]:.4f} → {losses[-1]:.4f} over {len(losses)} steps, "
                f"{n_images} images)", fg="green")
