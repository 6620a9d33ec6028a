"""Data sets on disk: YOLO/COCO detection labels, segmentation masks, calibration and parity frames."""
