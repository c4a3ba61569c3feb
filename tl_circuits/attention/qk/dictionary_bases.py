"""The QK bases that need no attribution graph (DESIGN.md §4).

- **SAE** (:func:`sae_basis`): a residual-stream SAE at ``blocks.{m}.hook_resid_pre``,
  ``x = sum_f a_f d_f + b_dec + error`` (one component per feature active somewhere in the
  prompt, one error, ``b_dec`` as the bias);
- **components** (:func:`components_basis`, dictionary-free): the token embedding, the
  positional embedding, each earlier head's output ``z_h W_O^h`` (through the frozen
  post-attention norm, if any), each earlier MLP's output, and the bias (every ``b_O``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_circuits.attention.qk.components import (
    BasisParts,
    capture,
    component_table,
    frozen_scales,
    scale_hook_names,
)
from tl_circuits.errors import QKError, UnsupportedArchitectureError
from tl_circuits.replacement.norms import frozen_norm

# ---- SAE basis --------------------------------------------------------------------------


def sae_hook_name(sae: Any) -> str:
    """The hook an SAE-Lens SAE reads (``cfg.metadata.hook_name`` or ``cfg.hook_name``)."""
    cfg = sae.cfg
    meta = getattr(cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None)
    if not isinstance(name, str):
        raise QKError("the SAE's config names no hook (cfg.metadata.hook_name)")
    return name


def sae_basis(model: HookedTransformer, tokens: Tensor, sae: Any, layer: int) -> BasisParts:
    """SAE basis: ``sae`` must read ``blocks.{layer}.hook_resid_pre``."""
    expected = f"blocks.{layer}.hook_resid_pre"
    found = sae_hook_name(sae)
    if found != expected:
        raise QKError(
            f"the basis SAE reads {found!r} but layer {layer}'s QK basis needs a residual-stream "
            f"SAE at {expected!r}; pass the SAE trained on that hook"
        )
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in (None, "none"):
        raise QKError(
            f"the SAE normalises its input ({norm!r}), so x != sum_f a_f d_f + b_dec + error in "
            "the model's units; fold the normalisation into the SAE's weights first"
        )
    captured = capture(model, tokens, (expected, *scale_hook_names(model, layer)))
    dtype = captured[expected].dtype
    x = captured[expected][0]  # [pos, d_model]
    with torch.no_grad():
        acts = sae.encode(x.to(sae.W_dec.dtype)).to(dtype)  # [pos, d_sae]
    W_dec, b_dec = sae.W_dec.detach().to(dtype), sae.b_dec.detach().to(dtype)
    features = acts.ne(0).any(0).nonzero()[:, 0]  # active somewhere in the prompt
    error = x - (acts @ W_dec + b_dec)  # [pos, d_model]
    feat_acts = acts[:, features]  # [pos, n_f]
    n_f = len(features)
    table = component_table(
        [("sae_feature", layer, -1, f, f"SAE F{f}") for f in features.tolist()]
        + [("sae_error", layer, -1, -1, "SAE error"), ("bias", -1, -1, -1, "b_dec")]
    )
    decoder = torch.cat(
        [W_dec[features], torch.zeros(2, x.shape[1], dtype=dtype, device=W_dec.device)]
    )

    def contributions(rows: Tensor, positions: Sequence[int]) -> Tensor:
        pos = list(positions)
        scale = torch.zeros(len(rows), len(pos), dtype=dtype, device=decoder.device)
        is_f = rows < n_f
        scale[is_f] = feat_acts[pos][:, rows[is_f]].T
        out = scale[:, :, None] * decoder[rows][:, None, :]
        out[rows == n_f] = error[pos]
        out[rows == n_f + 1] = b_dec
        return out

    def live_rows(positions: Sequence[int]) -> Tensor:
        active = feat_acts[list(positions)].ne(0).any(0).nonzero()[:, 0]
        return torch.cat([active, torch.tensor([n_f, n_f + 1])])

    return BasisParts(
        name="sae",
        table=table,
        frozen=frozen_scales(captured, model, layer),
        contributions=contributions,
        live_rows=live_rows,
    )


# ---- dictionary-free components basis ------------------------------------------------------


def components_basis(model: HookedTransformer, tokens: Tensor, layer: int) -> BasisParts:
    """Dictionary-free basis: embeddings, earlier heads' and MLPs' outputs, biases."""
    cfg = model.cfg
    standard_pos = cfg.positional_embedding_type in ("standard", "shortformer")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        raise UnsupportedArchitectureError(
            f"positional embedding {cfg.positional_embedding_type!r}: the components basis "
            "supports learned ('standard') and rotary positions"
        )
    names = ["hook_embed", *scale_hook_names(model, layer)]
    if standard_pos:
        names.append("hook_pos_embed")
    post = [hasattr(model.blocks[m], "ln1_post") for m in range(layer)]
    for m in range(layer):
        names.append(f"blocks.{m}.attn.hook_z")
        if not cfg.attn_only:
            names.append(f"blocks.{m}.hook_mlp_out")
        if post[m]:
            names.append(f"blocks.{m}.ln1_post.hook_scale")
    captured = capture(model, tokens, names)
    dtype = captured["hook_embed"].dtype
    values = [captured["hook_embed"][0]]  # each [pos, d_model]
    rows = [("embed", -1, -1, -1, "token embedding")]
    if standard_pos:
        values.append(captured["hook_pos_embed"][0])
        rows.append(("pos_embed", -1, -1, -1, "positional embedding"))
    bias = torch.zeros_like(values[0])
    for m in range(layer):
        block = model.blocks[m]
        z = captured[f"blocks.{m}.attn.hook_z"][0]  # [pos, n_heads, d_head]
        heads = torch.einsum("phe,hed->hpd", z, block.attn.W_O.detach())
        b_O = block.attn.b_O.detach().expand_as(bias)
        if post[m]:
            norm = frozen_norm(block.ln1_post, captured[f"blocks.{m}.ln1_post.hook_scale"][0])
            heads, b_O = norm.forward_linear(heads), norm.forward_linear(b_O)
            post_bias = getattr(block.ln1_post, "b", None)
            if post_bias is not None:
                b_O = b_O + post_bias.detach()
        bias = bias + b_O
        values += list(heads)
        rows += [("head", m, -1, h, f"L{m}H{h}") for h in range(cfg.n_heads)]
        if not cfg.attn_only:
            values.append(captured[f"blocks.{m}.hook_mlp_out"][0])
            rows.append(("mlp", m, -1, -1, f"MLP{m}"))
    values.append(bias)
    rows.append(("bias", -1, -1, -1, "biases (b_O, post-norm biases)"))
    stacked = torch.stack(values).to(dtype)  # [n, pos, d_model]
    all_rows = torch.arange(len(rows))

    def contributions(r: Tensor, positions: Sequence[int]) -> Tensor:
        return stacked[r][:, list(positions)]

    def live_rows(positions: Sequence[int]) -> Tensor:
        return all_rows

    return BasisParts(
        name="components",
        table=component_table(rows),
        frozen=frozen_scales(captured, model, layer),
        contributions=contributions,
        live_rows=live_rows,
    )
