"""The captioner family: multi-scale CLIP encoder with deformable attention feeding GPT-2."""
