"""Prompt-to-Prompt (P2P) attention control for few-step samplers.

A P2P edit decodes two branches from the same encoded latent: the source prompt (unguided) and the
target prompt (under dynamic guidance). In every attention layer it touches, the target branch's
attention probabilities are rewritten from the source branch's:

- cross-attention, within the cross-replace steps: the source map carried over to the target's
  tokens (`replace`: word for word; `refine`: along a token alignment, new words keep their own
  maps), optionally amplified per word (reweight);
- self-attention on maps of at most 32x32 queries, within the self-replace steps: the source map.

Local blend then keeps the target branch equal to the source outside the blend words' region.

Everything a layer reads at one step is a tensor in `control.StepControl`, so the same processor runs in
PyTorch and traces into an exported graph whose inputs are those tensors (see `icdcli.export`).

The modules, each imported by its own name (this package exports nothing itself): `tokens` (words, token
positions and the token mappers), `control` (one step's control), `plan` (one edit's plan, a batch of them,
local blend), `attention` (the attention processors and their tensor arithmetic), `decode` (the sampler's view:
a denoiser wrapper and its step hook). What the user asks of an edit, `P2PSettings`, is a setting among the
others in `icdcli.diffusion.recipe`.
"""
