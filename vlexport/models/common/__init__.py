"""Pieces several families share: backbones, box operations, Hungarian matching, losses, HF cache lookup."""
