"""Bases for QK attributions (DESIGN.md §4): the residual stream entering a layer as a sum.

A *basis* at layer ``m`` is a table of components whose contributions to
``resid_pre(m)`` (at every position) sum to the residual stream itself, the last component
being the constant ``bias``. Three bases share one projection (:func:`project`, ln1 with its
frozen scale, ``W_Q``/``W_K``, biases, QK-norm with its frozen scale, rotary):

- **graph** (:meth:`QKBasis.from_graph`, :mod:`~tl_circuits.attention.qk.graph_basis`):
  the attribution graph's nodes (features and errors of earlier layers, token embeddings)
  propagated through the frozen replacement model, the sources left out of the graph (one
  component) and the bias (every constant of the model);
- **SAE** and **components** (:meth:`QKBasis.from_sae`, :meth:`QKBasis.from_components`,
  :mod:`~tl_circuits.attention.qk.dictionary_bases`): a residual-stream SAE's features, or
  the embeddings and every earlier head's and MLP's output.

Component ids: ``0..n-1`` index :attr:`QKBasis.table`; ``BIAS`` (-1) is the last row and
``EXCLUDED`` (-2) the one before it (the budget's left-out features; graph basis only, zero
without a budget), so negative ids index the table the Python way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_circuits.attention.qk.components import (
    BIAS,
    EXCLUDED,
    BasisParts,
    ComponentTable,
    Side,
    capture,
    side_head,
)
from tl_circuits.attention.qk.dictionary_bases import components_basis, sae_basis
from tl_circuits.attention.qk.graph_basis import Method, graph_basis
from tl_circuits.errors import QKError, UnsupportedArchitectureError
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.model.prompt import Prompt, to_tokens
from tl_circuits.replacement.context import compute_dtype_for
from tl_circuits.replacement.norms import FrozenNorm, frozen_norm

__all__ = ["BIAS", "EXCLUDED", "ComponentTable", "QKBasis"]

#: rows projected at once (bounds the ``[chunk, positions, d_model]`` temporaries)
CHUNK = 512


@dataclass(frozen=True, eq=False, kw_only=True)
class QKBasis(BasisParts):
    """Components of ``resid_pre(layer)`` of ``model`` on ``tokens`` (see the module doc):
    a builder's :class:`~tl_circuits.attention.qk.components.BasisParts` plus the model,
    prompt and layer, and the projection every basis shares.

    ``contributions(rows, positions)`` returns ``[len(rows), len(positions), d_model]``,
    component ``rows`` (table rows) at ``positions``; summed over all rows it is
    ``resid_pre(layer)`` there. ``live_rows(positions)`` lists the rows that can be nonzero
    at those positions (always with the bias row). ``frozen``: the clean run's ln1 scale
    ``[pos, 1]`` and QK-norm scales ``[pos, n_heads]`` / ``[pos, n_key_value_heads]``
    (keys ``"ln1"``, ``"q_norm"``, ``"k_norm"``), the values the projection freezes.
    ``reverse`` (graph basis): answers :meth:`project` by reverse passes seeded at the
    head's query / key map when that is cheaper (see :meth:`from_graph`).
    """

    model: HookedTransformer
    tokens: Tensor
    layer: int

    # ---- constructors ------------------------------------------------------------------

    @classmethod
    def from_graph(cls, graph: AttributionGraph, layer: int, *, method: Method = "auto") -> QKBasis:
        """Graph-node basis: nodes writing below ``layer`` (propagated through the frozen
        replacement model, attention and norm scales frozen), ``EXCLUDED`` and ``BIAS``.

        Two exact ways to get a head's vectors of every node, chosen by ``method``:

        - ``"forward"``: propagate every node's write to ``resid_pre(layer)`` once (about
          one row per node; :func:`~tl_circuits.attention.qk.graph_basis.forward_table`),
          shared by every head and position;
        - ``"reverse"``: one reverse pass per query / key dimension and position asked for
          (``d_head`` rows per position; :mod:`~tl_circuits.attention.qk.reverse`), cached;
        - ``"auto"`` (default): reverse while the seeds run stay within the forward
          propagation's row count (and one request's within half of it), then the forward
          table for everything after; one head at a few positions costs a few reverse
          passes, all heads of a layer one forward propagation (plus at most as much again
          spent before switching; a request for every key of a head goes to the table at
          once).

        Nothing is computed until :meth:`project` (or :attr:`contributions`) asks.
        """
        ctx = graph.context
        if ctx is None:
            raise QKError("this graph has no replacement context (loaded from disk?); rebuild it")
        if method not in ("auto", "forward", "reverse"):
            raise QKError(f"method must be 'auto', 'forward' or 'reverse', got {method!r}")
        _check_layer(ctx.model, layer)
        return cls._of(ctx.model, ctx.tokens, layer, graph_basis(graph, layer, method))

    @classmethod
    def from_sae(cls, model: HookedTransformer, prompt: Prompt, sae: Any, layer: int) -> QKBasis:
        """SAE basis: ``sae`` (SAE-Lens) must read ``blocks.{layer}.hook_resid_pre``."""
        _check_layer(model, layer)
        tokens = to_tokens(model, prompt)
        return cls._of(model, tokens, layer, sae_basis(model, tokens, sae, layer))

    @classmethod
    def from_components(cls, model: HookedTransformer, prompt: Prompt, layer: int) -> QKBasis:
        """Dictionary-free basis: embeddings, earlier heads' and MLPs' outputs, biases."""
        _check_layer(model, layer)
        tokens = to_tokens(model, prompt)
        return cls._of(model, tokens, layer, components_basis(model, tokens, layer))

    @classmethod
    def _of(
        cls, model: HookedTransformer, tokens: Tensor, layer: int, parts: BasisParts
    ) -> QKBasis:
        built = {f.name: getattr(parts, f.name) for f in fields(parts)}
        return cls(model=model, tokens=tokens, layer=layer, **built)

    # ---- the shared projection ---------------------------------------------------------

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @functools.cached_property
    def clean_pattern(self) -> Tensor:
        """The model's attention pattern ``[n_heads, pos, pos]`` at this layer (clean run)."""
        name = f"blocks.{self.layer}.attn.hook_pattern"
        return capture(self.model, self.tokens, (name,))[name][0]

    def project(
        self,
        head: int,
        rows: Tensor,
        positions: Sequence[int],
        side: Side,
        *,
        finish: bool = True,
        show_progress: bool = False,
    ) -> Tensor:
        """Query (``side="q"``) or key vectors of component ``rows`` at ``positions``, in
        float32 for a 16-bit model (the model's dtype otherwise).

        Returns ``[len(rows), len(positions), d_head]``: ln1 (frozen scale) and ``W_Q[head]``
        / ``W_K[head]``; the bias row also gets ``ln1.b @ W`` and ``b_Q`` / ``b_K``. With
        ``finish`` (default) QK-norm (frozen scale) and rotary follow, giving the vectors
        whose dot products are the scores; without, the vectors added at ``hook_q`` /
        ``hook_k`` (what the Q2 interventions edit). Rows are processed in chunks.
        """
        chunks = rows.split(CHUNK)
        out = [
            self._project_chunk(head, chunk, list(positions), side, finish, show_progress)
            for chunk in tqdm(chunks, desc=f"QK {side} vectors", disable=not show_progress)
        ]
        return torch.cat(out) if out else self._project_chunk(head, rows, positions, side, finish)

    def _project_chunk(
        self,
        head: int,
        rows: Tensor,
        positions: Sequence[int],
        side: Side,
        finish: bool,
        show_progress: bool = False,
    ) -> Tensor:
        block = self.model.blocks[self.layer]
        attn = block.attn
        cfg = self.model.cfg
        pos = torch.as_tensor(list(positions), dtype=torch.long)
        reader = side_head(cfg, head, side)
        # TransformerLens expands W_K / b_K to every query head under GQA: index by ``head``
        W = (attn.W_Q if side == "q" else attn.W_K)[head].detach()  # [d_model, d_head]
        dtype = compute_dtype_for(W.dtype)  # float32 for a 16-bit model
        W = W.to(dtype)
        b = (attn.b_Q if side == "q" else attn.b_K)[head].detach().to(dtype)
        is_bias = rows == len(self.table) - 1
        vec = None
        if self.reverse is not None:
            vec = self.reverse.vectors(side, reader, W, rows, positions, show_progress)
        if vec is None:  # project the residual contributions
            vec = self._project_residual(rows, positions, W)
        elif is_bias.any():  # the reverse passes leave the bias row to the residual
            vec[is_bias] = self._project_residual(rows[is_bias], positions, W)
        ln_bias = getattr(block.ln1, "b", None)
        bias = b if ln_bias is None else ln_bias.detach().to(dtype) @ W + b
        vec[is_bias] = vec[is_bias] + bias
        if not finish:
            return vec
        if cfg.use_qk_norm:
            norm = attn.q_norm if side == "q" else attn.k_norm
            scale = self.frozen[f"{side}_norm"][pos, reader].to(dtype)  # [P]
            vec = vec / scale[None, :, None] * norm.w.detach().to(dtype)
        if cfg.positional_embedding_type == "rotary":
            vec = _rotary(attn, vec, pos)
        return vec

    def _project_residual(self, rows: Tensor, positions: Sequence[int], W: Tensor) -> Tensor:
        """``ln1(x) @ W`` (frozen scale, no bias) of the contributions ``x`` of ``rows``,
        as ``(x @ W_ln) / s``: ln1's weight and centring folded into ``W``
        (``centre(x) . u = x . centre(u)``), so the contributions are read once and no
        normalised copy of them is made."""
        resid = self.contributions(rows, positions).to(W.dtype)  # [n, P, d_model]
        if "ln1" not in self.frozen:
            return resid @ W
        pos = torch.as_tensor(list(positions), dtype=torch.long)
        ln1: FrozenNorm = frozen_norm(
            self.model.blocks[self.layer].ln1, self.frozen["ln1"][pos]
        ).to(W.dtype)
        folded = W if ln1.weight is None else ln1.weight[:, None] * W
        if ln1.centre:
            folded = folded - folded.mean(0, keepdim=True)
        return (resid @ folded).div_(ln1.scale)  # scale [P, 1]


def _rotary(attn: Any, vec: Tensor, pos: Tensor) -> Tensor:
    """Rotary embedding of ``vec`` ``[n, P, d_head]`` at absolute positions ``pos`` ``[P]``
    (the first ``rotary_dim`` dimensions; the model's pairing, ``attn.rotate_every_two``)."""
    r = attn.cfg.rotary_dim
    cos, sin = attn.rotary_cos[pos].to(vec.dtype), attn.rotary_sin[pos].to(vec.dtype)
    x_rot = vec[..., :r]
    rotated = x_rot * cos + attn.rotate_every_two(x_rot) * sin
    return torch.cat([rotated, vec[..., r:]], dim=-1)


def _check_layer(model: HookedTransformer, layer: int) -> None:
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise QKError(f"layer {layer} out of range [0, {cfg.n_layers})")
    if cfg.use_logn_attn or cfg.use_dynamic_ntk_rope:
        raise UnsupportedArchitectureError(
            "QK attribution does not support log-n attention scaling or dynamic NTK rotary"
        )
    if cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        raise UnsupportedArchitectureError(
            "OLMo's QK-norm spans all heads (not bilinear per head); QK attribution is "
            "per-head exact only for per-head QK-norm"
        )
