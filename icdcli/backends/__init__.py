"""Backends that run a loaded model on ONNX Runtime or TensorRT graphs, beside PyTorch's own (`icdcli.models`)."""
