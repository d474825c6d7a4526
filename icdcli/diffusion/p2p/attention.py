"""The attention processors of a P2P decode and their tensor arithmetic: each target row's attention rewritten from
its source row's, as one step's `StepControl` says."""

from __future__ import annotations

from typing import Any

import torch

from icdcli.diffusion.p2p.control import StepControl


def control_pairs(control: StepControl) -> int:
    """How many (source, target) pairs a control edits: its tensors carry a leading pair axis when more than one.

    No `int()`: while an export traces the P2P graph, the size stays a traced value, so the graph keeps a
    dynamic pair axis."""
    return 1 if control.mapper.ndim == 2 else control.mapper.shape[0]


def pair_rows(probs: torch.Tensor, pairs: int) -> torch.Tensor:
    """The last 2P rows of a batch: the P (source, target) pairs after real CFG's unconditional rows.

    Taken as the last of the batch's equal groups of 2P rows (a reshape, not a slice at B - 2P), so the
    shapes of an exported graph stay inferable for any number of pairs."""
    return probs.reshape(-1, 2 * pairs, *probs.shape[1:])[-1]


def edit_probabilities(probs: torch.Tensor, *, is_cross: bool, control: StepControl) -> torch.Tensor:
    """Rewrite each target row's attention probabilities from its source row's.

    `probs` is (B, heads, Q, K) whose last 2P rows are P (source, target) pairs, interleaved (real
    classifier-free guidance puts its unconditional rows first, B = 4P; P2P leaves them alone). The control's
    tensors are one pair's ((L,), (L, L), (1,)) or carry a leading pair axis ((P, L), (P, L, L), (P, 1)).
    """
    pairs = control_pairs(control)
    groups = probs.reshape(-1, pairs, 2, *probs.shape[1:])  # (B / 2P, P, 2, heads, Q, K)
    source, target = groups[-1, :, 0], groups[-1, :, 1]  # (P, heads, Q, K)

    def per_pair(tensor: torch.Tensor) -> torch.Tensor:  # (P, 1, 1, last) to broadcast over heads and queries
        return tensor.reshape(pairs, 1, 1, tensor.shape[-1])

    if is_cross:
        mapped = torch.einsum("phqk,pkl->phql", source, control.mapper.reshape(pairs, *control.mapper.shape[-2:]))
        refine = per_pair(control.refine)
        edited = (refine * mapped + (1 - refine) * target) * per_pair(control.reweight)
        alpha = per_pair(control.cross_alpha)
        new_target = alpha * edited + (1 - alpha) * target
    elif probs.shape[2] <= control.self_max_queries:
        flag = per_pair(control.self_replace)
        new_target = flag * source + (1 - flag) * target
    else:
        return probs
    rewritten = torch.stack([source, new_target], dim=1)  # (P, 2, heads, Q, K)
    return torch.cat([groups[:-1], rewritten[None]]).reshape(probs.shape)


def edited_values(
    target_values: torch.Tensor, *, is_cross: bool, control: StepControl
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target rows' values split by the probabilities they meet: `edit_probabilities`' new target row times
    `target_values` equals `source_probs @ via_source + target_probs @ via_target`.

    Every P2P edit is linear in the probabilities with weights per key token, so the weights can move onto the
    values (P, heads, K, d), which are far smaller than the probabilities (P, heads, Q, K). Cross-attention: the
    mapped source map reaches token l through `mapper` with weight alpha*refine*reweight, the target's own map with
    alpha*(1 - refine)*reweight + 1 - alpha. Self-attention: the flag's share goes through the source map."""
    pairs = control_pairs(control)
    if not is_cross:
        flag = control.self_replace.reshape(pairs, 1, 1, 1)
        return flag * target_values, (1 - flag) * target_values

    def per_key(tensor: torch.Tensor) -> torch.Tensor:  # (P, 1, K, 1): a weight per key token, over heads and d
        return tensor.reshape(pairs, 1, tensor.shape[-1], 1)

    alpha, refine, reweight = per_key(control.cross_alpha), per_key(control.refine), per_key(control.reweight)
    mapper = control.mapper.reshape(pairs, *control.mapper.shape[-2:])
    via_source = torch.einsum("pkl,phld->phkd", mapper, alpha * refine * reweight * target_values)
    return via_source, (alpha * (1 - refine) * reweight + (1 - alpha)) * target_values


def controlled_attention(
    probs: torch.Tensor, values: torch.Tensor, *, is_cross: bool, control: StepControl
) -> torch.Tensor:
    """`edit_probabilities(probs) @ values`, without building the edited probabilities.

    `probs` (B, heads, Q, K), `values` (B, heads, K, d) -> (B, heads, Q, d). Each row's probabilities are read
    once, by one batched matmul against its values widened to 2d: a source row's values beside its target's
    `via_source`, a target row's zeros beside its `via_target`; the target's output is the sum of the two right
    halves (see `edited_values`). Building the rewritten probabilities took several passes over the layer's largest
    tensors; with `attention_probabilities` this took the exported P2P graph from 1.76 to 1.63 ms per row at 64
    pairs on a 2-core CPU (the plain reverse UNet: 1.46), and it never copies SD1.5's (pairs, heads, 1024, 1024)."""
    if not is_cross and probs.shape[2] > control.self_max_queries:
        return probs @ values
    pairs = control_pairs(control)
    heads, queries, keys = probs.shape[1:]
    width = values.shape[-1]
    grouped = values.reshape(-1, pairs, 2, heads, keys, width)  # (B / 2P, P, 2, heads, K, d)
    source, target = grouped[-1, :, 0], grouped[-1, :, 1]
    via_source, via_target = edited_values(target, is_cross=is_cross, control=control)
    last = torch.stack([torch.cat([source, via_source], -1), torch.cat([torch.zeros_like(target), via_target], -1)], 1)
    widened = torch.cat([torch.cat([grouped[:-1], torch.zeros_like(grouped[:-1])], -1), last[None]])
    out = probs.reshape(-1, pairs, 2, heads, queries, keys) @ widened  # (B / 2P, P, 2, heads, Q, 2d)
    own, edited = out[..., :width], out[..., width:]
    last_out = torch.stack([own[-1, :, 0], edited[-1].sum(1)], 1)
    return torch.cat([own[:-1], last_out[None]]).reshape(-1, heads, queries, width)


def attention_probabilities(
    attn: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """diffusers' `Attention.get_attention_scores`, less its placeholder: without a mask it hands `baddbmm` an
    uninitialised tensor with beta=0, which an ONNX export turns into a tensor of the scores' size filled,
    multiplied by 0 and added, three passes over the layer's largest tensor on every call."""
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    if attention_mask is None:
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
    else:
        scores = torch.baddbmm(attention_mask, query, key.transpose(-1, -2), beta=1, alpha=attn.scale)
    if attn.upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)


def _touches(control: StepControl, is_cross: bool, queries: int) -> bool:
    """Whether this step rewrites (or records) the attention of a layer with `queries` queries."""
    if is_cross:
        return control.cross_active or control.blend_queries == queries
    return control.self_active and queries <= control.self_max_queries


class P2PAttnProcessor:
    """Attention with explicit probabilities that P2P can rewrite; without control it is SDPA.

    Registered on every attention layer through `install_p2p_processors`; the layer's position (cross or
    self) is known from its inputs. A UNet call passes `control` and a list `blend_maps` through
    `cross_attention_kwargs`; the cross-attention maps local blend reads (`control.blend_queries` queries,
    averaged over heads, the pairs' rows) are added to that list, which the caller owns and returns.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        control: StepControl | None = None,
        blend_maps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if control is None or not _touches(control, is_cross, queries):
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attention_probabilities(attn, query, key, attention_mask)
        probs = probs.reshape(batch, attn.heads, *probs.shape[1:])
        if is_cross and control.blend_queries == queries and blend_maps is not None:
            # the maps of the edited rows, averaged over heads: the edit is linear, so edit the average
            averaged = edit_probabilities(probs.mean(1, keepdim=True), is_cross=True, control=control)
            blend_maps.append(pair_rows(averaged, control_pairs(control))[:, 0])
        values = value.reshape(batch, attn.heads, *value.shape[1:])
        hidden_states = controlled_attention(probs.to(value.dtype), values, is_cross=is_cross, control=control)
        hidden_states = hidden_states.reshape(batch * attn.heads, *hidden_states.shape[2:])
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_p2p_processors(unet: Any) -> None:
    """Give every attention layer of `unet` a `P2PAttnProcessor` (SDPA until a control is passed).

    Called by whoever runs attention control on `unet` (through `ControlledDenoiser.install_control`, or the
    exporter of the P2P graph); a controlled call never installs them itself."""
    if has_p2p_processors(unet):
        return
    unet.set_attn_processor({name: P2PAttnProcessor() for name in unet.attn_processors})
    unet._icd_p2p_installed = True


def has_p2p_processors(unet: Any) -> bool:
    return bool(getattr(unet, "_icd_p2p_installed", False))
