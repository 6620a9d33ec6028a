"""Frozen CLIP towers shared by KDEOV, SCLIP and the captioner: weights, activations, text embeddings."""
