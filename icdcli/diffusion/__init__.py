"""The editing method, below the models: noise schedule, samplers, the denoiser seam, recipes, Prompt-to-Prompt."""
