"""PyTorch definitions, losses, training and checkpoint loading: one package per family, plus common/ and clip/."""
