"""The `vlexport` command line. Every command is one call into the library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from vlexport import __version__
from vlexport.errors import DependencyError, UsageError, VlexportError

log = logging.getLogger("vlexport")


class _Group(click.Group):
    """Turns user errors into one line and exit 1, Ctrl-C into exit 130; bugs keep their traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VlexportError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("vlexport")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _require_export_extra() -> None:
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise DependencyError(
            f"exporting needs the export extra ({e.name} is missing): pip install 'vlexport[export]'"
        ) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vlexport")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Export vision-language models to ONNX bundles and run them on images and video.

    \b
    Examples:
      vlexport kdeov --fp16                       # export KDEOV (YOLOv8n + CLIP ViT-B-32 text)
      vlexport inspect bundles/kdeov-yolov8n-vitb32
      vlexport run bundles/kdeov-yolov8n-vitb32 --source video.mp4 --save out.mp4 --jsonl out.jsonl
    """
    _setup_logging(verbose, quiet)


# --------------------------------------------------------------------------- shared export options
def precision_options(fn):
    """--fp16/--int8 and the INT8 calibration and accuracy-gate options, shared by every family."""
    opts = [
        click.option("--fp16", is_flag=True, help="Also write FP16 graphs (FP32 inputs/outputs; fragile and overflowing ops stay FP32)."),
        click.option("--int8", is_flag=True, help="Also write an INT8 (QDQ) graph; needs --calib."),
        click.option("--calib", help="Calibration images: a folder, a video, a YOLO data.yaml/folder or a COCO json."),
        click.option("--calib-size", default=64, show_default=True, type=int, help="Number of calibration images (sampled with --calib-seed)."),
        click.option("--calib-seed", default=0, show_default=True, type=int),
        click.option("--calib-method", default="entropy", show_default=True, type=click.Choice(["minmax", "entropy", "percentile"])),
        click.option("--int8-target", default="tensorrt", show_default=True, type=click.Choice(["tensorrt", "cpu"]),
                     help="tensorrt: signed symmetric Q/DQ that TensorRT and any onnxruntime run; cpu: uint8 activations, "
                          "onnxruntime's fast x86 path (TensorRT cannot take it)."),
        click.option("--val", help="Images for the parity check; a labelled dataset (YOLO data.yaml/folder or COCO json) also gates INT8 by mAP."),
        click.option("--max-drop", default=1.0, show_default=True, type=float, help="Points of mAP50-95 INT8 may lose against FP32 (with --val)."),
        click.option("--strict", is_flag=True,
                     help="Fail (write nothing) when an FP16 or INT8 graph fails its checks; by default it is left out "
                          "of the bundle with a warning and the reason in the manifest (FP32 failing always fails)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _precision(kw: dict):
    from vlexport.export.bundle_export import PrecisionOptions

    return PrecisionOptions(fp16=kw.pop("fp16"), int8=kw.pop("int8"), calib=kw.pop("calib"),
                            calib_size=kw.pop("calib_size"), calib_seed=kw.pop("calib_seed"),
                            calib_method=kw.pop("calib_method"), int8_target=kw.pop("int8_target"),
                            val=kw.get("parity_source"),
                            max_drop=kw.pop("max_drop"), strict=kw.pop("strict"))


def clip_activation_option(fn):
    """--clip-activation, shared by the families with a CLIP tower."""
    return click.option(
        "--clip-activation", type=click.Choice(["quickgelu", "gelu"]), default=None,
        help="MLP activation of the CLIP towers [default: from the weights: QuickGELU for OpenAI's layout or tags, "
             "the open_clip config's otherwise]. Pass gelu for open_clip weights trained with nn.GELU.")(fn)


# --------------------------------------------------------------------------- export: kdeov
def _vocabulary(classes: str | None, vocab: str | None) -> list[str] | None:
    if classes is None and vocab is None:
        return None
    from vlexport.models.clip.text import parse_vocabulary

    return parse_vocabulary(classes, vocab)


@cli.command("kdeov")
@click.option("--preset", default="yolov8n-vitb32", show_default=True,
              help="Model preset: tiny, yolov8n-vitb32, yolov5s-vitb32.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="KDEOV student checkpoint (from `vlexport train-kdeov`).")
@click.option("--backbone", type=click.Choice(["yolov8n", "yolov5s", "simple"]), help="Student backbone (default: the preset's).")
@click.option("--backbone-weights", type=click.Path(path_type=Path),
              help="Ultralytics detection checkpoint to initialise the backbone (and its box head).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow loading pickled (Ultralytics) checkpoints: runs code from the file.")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/kdeov-PRESET].")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--imgsz", type=int, help="Square input size, a multiple of 32 (default: the preset's).")
@click.option("--classes", help='Comma-separated class names, e.g. "person,car,dog" [default: the 80 COCO names].')
@click.option("--vocab", type=click.Path(path_type=Path), help="File with one class name per line.")
@click.option("--templates", default="imagenet80", show_default=True,
              help="Prompt templates: imagenet80 (the 80 CLIP ImageNet templates), single, or a file (one per line, with {}).")
@click.option("--clip-model", help="open_clip model of the frozen text tower (default: the preset's, ViT-B-32).")
@click.option("--clip-pretrained", help="open_clip pretrained tag or a local weights file (default: openai).")
@clip_activation_option
@click.option("--boxes", "box_source", type=click.Choice(["grid", "yolo"]),
              help="Box source: grid default boxes, or the YOLOv8 head's own regression.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21), help="ONNX opset.")
@click.option("--dynamic-batch", is_flag=True, help="Export with a dynamic batch axis (default: batch 1).")
@click.option("--with-text-encoder", is_flag=True, help="Also export the text tower as part `text_encoder`.")
@click.option("--vocab-mode", type=click.Choice(["baked", "input"]), default="baked", show_default=True,
              help="baked: class embeddings are a graph constant; input: a graph input (swap vocabularies without re-export).")
@precision_options
@click.option("--score-threshold", default=0.25, show_default=True, type=float)
@click.option("--iou-threshold", default=0.5, show_default=True, type=float)
@click.option("--max-detections", default=300, show_default=True, type=int)
def kdeov_cmd(**kw) -> None:
    """Export a KDEOV open-vocabulary detector (parts: detector, image_encoder[, text_encoder]).

    \b
    Examples:
      vlexport kdeov --fp16
      vlexport kdeov --classes "person,bus,car" --out bundles/street --fp16
      vlexport kdeov --backbone-weights yolov8n.pt --trust-checkpoint --boxes yolo
      vlexport kdeov --preset tiny --out /tmp/tiny      # seconds, random weights (tests)
    """
    _require_export_extra()
    from vlexport.export.kdeov import KDEOVExportOptions, export_kdeov

    kw["parity_source"] = kw.pop("val")
    precision = _precision(kw)
    classes = _vocabulary(kw.pop("classes"), kw.pop("vocab"))
    out = kw.pop("out") or Path("bundles") / f"kdeov-{kw['preset']}"
    opts = KDEOVExportOptions(out=out, classes=classes, fp16=precision.fp16, precision=precision, **kw)
    report = export_kdeov(opts)
    _print_export_report(report)


def _print_export_report(report) -> None:
    click.secho(f"bundle written: {report.path}  ({report.seconds:.1f} s)", fg="green")
    for key, outs in report.parity.items():
        figures = ", ".join(
            f"{name} " + " ".join(f"{k}={v:.3g}" for k, v in m.items() if k in ("max_abs", "cosine", "agreement"))
            for name, m in outs.items()
        )
        click.echo(f"  parity {key:<22} {figures}")
    for name, info in report.fp16.items():
        if len(info.get("rounds", [])) > 1:
            last = info["rounds"][-1]
            click.echo(f"  fp16 {name}: {len(info['rounds']) - 1} round(s) of FP32 island search, "
                       f"{last['fp32_nodes']} of {info['nodes']} node(s) in FP32, "
                       f"{'passed' if last['passed'] else 'failed'}")
    for key, reason in report.refused.items():
        click.secho(f"  refused {key:<21} {reason}", fg="yellow")
    if report.metrics:
        click.echo(_metrics_table(report.metrics))
    for r in report.gate:
        click.echo(f"  gate round {r['round']}: {r['excluded_nodes']} node(s) kept in higher precision, "
                   f"INT8 mAP50-95 {100 * r['int8_map50_95']:.2f} (drop {r['drop_points']:.2f} points)")


def _metrics_table(metrics: dict) -> str:
    """Detection (mAP50-95, mAP50) or segmentation (mIoU, pixel accuracy) per precision, vs FP32."""
    first = next(iter(metrics.values()), {})
    main, second, names = (("miou", "pixel_accuracy", ("mIoU", "pix acc")) if "miou" in first
                           else ("map50_95", "map50", ("mAP50-95", "mAP50")))
    lines = [f"  {'precision':<10} {names[0]:>9} {names[1]:>8} {'images':>7}"]
    base = metrics.get("fp32", {}).get(main)
    for prec, m in metrics.items():
        drop = "" if base is None or prec == "fp32" or m.get(main) is None else f"  ({100 * (m[main] - base):+.2f})"
        a = "   n/a" if m.get(main) is None else f"{100 * m[main]:>9.2f}"
        b = "   n/a" if m.get(second) is None else f"{100 * m[second]:>8.2f}"
        lines.append(f"  {prec:<10} {a} {b} {m.get('images', 0):>7}{drop}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- export: yolo
@cli.command("yolo")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Ultralytics YOLOv8/YOLOv5u detection checkpoint.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling the checkpoint (Ultralytics .pt files are pickles: this runs code from the file).")
@click.option("--arch", help="Architecture (yolov8n, yolov8s, …, yolov5s, …); read from the checkpoint when it says.")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/yolo-ARCH].")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--imgsz", default=640, show_default=True, type=int, help="Square input size, a multiple of 32.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21))
@click.option("--dynamic-batch", is_flag=True, help="Export with a dynamic batch axis (default: batch 1).")
@precision_options
@click.option("--score-threshold", default=0.25, show_default=True, type=float)
@click.option("--iou-threshold", default=0.7, show_default=True, type=float)
@click.option("--max-detections", default=300, show_default=True, type=int)
def yolo_cmd(**kw) -> None:
    """Export an Ultralytics detection checkpoint (closed vocabulary, names from the checkpoint).

    \b
    Examples:
      vlexport yolo --checkpoint yolov8n.pt --trust-checkpoint --fp16
      vlexport yolo --checkpoint yolov8n.pt --trust-checkpoint --int8 \\
          --calib coco128/images/train2017 --calib-size 32 --val coco128/data.yaml --max-drop 1.0
    """
    _require_export_extra()
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    kw["parity_source"] = kw.pop("val")
    precision = _precision(kw)
    precision.check()
    out = kw.pop("out") or Path("bundles") / f"yolo-{kw['arch'] or Path(kw['checkpoint']).stem}"
    report = export_yolo(YoloExportOptions(out=out, precision=precision, **kw))
    _print_export_report(report)


# --------------------------------------------------------------------------- export: sclip
@cli.command("sclip")
@click.option("--preset", default="vit-b16", show_default=True, help="tiny, vit-b16 (ViT-B/16), vit-l14-336.")
@click.option("--classes", help='Classes separated by ","; synonyms of one class separated by "|", e.g. '
                               '"background|sky|wall,cat,dog" (3 classes, the first with 3 synonyms: the same as a '
                               '--vocab line "background, sky, wall").')
@click.option("--vocab", type=click.Path(path_type=Path), help='One class per line; synonyms on one line separated by ", ".')
@click.option("--templates", default="imagenet80", show_default=True, help="imagenet80, single, or a file (one per line, with {}).")
@click.option("--clip-model", help="open_clip model (default: the preset's).")
@click.option("--clip-pretrained", help="open_clip pretrained tag or a local weights file (default: openai).")
@clip_activation_option
@click.option("--imgsz", "short_side", type=int, help="Short side the image is resized to (default 336).")
@click.option("--max-long-side", type=click.IntRange(1),
              help="Cap on the long side after that resize: scale = min(imgsz / short side, this / long side) "
                   "(default 2048, as SCLIP's Resize(scale=(2048, 336))).")
@click.option("--slide-crop", type=int, help="Sliding-window crop (default 224).")
@click.option("--slide-stride", type=int, help="Sliding-window stride (default 112).")
@click.option("--pamr-steps", default=0, show_default=True, type=click.IntRange(0), help="PAMR refinement iterations (0: off, as SCLIP's configs).")
@click.option("--pamr-in", default="runtime", show_default=True, type=click.Choice(["runtime", "graph"]),
              help="Run PAMR in the runtime (numpy) or as an exported `refiner` graph (see benchmarks/bench_sclip_slide.py).")
@click.option("--logit-scale", type=float, help="Temperature before the softmax (default 40).")
@click.option("--prob-threshold", type=float, help="Pixels below this probability go to --background-index.")
@click.option("--area-threshold", type=float,
              help="Drop classes (not the background) whose argmax area is at most this fraction of the non-background "
                   "pixels, as SCLIP's area_thd (0.1 for VOC21); needs --background-index.")
@click.option("--background-index", type=int, help="Class index that collects uncertain pixels (e.g. 0 for VOC).")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/sclip-PRESET].")
@click.option("--overwrite", is_flag=True)
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21))
@precision_options
def sclip_cmd(**kw) -> None:
    """Export SCLIP open-vocabulary segmentation (part: segmenter, text embeddings baked in).

    \b
    Examples:
      vlexport sclip --vocab cls_voc21.txt --logit-scale 65 --background-index 0 --prob-threshold 0.1 \\
          --area-threshold 0.1 --fp16                                   # SCLIP's VOC21 configuration
      vlexport sclip --preset tiny --classes "sky|clouds,tree,person" --out /tmp/seg   # seconds, random weights
    """
    _require_export_extra()
    from vlexport.export.sclip import SCLIPExportOptions, export_sclip
    from vlexport.models.sclip.vocabulary import classes_from_option
    from vlexport.models.clip.text import parse_vocabulary

    kw["parity_source"] = kw.pop("val")
    precision = _precision(kw)
    precision.check()
    names, vocab = kw.pop("classes"), kw.pop("vocab")
    # --classes: "," between classes, "|" between the synonyms of one class (SCLIP-only syntax).
    classes = classes_from_option(names) if names is not None and vocab is None else parse_vocabulary(names, vocab)
    out = kw.pop("out") or Path("bundles") / f"sclip-{kw['preset']}"
    report = export_sclip(SCLIPExportOptions(out=out, classes=classes, precision=precision, **kw))
    _print_export_report(report)


# --------------------------------------------------------------------------- export: detr
@cli.command("detr")
@click.option("--preset", default="r50", show_default=True,
              help="Architecture without --checkpoint: tiny, tiny-segm, r50, r50-dc5, r101, r101-dc5, r50-panoptic, …")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Official DETR checkpoint ({'model': state_dict, 'args': …}, e.g. detr-r50-e632da11.pth) or a bare "
                   "state dict; its architecture replaces --preset.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a checkpoint that is more than tensors (runs code from the file).")
@click.option("--dilation/--no-dilation", default=None,
              help="DC5 (dilated layer4) or not, for checkpoints without 'args' [default: the file's args, else no].")
@click.option("--size", default=800, show_default=True, type=click.IntRange(32), help="Short side after resizing.")
@click.option("--max-size", default=1333, show_default=True, type=click.IntRange(32), help="Longest side after resizing.")
@click.option("--score-threshold", default=0.7, show_default=True, type=click.FloatRange(0, 1),
              help="Queries scoring above this are kept at run time (the official demo's 0.7).")
@click.option("--classes", help="Comma-separated name of every class id [default: COCO's 91 category ids for 91 classes].")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/detr-PRESET].")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21), help="ONNX opset.")
@precision_options
def detr_cmd(**kw) -> None:
    """Export DETR (part: detector; masks too for segmentation models). No NMS: queries above
    --score-threshold are the detections.

    \b
    Examples:
      vlexport detr --checkpoint detr-r50-e632da11.pth --fp16 --val coco128/images/train2017
      vlexport detr --checkpoint detr-r50-dc5-f0fb7ef5.pth --dilation --out bundles/detr-r50-dc5
      vlexport detr --checkpoint detr-r50-e632da11.pth --int8 --calib coco128/images/train2017 --calib-size 32
      vlexport detr --preset tiny --size 256 --max-size 400 --out /tmp/detr   # seconds, random weights
      vlexport run bundles/detr-r50 --source bus.jpg --save bus_detr.jpg
    """
    _require_export_extra()
    from vlexport.export.detr import DETRExportOptions, export_detr

    kw["parity_source"] = kw.pop("val")
    precision = _precision(kw)
    precision.check()
    classes = kw.pop("classes")
    names = None if classes is None else [c.strip() for c in classes.split(",")]
    if names is not None and not all(names):
        raise UsageError(f"--classes has an empty name in {classes!r}: give one name per class id, comma-separated")
    preset = kw["preset"] if kw["checkpoint"] is None else Path(kw["checkpoint"]).stem
    out = kw.pop("out") or Path("bundles") / f"detr-{preset}"
    report = export_detr(DETRExportOptions(out=out, classes=names, precision=precision, **kw))
    _print_export_report(report)


# --------------------------------------------------------------------------- export: captioner
@cli.command("captioner")
@click.option("--preset", default="vitb32-gpt2", show_default=True, help="tiny, vitb32-gpt2 (CLIP ViT-B/32 + GPT-2 small).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Trained captioner (from `vlexport train-captioner`).")
@click.option("--clip-model", help="open_clip vision tower (default: the preset's).")
@click.option("--clip-pretrained", help="open_clip pretrained tag or a local weights file (default: openai).")
@clip_activation_option
@click.option("--gpt2", "gpt2_weights", help='GPT-2 weights: a hub name found in the local Hugging Face cache ("gpt2"), a folder or a file.')
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="Folder with GPT-2's vocab.json + merges.txt (or encoder.json + vocab.bpe) [default: the HF cache's gpt2].")
@click.option("--max-length", default=30, show_default=True, type=int, help="Most tokens per caption.")
@click.option("--method", default="greedy", show_default=True, type=click.Choice(["greedy", "beam"]), help="Default decoding.")
@click.option("--num-beams", default=3, show_default=True, type=int)
@click.option("--length-penalty", default=1.0, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--decoder-bits", "decoder_weight_bits", default=8, show_default=True, type=click.Choice(["8", "4"]),
              callback=lambda ctx, param, v: int(v),
              help="With --int8: the decoder's weight-only bits (kept only if its greedy tokens still match PyTorch's).")
@click.option("--parity-steps", default=20, show_default=True, type=int, help="Cached decode steps compared with PyTorch.")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/captioner-PRESET].")
@click.option("--overwrite", is_flag=True)
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21))
@precision_options
def captioner_cmd(**kw) -> None:
    """Export the captioner: part `encoder` (image → prefix tokens + regions) and part `decoder`
    (one GPT-2 step with an explicit KV cache), with the tokenizer.

    \b
    Examples:
      vlexport captioner --gpt2 gpt2 --fp16                     # real sizes, weights from the HF cache
      vlexport train-captioner --data coco128/data.yaml --limit 4 --preset tiny --out cap.pt
      vlexport captioner --checkpoint cap.pt --tokenizer assets/tokenizers/gpt2 --out bundles/cap
    """
    _require_export_extra()
    from vlexport.export.captioner import CaptionerExportOptions, export_captioner

    kw["parity_source"] = kw.pop("val")
    precision = _precision(kw)
    precision.check()
    out = kw.pop("out") or Path("bundles") / f"captioner-{kw['preset'] if not kw.get('checkpoint') else 'trained'}"
    tokenizer = kw.pop("tokenizer")
    report = export_captioner(CaptionerExportOptions(out=out, precision=precision,
                                                     tokenizer=str(tokenizer) if tokenizer else None, **kw))
    _print_export_report(report)


# --------------------------------------------------------------------------- export: multiscale
@cli.command("multiscale")
@click.option("--preset", default="r50", show_default=True, help="tiny (ResNet-18, 320) or r50 (ResNet-50, 352).")
@click.option("--fusion", default="absi", show_default=True, type=click.Choice(["absi", "hierarchical"]),
              help="How the 0.5x/1.0x/1.5x features are fused: attention across scales, or coarse-to-fine merges.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Trained segmenter: torch.save(model.state_dict()) of the same --preset and --fusion (tensors only).")
@click.option("--backbone-weights", type=click.Path(path_type=Path),
              help="torchvision ResNet state dict for the backbone of an otherwise untrained model.")
@click.option("--imgsz", type=int, help="Square input size, a multiple of 32 (default: the preset's).")
@click.option("--class-name", default="object", show_default=True, help="Name of the foreground class.")
@click.option("--threshold", default=0.5, show_default=True, type=float,
              help="Foreground where the probability is above this (the runtime can override it).")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/multiscale-PRESET-FUSION].")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21))
@precision_options
def multiscale_cmd(**kw) -> None:
    """Export the multi-scale binary segmenter (part: segmenter; all scales and the fusion in one graph).

    \b
    Examples:
      vlexport multiscale --checkpoint cod_r50.pt --class-name animal --fp16
      vlexport multiscale --fusion hierarchical --backbone-weights resnet50.pt
      vlexport multiscale --preset tiny --imgsz 128 --out /tmp/ms    # seconds, random weights
      vlexport run bundles/multiscale-r50-absi --source video.mp4 --save out.mp4 --jsonl out.jsonl
    """
    _require_export_extra()
    from vlexport.export.multiscale import MultiScaleExportOptions, export_multiscale

    kw["parity_source"] = kw.pop("val")
    precision = _precision(kw)
    precision.check()
    out = kw.pop("out") or Path("bundles") / f"multiscale-{kw['preset']}-{kw['fusion']}"
    report = export_multiscale(MultiScaleExportOptions(out=out, precision=precision, **kw))
    _print_export_report(report)


# --------------------------------------------------------------------------- training
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
    _require_export_extra()
    if (data is None) == (images is None):
        raise UsageError("pass --data DATASET (detection) or --images FOLDER (global distillation), not both or neither")
    if data is not None:
        from vlexport.models.kdeov.detection_train import DetectionTrainOptions, train_kdeov_on_dataset

        if imgsz is not None and (imgsz < 32 or imgsz % 32):
            raise UsageError(f"--imgsz must be a multiple of 32 and at least 32, got {imgsz}")
        names = None if classes is None else _vocabulary(classes, None)
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
    _require_export_extra()
    from vlexport.export.captioner import resolve_tokenizer
    from vlexport.models.captioner.train import load_caption_data, train_captioner
    from vlexport.models.captioner.model import build_captioner, save_captioner

    tok = resolve_tokenizer(str(tokenizer) if tokenizer else None)[0]
    samples = load_caption_data(data, limit=limit)
    model = build_captioner(preset, **({"gpt2_weights": gpt2_weights} if gpt2_weights else {}))
    losses = train_captioner(model, samples, tok, steps=steps, lr=lr, batch_size=batch_size, use_boxes=not no_boxes)
    save_captioner(model, out)
    click.secho(f"checkpoint written: {out}  (loss {losses[0]:.4f} → {losses[-1]:.4f} over {len(losses)} steps, "
                f"{len(samples)} images)", fg="green")


# --------------------------------------------------------------------------- inspect
@cli.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check every file's sha256.")
def inspect_cmd(bundle: Path, as_json: bool, verify: bool) -> None:
    """Show what a bundle holds: parts, tensors, files, vocabulary, parity, backends.

    \b
    Example:
      vlexport inspect bundles/kdeov-yolov8n-vitb32
    """
    from vlexport.runtime.bundle import Bundle
    from vlexport.runtime.describe import describe_bundle

    b = Bundle.open(bundle)
    if verify:
        b.verify_all()
    if as_json:
        click.echo(json.dumps(b.manifest, indent=2))
        return
    click.echo(describe_bundle(b, verified=verify))


# --------------------------------------------------------------------------- build (TensorRT)
@cli.command("build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--fp16", "want", flag_value="fp16", help="Build FP16 engines only.")
@click.option("--int8", "want", flag_value="int8", help="Build INT8 engines only (from the QDQ graph).")
@click.option("--fp32", "want", flag_value="fp32", help="Build FP32 engines only.")
@click.option("--force", is_flag=True, help="Rebuild even when a matching engine exists.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Largest batch of dynamic-batch parts.")
def build_cmd(bundle: Path, want: str | None, force: bool, max_batch: int) -> None:
    """Build TensorRT engines for this GPU from the bundle's ONNX (cached, keyed by ONNX hash,
    TensorRT version, GPU name and precision; recorded in the manifest).

    \b
    Examples:
      vlexport build bundles/yolo-yolov8n            # every precision the bundle has
      vlexport build bundles/yolo-yolov8n --int8
    """
    from vlexport.runtime.backends.tensorrt import require_tensorrt
    from vlexport.runtime.bundle import Bundle
    from vlexport.runtime.engines import engine_precisions, ensure_engine

    b = Bundle.open(bundle)
    require_tensorrt()
    for name in b.part_names:
        part = b.part(name)
        for precision in engine_precisions(part.files):
            if want and precision != want:
                continue
            path = ensure_engine(b.root, name, precision, force=force, batch=(1, 1, max_batch))
            click.echo(f"{name}/{precision}: {path.name}")


# --------------------------------------------------------------------------- validate
@cli.command("validate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Labelled dataset: a YOLO data.yaml or folder (images/ + labels/), or a COCO json.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Precisions to measure (repeatable) [default: every one the bundle has].")
@click.option("--max-images", type=click.IntRange(1), help="Evaluate on the first N images only.")
@click.option("--threads", type=click.IntRange(1), help="Inference threads (CPU).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the metrics as JSON.")
def validate_cmd(bundle: Path, data: str, precisions: tuple[str, ...], max_images: int | None, threads: int | None,
                 json_out: Path | None) -> None:
    """Task metric of every precision in a bundle on labelled data (detection: COCO mAP50-95, mAP50).

    \b
    Example:
      vlexport validate bundles/yolo-yolov8n --data coco128/data.yaml
    """
    from vlexport.evaluation.validate import validate_bundle

    metrics = validate_bundle(bundle, data, precisions=list(precisions) or None, max_images=max_images, threads=threads)
    click.echo(_metrics_table(metrics))
    if json_out:
        from vlexport.atomic import write_json_atomic

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, {"bundle": str(bundle), "data": data, "metrics": metrics})
        click.echo(f"wrote {json_out}")


# --------------------------------------------------------------------------- bench
@cli.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--source", help="Video (or image, folder, camera, URL): its first frame is the one measured, "
                               "and the whole pipeline runs on it for the end-to-end FPS [default: a synthetic frame].")
@click.option("--runs", default=50, show_default=True, type=int, help="Timed runs per measurement.")
@click.option("--warmup", default=5, show_default=True, type=int, help="Untimed runs before each measurement.")
@click.option("--threads", type=int, help="CPU threads of onnxruntime and PyTorch [default: theirs].")
@click.option("--backend", "backends", multiple=True,
              help="Only this backend, onnxruntime or tensorrt (repeatable) [default: every one usable here].")
@click.option("--precision", "precisions", multiple=True,
              help="Only this precision, fp32, fp16 or int8 (repeatable) [default: every one the bundle has].")
@click.option("--batch", type=int, help="Batch of the extra throughput run of graphs with a dynamic batch axis [default: 8].")
@click.option("--max-frames", type=int, help="Stop the video run after this many frames [default: the whole source].")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch eager comparison.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="JSON file [default: bench-BUNDLE_NAME.json].")
@click.option("--png", "png_out", type=click.Path(path_type=Path), help="Chart [default: the JSON path with .png].")
def bench_cmd(bundle: Path, source: str | None, runs: int, warmup: int, threads: int | None,
              backends: tuple[str, ...], precisions: tuple[str, ...], batch: int | None, max_frames: int | None,
              no_torch: bool, json_out: Path | None, png_out: Path | None) -> None:
    """Latency and throughput of a bundle per backend and precision, beside PyTorch eager.

    For the main part (detector, segmenter, or a captioner's encoder and a 30-token decode): latency
    p50/p90/p99 and throughput of the graph, the task's end-to-end latency (pre-process + inference +
    post-process), the same architecture in PyTorch eager (when torch is installed), and with --source
    the pipeline's FPS on the video. Prints a table; writes a JSON file and a PNG chart.

    \b
    Examples:
      vlexport bench bundles/yolo-yolov8n --source traffic.mp4 --threads 2
      vlexport bench bundles/yolo-yolov8n --backend onnxruntime --precision fp32 --precision int8
      vlexport bench bundles/cap --runs 20 --no-torch --json results/cap.json
    """
    from vlexport.bench import BenchOptions, check_output_path, run_bench, write_chart, write_report_json

    opts = BenchOptions(source=source, runs=runs, warmup=warmup, threads=threads, backends=backends,
                        precisions=precisions, batch=batch, max_frames=max_frames, torch=not no_torch)
    for path, what in ((json_out, "--json"), (png_out, "--png")):
        if path is not None:
            check_output_path(path, what)
    report = run_bench(bundle, opts)
    click.echo(report.table())
    json_path = write_report_json(report, json_out or Path(f"bench-{report.name}.json"))
    click.echo(f"wrote {json_path}")
    png_path = png_out or json_path.with_suffix(".png")
    if write_chart(report, png_path):
        click.echo(f"wrote {png_path}")
    else:
        click.echo("matplotlib is not installed: no chart written (pip install matplotlib)")


# --------------------------------------------------------------------------- run
@cli.command("run")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--source", required=True, help="Image, folder of images, glob, video file, camera index or stream URL.")
@click.option("--detect", "detect_bundle", type=click.Path(path_type=Path), help="A detection bundle: runs on every frame.")
@click.option("--segment", "segment_bundle", type=click.Path(path_type=Path), help="A segmentation bundle: every --segment-every frames.")
@click.option("--segment-every", default=1, show_default=True, type=click.IntRange(1), help="Segment every K-th frame.")
@click.option("--caption", "caption_bundle", type=click.Path(path_type=Path),
              help="A captioner bundle: runs in the background every --caption-every seconds.")
@click.option("--caption-every", default=2.0, show_default=True, type=click.FloatRange(0),
              help="Seconds between captions (acquisition time) on video and streams.")
@click.option("--caption-every-frames", type=click.IntRange(1),
              help="Caption every K frames instead of by time (images: every one by default).")
@click.option("--save", type=click.Path(path_type=Path), help="Write an annotated video (or image, for a single image).")
@click.option("--jsonl", type=click.Path(path_type=Path), help="Write one JSON record per frame.")
@click.option("--stats-json", type=click.Path(path_type=Path), help="Write the run's statistics as JSON.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="Default: the fastest each bundle has for this device.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]),
              help="Inference backend (default: TensorRT when usable, else onnxruntime with its best provider).")
@click.option("--threads", type=click.IntRange(1), help="Inference threads (CPU) per model.")
@click.option("--score-threshold", type=float, help="Override the detection bundle's score threshold.")
@click.option("--iou-threshold", type=float, help="Override the detection bundle's NMS IoU threshold.")
@click.option("--max-detections", type=int, help="Override the detection bundle's maximum detections per frame.")
@click.option("--classes", "run_classes",
              help='Detect these classes instead of the bundle\'s, e.g. "forklift,pallet" (a --vocab-mode input '
                   'bundle exported --with-text-encoder; the names are embedded on the spot, no torch needed).')
@click.option("--max-length", type=int, help="Override the captioner's maximum caption length.")
@click.option("--track", is_flag=True, help="Give detections stable ids across frames (ByteTrack; the track extra).")
@click.option("--realtime", is_flag=True, help="Read a video file at its own frame rate, as a live source (late frames dropped).")
@click.option("--no-reconnect", is_flag=True, help="End the run when a live stream drops instead of reconnecting.")
@click.option("--max-frames", type=click.IntRange(1), help="Stop after this many frames.")
@click.option("--show", is_flag=True, help="Show the annotated frames in a window (q or Esc stops).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run_cmd(bundle: Path | None, source: str, detect_bundle: Path | None, segment_bundle: Path | None,
            segment_every: int, caption_bundle: Path | None, caption_every: float, caption_every_frames: int | None,
            save: Path | None, jsonl: Path | None, stats_json: Path | None, precision: str | None,
            backend: str | None, threads: int | None, score_threshold: float | None, iou_threshold: float | None,
            max_detections: int | None, max_length: int | None, track: bool, realtime: bool, no_reconnect: bool,
            max_frames: int | None, show: bool, no_progress: bool, run_classes: str | None = None) -> None:
    """Run bundles on images, video, cameras or streams; write an annotated video and/or JSONL.

    One BUNDLE runs alone (its task decides what it does). Several bundles share one stream at
    their own rates: --detect on every frame, --segment every K frames, --caption every N seconds
    in the background; each result is attached to the frame it was computed on. Ctrl-C stops
    cleanly: the video and JSONL hold every frame processed so far.

    \b
    Examples:
      vlexport run bundles/yolo-yolov8n --source bus.jpg --save bus_annotated.jpg
      vlexport run bundles/yolo-yolov8n --source traffic.mp4 --save out.mp4 --jsonl out.jsonl --track
      vlexport run --detect bundles/yolo --segment bundles/seg --segment-every 5 \\
          --caption bundles/cap --caption-every 2 --source rtsp://camera/stream --save out.mp4
      vlexport run bundles/cap --source photos/ --jsonl captions.jsonl
      vlexport run bundles/kdeov-input --classes "forklift,pallet" --source warehouse.mp4 --save out.mp4
    """
    from vlexport import runtime
    from vlexport.atomic import write_json_atomic
    from vlexport.runtime.sources import open_source
    from vlexport.runtime.sinks import run_on_source

    roles: dict[str, Path | None] = {"detect": detect_bundle, "segment": segment_bundle, "caption": caption_bundle}
    if bundle is not None:
        task_name = runtime.Bundle.open(bundle).task
        if task_name not in roles:
            raise UsageError(f"{bundle} is a {task_name} bundle; `run` takes detect, segment and caption bundles")
        if roles[task_name] is not None:
            raise UsageError(f"two {task_name} bundles: {bundle} and --{task_name} {roles[task_name]}")
        roles[task_name] = bundle
    if not any(roles.values()):
        raise UsageError("give a BUNDLE, or --detect/--segment/--caption bundles")
    detect_overrides = {k: v for k, v in {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
                                          "max_detections": max_detections}.items() if v is not None}
    if detect_overrides and roles["detect"] is None:
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in detect_overrides)} apply to detection: "
                         "give a detection bundle")
    if max_length is not None and roles["caption"] is None:
        raise UsageError("--max-length applies to captioning: give a captioner bundle")
    new_classes = None
    if run_classes is not None:
        if roles["detect"] is None:
            raise UsageError("--classes applies to detection: give a detection bundle")
        from vlexport.runtime.text_encoder import check_class_names

        new_classes = check_class_names([c.strip() for c in run_classes.split(",") if c.strip()])
    overrides = {"detect": detect_overrides, "segment": {},
                 "caption": {"max_length": max_length} if max_length is not None else {}}
    if show:
        from vlexport.runtime.sinks import _check_display

        _check_display()
    tasks: dict[str, object] = {}
    src = None
    try:
        for role, path in roles.items():
            if path is not None:
                tasks[role] = runtime.load(path, precision=precision, backend=backend, threads=threads, **overrides[role])
                if tasks[role].bundle.task != role:
                    raise UsageError(f"--{role} {path} is a {tasks[role].bundle.task} bundle")
                if role == "detect" and new_classes is not None:
                    if not callable(getattr(tasks[role], "set_vocabulary", None)):
                        raise UsageError(f"{path}: this {tasks[role].bundle.family} bundle has a fixed vocabulary; "
                                         "--classes needs a kdeov bundle exported with --vocab-mode input")
                    tasks[role].set_vocabulary(new_classes)  # a baked bundle or no text_encoder: one clear error
        tracker = None
        if track:
            if "detect" not in tasks:
                raise UsageError("--track needs a detection bundle")
            from vlexport.runtime.tracking import Tracker

            tracker = Tracker()
        src = open_source(source, realtime=realtime, reconnect=not no_reconnect)
        main = next(tasks[r] for r in ("detect", "segment", "caption") if r in tasks)
        extra = {r: t for r, t in tasks.items() if t is not main}
        try:
            stats = run_on_source(main, src, save=save, jsonl=jsonl, progress=not no_progress, show=show,
                                  max_frames=max_frames, segment=extra.get("segment"), segment_every=segment_every,
                                  caption=extra.get("caption"), caption_every_s=caption_every,
                                  caption_every_frames=caption_every_frames, tracker=tracker)
        except KeyboardInterrupt as e:
            stats = getattr(e, "stats", None)
            if stats is not None:
                click.echo(stats.summary(), err=True)
                if stats_json is not None:
                    write_json_atomic(stats_json, stats.to_dict())
            raise
        click.echo(stats.summary())
        if stats_json is not None:
            write_json_atomic(stats_json, stats.to_dict())
    finally:
        if src is not None:
            src.close()
        for task in tasks.values():
            task.close()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="vlexport")


if __name__ == "__main__":
    main()
