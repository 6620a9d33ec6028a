"""The KDEOV family: CLIP-distilled YOLO student, its heads, checkpoints and both training paths."""
