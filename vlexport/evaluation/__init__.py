"""Task metrics of a bundle: COCO mAP (pycocotools), mIoU, and `vlexport validate`."""
