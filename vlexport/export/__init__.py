"""PyTorch -> ONNX bundles: one module per family (its options, command, plan, eager rebuild) and the shared writer."""
