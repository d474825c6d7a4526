"""Models: the model API, metadata, the runtime model and its PyTorch execution modes, loading from sources (hub,
single files, LoRA fusion), identity."""
