"""The editing method: noise schedule, samplers, the denoiser seam, recipes, inversion and editing, Prompt-to-Prompt."""
