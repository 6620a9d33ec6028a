"""vlexport: vision-language models from PyTorch to ONNX/TensorRT bundles, run on live video."""

__version__ = "0.1.0"
