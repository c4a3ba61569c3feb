"""QK attributions (DESIGN.md §4): a head's attention score split into query x key terms.

For head ``h`` of layer ``m``, query position ``q`` and key position ``k``, the residual
stream entering layer ``m`` is a sum of components (a *basis*,
:mod:`tl_circuits.attention.qk.basis`:
the attribution graph's nodes, a residual-stream SAE's features, or the dictionary-free
embeddings / head outputs / MLP outputs), the last one a constant ``bias``. With the norm
scales frozen at their clean values every map to the query / key vector is linear:

    q_i = rot_q(qknorm_q(LN1(x_i[q]) @ W_Q[h]))      (+ ln1.b @ W_Q[h] + b_Q[h] for bias)

and the same for keys (key head ``h // group`` under GQA), so the pre-softmax score before
any soft-cap is

    score[q, k] = sum_{i,j} T[k, i, j],   T[k, i, j] = <q_i, k_j> / attn_scale

(invariant Q1). Gemma-2's tanh soft-cap is not bilinear: the terms decompose the pre-cap
score, and the result says so (``soft_capped``).

A :class:`QKAttribution` keeps the component vectors (``[n_q, d_head]`` and
``[n_k, n_keys, d_head]``), never the dense ``[n_keys, n_q, n_k]`` tensor unless asked
(:attr:`QKAttribution.terms`): top terms, marginals, the softmax-competition view and the
sparse top-k form (:meth:`QKAttribution.sparse_terms`) are computed key by key. The
*competition* view of key ``k`` splits ``score_k - sum_j p_j score_j`` (``p`` the head's
clean attention pattern over the keys it can see) into the same terms,
``C[i, j] = <q_i, k_j(k) - sum_l p_l k_j(l)> / attn_scale``: what makes ``k`` win against
the other keys rather than what makes its score large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_circuits.attention.qk.basis import BIAS, EXCLUDED, ComponentTable, QKBasis
from tl_circuits.errors import QKError
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.model.prompt import Prompt
from tl_circuits.typing import Float, Int, typechecked

__all__ = ["QKAttribution", "QKTerm", "SparseQKTerms"]


class QKTerm(NamedTuple):
    """One term: query component id, key component id, value (score units)."""

    query: int
    key: int
    value: float


@typechecked
@dataclass(frozen=True)
class SparseQKTerms:
    """The ``top_k`` largest-|value| terms per key plus what the rest sums to.

    ``query[k, t]``, ``key[k, t]``: component ids; ``value[k, t]``; ``remainder[k]``: the sum
    of every other term, so ``value.sum(1) + remainder == scores`` exactly.
    """

    query: Int[Tensor, "n_keys top_k"]
    key: Int[Tensor, "n_keys top_k"]
    value: Float[Tensor, "n_keys top_k"]
    remainder: Float[Tensor, " n_keys"]


@typechecked
@dataclass(frozen=True, eq=False)
class QKAttribution:
    """Terms of one head's scores at one query position and ``n_keys`` key positions.

    - ``q_components`` / ``k_components``: component ids (rows of ``table``; ``BIAS`` = -1,
      ``EXCLUDED`` = -2) with a nonzero contribution at the query / some key position
    - ``q_vectors[i]``: component ``i``'s query vector; ``k_vectors[j, k]``: its key vector
      at ``key_pos[k]`` (after norms, projection, QK-norm, rotary; ``d_head`` wide)
    - ``scores[k]``: the pre-soft-cap score (the sum of the terms)
    - ``pattern[k]``: the head's clean attention probability on ``key_pos[k]``
    - ``soft_capped``: the model applies a tanh soft-cap after these scores
    - ``basis``: "graph", "sae" or "components"
    """

    layer: int
    head: int
    query_pos: int
    key_pos: Int[Tensor, " n_keys"]
    q_components: Int[Tensor, " n_q"]
    k_components: Int[Tensor, " n_k"]
    q_vectors: Float[Tensor, "n_q d_head"]
    k_vectors: Float[Tensor, "n_k n_keys d_head"]
    attn_scale: float
    scores: Float[Tensor, " n_keys"]
    pattern: Float[Tensor, " n_keys"]
    soft_capped: bool
    basis: str
    table: ComponentTable

    # ---- constructors ------------------------------------------------------------------

    @classmethod
    def compute(
        cls,
        graph: AttributionGraph,
        *,
        layer: int,
        head: int,
        query_pos: int,
        key_pos: int | list[int] | None = None,
        basis: QKBasis | None = None,
    ) -> QKAttribution:
        """Graph-node basis terms of ``head`` at ``layer`` for ``query_pos`` and ``key_pos``
        (default: every key position the query can attend to, ``0..query_pos``).

        Pass ``basis=QKBasis.from_graph(graph, layer)`` to reuse the propagated components
        across heads and positions of one layer.
        """
        if basis is None:
            basis = QKBasis.from_graph(graph, layer)
        return cls.from_basis(basis, head=head, query_pos=query_pos, key_pos=key_pos)

    @classmethod
    def from_sae(
        cls,
        model: HookedTransformer,
        prompt: Prompt,
        sae: Any,
        *,
        layer: int,
        head: int,
        query_pos: int,
        key_pos: int | list[int] | None = None,
    ) -> QKAttribution:
        """Terms in the basis of a residual-stream SAE-Lens ``sae`` reading
        ``blocks.{layer}.hook_resid_pre``: ``x = sum_f a_f d_f + b_dec + error``. No graph
        and no transcoders needed."""
        basis = QKBasis.from_sae(model, prompt, sae, layer)
        return cls.from_basis(basis, head=head, query_pos=query_pos, key_pos=key_pos)

    @classmethod
    def from_components(
        cls,
        model: HookedTransformer,
        prompt: Prompt,
        *,
        layer: int,
        head: int,
        query_pos: int,
        key_pos: int | list[int] | None = None,
    ) -> QKAttribution:
        """Terms in the dictionary-free basis: token (and positional) embedding, each earlier
        head's output, each earlier MLP's output, biases. Works on any model."""
        basis = QKBasis.from_components(model, prompt, layer)
        return cls.from_basis(basis, head=head, query_pos=query_pos, key_pos=key_pos)

    @classmethod
    def from_basis(
        cls,
        basis: QKBasis,
        *,
        head: int,
        query_pos: int,
        key_pos: int | list[int] | None = None,
        show_progress: bool = False,
    ) -> QKAttribution:
        """Terms of ``head`` (at ``basis.layer``) in ``basis``."""
        model, layer = basis.model, basis.layer
        cfg = model.cfg
        keys = check_positions(basis, head, query_pos, key_pos)
        q_rows = basis.live_rows([query_pos])
        k_rows = basis.live_rows(keys)
        q_vec = basis.project(head, q_rows, [query_pos], "q", show_progress=show_progress)
        k_vec = basis.project(head, k_rows, keys, "k", show_progress=show_progress)
        attn = model.blocks[layer].attn
        scale = float(attn.attn_scale)
        scores = k_vec.sum(0) @ q_vec[:, 0].sum(0) / scale
        return cls(
            layer=layer,
            head=head,
            query_pos=query_pos,
            key_pos=torch.tensor(keys, dtype=torch.long),
            q_components=_ids(q_rows, basis.table),
            k_components=_ids(k_rows, basis.table),
            q_vectors=q_vec[:, 0],
            k_vectors=k_vec,
            attn_scale=scale,
            scores=scores,
            pattern=_clean_pattern(basis, head, query_pos, keys),
            soft_capped=bool(cfg.attn_scores_soft_cap and cfg.attn_scores_soft_cap > 0),
            basis=basis.name,
            table=basis.table,
        )

    # ---- views -------------------------------------------------------------------------

    @property
    def terms(self) -> Float[Tensor, "n_keys n_q n_k"]:
        """The dense ``[n_keys, n_q, n_k]`` terms (memory ``n_keys * n_q * n_k``; prefer the
        per-key views on large bases)."""
        return torch.einsum("ie,jke->kij", self.q_vectors, self.k_vectors) / self.attn_scale

    def key_terms(self, key_index: int) -> Float[Tensor, "n_q n_k"]:
        """Terms ``[n_q, n_k]`` at ``key_pos[key_index]``."""
        return self.q_vectors @ self.k_vectors[:, key_index].T / self.attn_scale

    def _competition_keys(self, key_index: int) -> Tensor:
        """``k_j(k) - sum_l p_l k_j(l)`` ``[n_k, d_head]``: the key side of the competition
        terms of ``key_pos[key_index]`` (see :meth:`competition_terms`)."""
        covered = float(self.pattern.sum())
        if abs(covered - 1.0) > 1e-4:
            raise QKError(
                f"the keys computed carry {covered:.4f} of the attention, not all of it; "
                "compute with key_pos=None (every key the query can attend to)"
            )
        p = self.pattern.to(self.k_vectors.dtype)
        mean_k = torch.einsum("k,jke->je", p, self.k_vectors)  # [n_k, d_head]
        return self.k_vectors[:, key_index] - mean_k

    def competition_terms(self, key_index: int) -> Float[Tensor, "n_q n_k"]:
        """Softmax-competition terms of ``key_pos[key_index]``: they sum to
        ``score_k - sum_j p_j score_j`` over the keys the head can attend to.

        Needs every key with nonzero attention among ``key_pos`` (compute with the default
        ``key_pos``); raises :class:`QKError` otherwise.
        """
        return self.q_vectors @ self._competition_keys(key_index).T / self.attn_scale

    def competition_score(self, key_index: int) -> float:
        """``score_k - sum_j p_j score_j`` (what the competition terms sum to)."""
        return float(self.scores[key_index] - self.pattern.to(self.scores.dtype) @ self.scores)

    def top_terms(
        self, key_index: int = 0, k: int = 10, *, sign: str = "both", competition: bool = False
    ) -> list[QKTerm]:
        """The ``k`` largest terms at ``key_pos[key_index]`` (by |value|, or the most positive
        / most negative with ``sign="positive"`` / ``"negative"``), as (query id, key id,
        value); ``competition=True`` ranks the competition terms instead. The ``n_q x n_k``
        terms are never formed (:func:`top_products`)."""
        keys = self._competition_keys(key_index) if competition else self.k_vectors[:, key_index]
        flat, value = top_products(self.q_vectors, keys, self.attn_scale, k, sign)
        n_k = len(self.k_components)
        return [
            QKTerm(int(self.q_components[f // n_k]), int(self.k_components[f % n_k]), float(v))
            for f, v in zip(flat.tolist(), value.tolist(), strict=True)
        ]

    def query_marginals(self) -> Float[Tensor, "n_keys n_q"]:
        """Each query component's total over key components, per key."""
        return self.k_vectors.sum(0) @ self.q_vectors.T / self.attn_scale

    def key_marginals(self) -> Float[Tensor, "n_keys n_k"]:
        """Each key component's total over query components, per key."""
        return (self.k_vectors @ self.q_vectors.sum(0)).T / self.attn_scale

    def competition_marginals(self, key_index: int) -> tuple[Tensor, Tensor]:
        """Query-side ``[n_q]`` and key-side ``[n_k]`` totals of the competition terms."""
        c = self.competition_terms(key_index)
        return c.sum(1), c.sum(0)

    def sparse_terms(self, top_k: int) -> SparseQKTerms:
        """The ``top_k`` largest-|value| terms per key and the remainder ``scores - their
        sum`` (the sum of every other term), key by key from the component vectors
        (:func:`top_products`; neither ``[n_keys, n_q, n_k]`` nor one key's ``[n_q, n_k]``
        is formed)."""
        qs, ks, vs = [], [], []
        n_k = len(self.k_components)
        for key_index in range(len(self.key_pos)):
            flat, value = top_products(
                self.q_vectors, self.k_vectors[:, key_index], self.attn_scale, top_k, "both"
            )
            qs.append(self.q_components[flat // n_k])
            ks.append(self.k_components[flat % n_k])
            vs.append(value)
        value = torch.stack(vs)
        return SparseQKTerms(torch.stack(qs), torch.stack(ks), value, self.scores - value.sum(1))

    def label(self, component: int) -> str:
        """Human-readable name of a component id."""
        return self.table.label[self.table.row(component)]

    def records(self, key_index: int = 0, k: int = 10) -> list[dict[str, Any]]:
        """JSON-ready top terms at ``key_pos[key_index]`` with both components' tables."""
        out = []
        for term in self.top_terms(key_index, k):
            q_rec, k_rec = self.table.records([term.query, term.key])
            out.append(dict(value=term.value, query=q_rec, key=k_rec))
        return out


def check_positions(
    basis: QKBasis, head: int, query_pos: int, key_pos: int | list[int] | None
) -> list[int]:
    """Validate head and positions; returns the key positions (default ``0..query_pos``)."""
    cfg = basis.model.cfg
    n_pos = basis.n_pos
    if not 0 <= head < cfg.n_heads:
        raise QKError(f"head {head} out of range [0, {cfg.n_heads})")
    if not 0 <= query_pos < n_pos:
        raise QKError(f"query position {query_pos} outside the prompt (length {n_pos})")
    keys = (
        list(range(query_pos + 1))
        if key_pos is None
        else ([key_pos] if isinstance(key_pos, int) else list(key_pos))
    )
    if not keys:
        raise QKError("no key positions given")
    for k in keys:
        if not 0 <= k < n_pos:
            raise QKError(f"key position {k} outside the prompt (length {n_pos})")
        if k > query_pos:
            raise QKError(
                f"key position {k} is after query position {query_pos}: the causal mask "
                "hides it, its score is not defined"
            )
    return keys


def _ids(rows: Tensor, table: ComponentTable) -> Tensor:
    """Component ids of table rows: the last row is ``BIAS``, the one before ``EXCLUDED``
    in the graph basis -- negative ids, stable across graphs."""
    n = len(table)
    ids = rows.clone()
    ids[rows == n - 1] = BIAS
    if table.kind[n - 2] == "excluded":
        ids[rows == n - 2] = EXCLUDED
    return ids


#: query rows in the first block of :func:`top_products` (each next block is 4x larger)
TOP_BLOCK = 32
#: up to this many terms :func:`top_products` forms them at once (a bounded search's many
#: small steps would cost more)
SMALL_TERMS = 2**16


def top_products(
    q: Tensor, k: Tensor, scale: float, count: int, sign: str
) -> tuple[Tensor, Tensor]:
    """The ``count`` largest entries of ``T = q @ k.T / scale`` (``q`` ``[n_q, d]``, ``k``
    ``[n_k, d]``) by |value| (``sign="both"``), value (``"positive"``) or -value
    (``"negative"``), ranked: ``(flat, value)``, flat indices ``i * n_k + j`` and values.

    Exact without forming ``T``: ``|T[i, j]| <= |q_i| |k_j| / scale`` (Cauchy-Schwarz).
    Query rows are taken in growing blocks by decreasing norm and each block meets only the keys
    whose bound can still beat the current ``count``-th best entry ``tau``; the search
    stops when a block's largest bound cannot. Every entry left out is bounded by ``tau``,
    so the ones returned are the largest (up to ties).
    """
    if sign not in ("both", "positive", "negative"):
        raise QKError(f"sign must be 'both', 'positive' or 'negative', got {sign!r}")
    n_q, n_k = q.shape[0], k.shape[0]
    count = min(count, n_q * n_k)
    best_value = torch.empty(0, dtype=q.dtype, device=q.device)
    best_flat = torch.empty(0, dtype=torch.long, device=q.device)
    if count == 0:
        return best_flat, best_value
    if n_q * n_k <= SMALL_TERMS:  # one small GEMM costs less than the search's steps
        terms = q @ k.T / scale
        flat = _top_flat(terms, count, sign)
        return flat, terms.flatten()[flat]
    q_norm, q_order = torch.sort(q.norm(dim=1), descending=True)
    k_norm, k_order = torch.sort(k.norm(dim=1), descending=True)
    slack = (1 + 1e-4) / abs(scale)  # bound a little above the rounded products
    r0, size = 0, TOP_BLOCK
    while r0 < n_q:
        tau = (
            float(_rank_key(best_value[count - 1 :], sign)[0])
            if len(best_value) >= count
            else -float("inf")
        )
        a_max = float(q_norm[r0]) * slack
        if a_max * float(k_norm[0]) <= tau:
            break  # no later block can beat tau
        n_cols = int((k_norm * a_max > tau).sum())  # a prefix of the sorted keys
        rows, cols = q_order[r0 : r0 + size], k_order[:n_cols]
        r0, size = r0 + size, 4 * size  # a small first block finds tau; later ones grow
        block = q[rows] @ k[cols].T / scale
        top = _top_flat(block, count, sign)
        value = torch.cat([best_value, block.flatten()[top]])
        flat = torch.cat([best_flat, rows[top // n_cols] * n_k + cols[top % n_cols]])
        order = _rank_key(value, sign).topk(min(count, len(value))).indices
        best_value, best_flat = value[order], flat[order]
    return best_flat, best_value


def _rank_key(value: Tensor, sign: str) -> Tensor:
    """What ``sign`` ranks by: |value|, value or -value."""
    return value.abs() if sign == "both" else (value if sign == "positive" else -value)


def _top_flat(t: Tensor, k: int, sign: str) -> Tensor:
    """Flat indices (into ``t.flatten()``) of the ``k`` largest entries of ``t`` ``[n_q, n_k]``
    by |value| (``sign="both"``), value (``"positive"``) or -value (``"negative"``), ranked.

    Exact and without a full-size sort or copy: the top ``k`` entries lie in the ``k`` rows
    whose own largest entry ranks highest (any other row has ``k`` better entries above all
    of its own), so only those rows are ranked.
    """
    n_q, n_k = t.shape
    k = min(k, n_q * n_k)
    if sign == "both":
        low, high = torch.aminmax(t, dim=1)
        row_best = torch.maximum(high, -low)
    else:
        row_best = t.amax(1) if sign == "positive" else -t.amin(1)
    rows = row_best.topk(min(k, n_q)).indices
    order = _rank_key(t[rows], sign).flatten().topk(k).indices
    return rows[order // n_k] * n_k + order % n_k


def _clean_pattern(basis: QKBasis, head: int, query_pos: int, keys: list[int]) -> Tensor:
    """The head's clean attention probabilities ``[len(keys)]`` on ``keys``."""
    return basis.clean_pattern[head, query_pos, keys]
