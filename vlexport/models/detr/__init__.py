"""The DETR family: model, transformer, set criterion and official-checkpoint loading."""
