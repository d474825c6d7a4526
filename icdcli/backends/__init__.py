"""Backends that run a loaded model: ONNX Runtime and TensorRT graphs, and PyTorch's execution modes."""
