"""Serving bundles with NVIDIA Triton Inference Server: the model repository, the server, the client."""
