"""detr."""
