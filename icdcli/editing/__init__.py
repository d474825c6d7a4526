"""Edits on a loaded model: inversion, reconstruction, prompt-swap and Prompt-to-Prompt editing, generation.

These use cases tie a model (`icdcli.models.api.EditModel`: text, VAE, denoisers) to the pure samplers and the
method of `icdcli.diffusion`, so they sit above both. Each module is imported by its own name (this package exports
nothing itself):

- `stages`: the stages every use case is made of (prompts encoded once, seeded noise, inverting and decoding rows,
  each UNet freed after its stage) and their `Timings`;
- `generation`: inversion, decoding and text-to-image of latents and images (`invert`, `decode`, `generate`);
- `edits`: edits in batches of one working size (`EditJob`, `edit`, `edit_batch`, P2P decodes);
- `inversion`: invert once, edit many, with stable names and signatures (the pipeline class and `icd invert` /
  `icd edit --latents` call them):

  - `invert_for_edit(model, image, source, settings) -> Inversion`: the inverted latent and what made it (model
    hash, source prompt, seed, working and original size, sampler, boundaries), the source prompt's encoding
    cached with it in memory.
  - `edit_inversion(model, inversion, target, *, guidance, tau, settings, p2p=None, unguided="source",
    timings=None) -> Image`: the decode alone, under any target, guidance, tau, method (swap, or P2P with `p2p`) and,
    for swap, the prompt of the unguided steps (`unguided`: "source" or "target"). Pixel-identical to `edit` /
    `edit_batch` with the same settings: both encode the sources in one text-encoder call and the new targets in
    another.
  - `check_inversion(model, inversion, settings)`: `InversionError` when the inversion was made by another model,
    at a size this model does not work at for its image, or with another sampler.
  - `save_inversion(inversion, path, record=None)` / `load_inversion(path) -> Inversion`: the value as a
    .safetensors file (the latent, and its record in the metadata).
"""
