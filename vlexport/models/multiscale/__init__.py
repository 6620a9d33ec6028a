"""The multi-scale input processor: shared backbone at 0.5x/1x/1.5x with attention-based scale fusion."""
