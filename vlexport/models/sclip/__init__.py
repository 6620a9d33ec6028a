"""The SCLIP family: dense CLIP segmentation with cross-layer self-attention, sliding windows, PAMR."""
