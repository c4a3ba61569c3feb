"""A frozen copy of the QK code path as it was before issue 16's speed-ups (commit 628841e:
``QKBasis.project`` of ``tl_circuits/attention/qk/basis.py`` and the views of
``tl_circuits/attention/qk/attribution.py``), written as functions of a basis / an
attribution, kept as the reference the new code path is compared with
(tests/test_qk_reference.py). Do not edit: it is the previous behaviour."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tl_circuits.attention.qk.attribution import QKAttribution, QKTerm, SparseQKTerms
from tl_circuits.attention.qk.basis import CHUNK, QKBasis
from tl_circuits.attention.qk.components import Side, side_head
from tl_circuits.replacement.context import compute_dtype_for
from tl_circuits.replacement.norms import FrozenNorm, frozen_norm

# ---- QKBasis.project (basis.py) -------------------------------------------------------------


def project(
    basis: QKBasis, head: int, rows: Tensor, positions: Sequence[int], side: Side
) -> Tensor:
    """The old ``QKBasis.project(head, rows, positions, side)`` (``finish=True``)."""
    chunks = rows.split(CHUNK)
    out = [_project_chunk(basis, head, chunk, list(positions), side) for chunk in chunks]
    return torch.cat(out) if out else _project_chunk(basis, head, rows, positions, side)


def _project_chunk(
    basis: QKBasis, head: int, rows: Tensor, positions: Sequence[int], side: Side
) -> Tensor:
    block = basis.model.blocks[basis.layer]
    attn = block.attn
    cfg = basis.model.cfg
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    reader = side_head(cfg, head, side)
    W = (attn.W_Q if side == "q" else attn.W_K)[head].detach()  # [d_model, d_head]
    dtype = compute_dtype_for(W.dtype)
    W = W.to(dtype)
    b = (attn.b_Q if side == "q" else attn.b_K)[head].detach().to(dtype)
    is_bias = rows == len(basis.table) - 1
    vec = None
    if basis.reverse is not None:
        vec = basis.reverse.vectors(side, reader, W, rows, positions)
    if vec is None:
        vec = _project_residual(basis, rows, positions, W)
    elif is_bias.any():
        vec[is_bias] = _project_residual(basis, rows[is_bias], positions, W)
    ln_bias = getattr(block.ln1, "b", None)
    bias = b if ln_bias is None else ln_bias.detach().to(dtype) @ W + b
    vec[is_bias] = vec[is_bias] + bias
    if cfg.use_qk_norm:
        norm = attn.q_norm if side == "q" else attn.k_norm
        scale = basis.frozen[f"{side}_norm"][pos, reader].to(dtype)
        vec = vec / scale[None, :, None] * norm.w.detach().to(dtype)
    if cfg.positional_embedding_type == "rotary":
        vec = _rotary(attn, vec, pos)
    return vec


def _project_residual(basis: QKBasis, rows: Tensor, positions: Sequence[int], W: Tensor) -> Tensor:
    resid = basis.contributions(rows, positions).to(W.dtype)
    if "ln1" in basis.frozen:
        pos = torch.as_tensor(list(positions), dtype=torch.long)
        ln1: FrozenNorm = frozen_norm(
            basis.model.blocks[basis.layer].ln1, basis.frozen["ln1"][pos]
        ).to(W.dtype)
        resid = ln1.forward_linear(resid)
    return resid @ W


def _rotary(attn: Any, vec: Tensor, pos: Tensor) -> Tensor:
    r = attn.cfg.rotary_dim
    cos, sin = attn.rotary_cos[pos].to(vec.dtype), attn.rotary_sin[pos].to(vec.dtype)
    x_rot = vec[..., :r]
    rotated = x_rot * cos + attn.rotate_every_two(x_rot) * sin
    return torch.cat([rotated, vec[..., r:]], dim=-1)


# ---- the views (attribution.py) -------------------------------------------------------------


def key_terms(qk: QKAttribution, key_index: int) -> Tensor:
    return qk.q_vectors @ qk.k_vectors[:, key_index].T / qk.attn_scale


def top_terms(qk: QKAttribution, key_index: int, k: int, sign: str = "both") -> list[QKTerm]:
    t = key_terms(qk, key_index)
    flat, n_k = t.flatten(), t.shape[1]
    order = _top_flat(t, k, sign)
    q_ids, k_ids = qk.q_components, qk.k_components
    return [
        QKTerm(int(q_ids[f // n_k]), int(k_ids[f % n_k]), float(flat[f])) for f in order.tolist()
    ]


def sparse_terms(qk: QKAttribution, top_k: int) -> SparseQKTerms:
    qs, ks, vs, rest = [], [], [], []
    n_k = len(qk.k_components)
    for key_index in range(len(qk.key_pos)):
        terms = key_terms(qk, key_index)
        top = _top_flat(terms, top_k, "both")
        t = terms.flatten()
        qs.append(qk.q_components[top // n_k])
        ks.append(qk.k_components[top % n_k])
        vs.append(t[top])
        rest.append(t.sum() - t[top].sum())
    return SparseQKTerms(torch.stack(qs), torch.stack(ks), torch.stack(vs), torch.stack(rest))


def _top_flat(t: Tensor, k: int, sign: str) -> Tensor:
    n_q, n_k = t.shape
    k = min(k, n_q * n_k)
    if sign == "both":
        low, high = torch.aminmax(t, dim=1)
        row_best = torch.maximum(high, -low)
    else:
        row_best = t.amax(1) if sign == "positive" else -t.amin(1)
    rows = row_best.topk(min(k, n_q)).indices
    sub = t[rows]
    key = {"both": sub.abs(), "positive": sub, "negative": -sub}[sign]
    order = key.flatten().topk(k).indices
    return rows[order // n_k] * n_k + order % n_k
