"""`vlexport validate`: the task metric of every precision in a bundle, on labelled data."""

from __future__ import annotations

import logging
import os

from vlexport.errors import BundleError, UsageError

log = logging.getLogger("vlexport")


def validate_bundle(bundle_path: str | os.PathLike, data: str, *, precisions: list[str] | None = None,
                    max_images: int | None = None, threads: int | None = None) -> dict[str, dict[str, float]]:
    """The task metric per precision (FP32 first: it is what the others are compared with).

    Detection: COCO mAP50-95 / mAP50 on a YOLO or COCO dataset. Segmentation: mIoU, per-class
    IoU and pixel accuracy on id masks (COCO128 + semantic.yaml) or VOC palette masks.
    """
    from vlexport import runtime
    from vlexport.runtime.bundle import Bundle

    bundle = Bundle.open(bundle_path)
    if bundle.task == "detect":
        from vlexport.data.detection import load_detection_dataset
        from vlexport.evaluation.detection import evaluate_detector

        part, load_data, evaluate, options = "detector", load_detection_dataset, evaluate_detector, \
            {"score_threshold": 0.001, "max_detections": 300}
    elif bundle.task == "segment":
        from vlexport.data.segmentation import load_segmentation_dataset
        from vlexport.evaluation.segmentation import evaluate_segmenter

        part, load_data, evaluate, options = "segmenter", load_segmentation_dataset, evaluate_segmenter, {}
    else:
        raise UsageError(f"validate measures detection and segmentation; this bundle's task is {bundle.task!r}")
    have = bundle.part(part).precisions
    if "fp32" not in have:
        raise BundleError(f"{bundle.root} has no FP32 {part} to compare the other precisions against "
                          f"(it has {', '.join(have)}); export it again")
    wanted = precisions or have
    missing = [p for p in wanted if p not in have]
    if missing:
        raise UsageError(f"{bundle.root} has no {', '.join(missing)} {part} (it has {', '.join(have)})")
    dataset = load_data(data)
    if max_images is not None:
        dataset = dataset.subset(list(range(min(max_images, len(dataset.items)))))
    results: dict[str, dict[str, float]] = {}
    for precision in ["fp32", *[p for p in wanted if p != "fp32"]]:
        log.info("evaluating %s on %d image(s) of %s…", precision, len(dataset.items), data)
        task = runtime.load(bundle, precision=precision, threads=threads, **options)
        try:
            results[precision] = evaluate(task, dataset, progress=True).to_dict()
        finally:
            task.close()
    return results
