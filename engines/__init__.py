"""Backends that run an exported model: ONNX Runtime sessions and TensorRT engines behind one runner interface.

`base` holds what both share (the graph denoiser, shapes, assembling the parts of an accelerated model);
`onnxruntime` and `tensorrt` open sessions or build and run engines from an `icd export` folder. Installed as
`icdcli.engines`; nothing here imports the CLI or the editing use cases.
"""
