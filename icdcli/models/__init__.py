"""Models: the model API, the runtime model, loading from sources (hub, single files, LoRA), identity."""
