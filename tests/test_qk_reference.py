"""QK attributions after issue 16's speed-ups equal the previous code path (a frozen copy in
tests/_reference_qk.py): the component vectors of every head (forward table, reverse passes
and ``auto``; ln1 folded into ``W_Q`` / ``W_K``) and the views (top terms of each sign,
competition terms, the sparse top-k + remainder form, now found from the vectors without
forming the terms) on every family, per-layer and cross-layer transcoders, float32; Q1
still holds; and the factor top-k ranks exactly like a sort of every term."""

from __future__ import annotations

import functools

import _reference_qk as ref
import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens
from test_qk import attn_cache, reference_scores

from tl_circuits import AttributionGraph
from tl_circuits.attention.qk import attribution
from tl_circuits.attention.qk.attribution import QKAttribution, top_products
from tl_circuits.attention.qk.basis import QKBasis
from tl_circuits.testing import FAMILIES

F32 = torch.float32
RTOL = 1e-5
QUERY = 11


@functools.cache
def _graph(family: str, kind: str) -> AttributionGraph:
    model = cached_model(family, False, F32)
    tcs = cached_transcoders(family, kind, False, F32)
    full = AttributionGraph.build(model, tcs, prompt_tokens(14), show_progress=False)
    budget = full.nodes.count("feature") // 2  # EXCLUDED is a real component
    return AttributionGraph.build(
        model, tcs, prompt_tokens(14), show_progress=False, max_feature_nodes=budget
    )


def _close(new: torch.Tensor, old: torch.Tensor, what: str) -> None:
    scale = old.abs().max().clamp_min(1e-30)
    err = float((new - old).abs().max() / scale)
    assert err <= RTOL, (what, err)


def _same_ranking(new: list, old: list, what: str) -> None:
    """Same values rank by rank to RTOL of the largest, and the same components wherever
    the value is not tied (within that tolerance) with another one."""
    assert len(new) == len(old), what
    top = max((abs(t.value) for t in old), default=1.0) or 1.0
    values = [t.value for t in old]
    for i, (a, b) in enumerate(zip(new, old, strict=True)):
        assert abs(a.value - b.value) <= RTOL * top, (what, i, a, b)
        tied = any(abs(b.value - v) <= 2 * RTOL * top for j, v in enumerate(values) if j != i)
        if not tied:
            assert (a.query, a.key) == (b.query, b.key), (what, i, a, b)


def _check_views(qk: QKAttribution) -> None:
    for key in (0, len(qk.key_pos) // 2, len(qk.key_pos) - 1):
        for sign in ("both", "positive", "negative"):
            _same_ranking(
                qk.top_terms(key, 7, sign=sign), ref.top_terms(qk, key, 7, sign), f"{key} {sign}"
            )
    new_c = qk.top_terms(3, 5, competition=True)
    t = qk.competition_terms(3)
    flat = ref._top_flat(t, 5, "both")
    n_k = t.shape[1]
    old_c = [
        attribution.QKTerm(
            int(qk.q_components[f // n_k]), int(qk.k_components[f % n_k]), float(t.flatten()[f])
        )
        for f in flat.tolist()
    ]
    _same_ranking(new_c, old_c, "competition")
    new_s, old_s = qk.sparse_terms(6), ref.sparse_terms(qk, 6)
    for key in range(len(qk.key_pos)):
        new_t = [
            attribution.QKTerm(int(a), int(b), float(c))
            for a, b, c in zip(new_s.query[key], new_s.key[key], new_s.value[key], strict=True)
        ]
        old_t = [
            attribution.QKTerm(int(a), int(b), float(c))
            for a, b, c in zip(old_s.query[key], old_s.key[key], old_s.value[key], strict=True)
        ]
        _same_ranking(new_t, old_t, f"sparse {key}")
    # the remainders: the sum of every other term, to RTOL of the terms' total size
    size = qk.terms.abs().sum((1, 2))
    assert bool(((new_s.remainder - old_s.remainder).abs() <= RTOL * size).all())


@pytest.mark.parametrize("kind", ["relu", "clt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_equal_to_the_previous_code_path(
    family: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attribution, "SMALL_TERMS", 0)  # views by the bounded search
    graph = _graph(family, kind)
    model = graph.context.model
    cache = attn_cache(model, graph.tokens)
    layer = model.cfg.n_layers - 1
    for method in ("forward", "reverse", "auto"):
        new_basis = QKBasis.from_graph(graph, layer, method=method)
        old_basis = QKBasis.from_graph(
            graph, layer, method="reverse" if method == "reverse" else "forward"
        )
        for head in range(model.cfg.n_heads):
            qk = QKAttribution.from_basis(new_basis, head=head, query_pos=QUERY)
            keys = list(range(QUERY + 1))
            q_old = ref.project(old_basis, head, old_basis.live_rows([QUERY]), [QUERY], "q")
            k_old = ref.project(old_basis, head, old_basis.live_rows(keys), keys, "k")
            _close(qk.q_vectors, q_old[:, 0], f"{method} q {head}")
            _close(qk.k_vectors, k_old, f"{method} k {head}")
            if head == 0:
                check_q1_f32(qk, model, cache)
                _check_views(qk)


def check_q1_f32(qk: QKAttribution, model, cache) -> None:
    """Q1 in float32, to RTOL of the largest score (test_qk checks it in float64)."""
    pre_cap, _ = reference_scores(model, cache, qk.layer, qk.head, qk.query_pos)
    _close(qk.scores, pre_cap, "scores")
    _close(qk.terms.sum((1, 2)), pre_cap, "terms sum")


@pytest.mark.parametrize("sign", ["both", "positive", "negative"])
@pytest.mark.parametrize("block", [3, 256])
def test_top_products_rank_like_a_full_sort(sign: str, block: int, monkeypatch) -> None:
    """Exact against a sort of the formed terms: random factors, a few rows and columns
    with large norms (the bound prunes), zero rows and columns (never computed)."""
    monkeypatch.setattr(attribution, "TOP_BLOCK", block)
    monkeypatch.setattr(attribution, "SMALL_TERMS", 0)  # the bounded search, always
    gen = torch.Generator().manual_seed(block)
    for trial in range(12):
        n_q, n_k, d = (40, 300, 8) if trial % 2 else (700, 50, 16)
        q = torch.randn(n_q, d, generator=gen, dtype=torch.float64)
        k = torch.randn(n_k, d, generator=gen, dtype=torch.float64)
        q *= torch.rand(n_q, 1, generator=gen, dtype=torch.float64) ** 4 * 10
        k *= torch.rand(n_k, 1, generator=gen, dtype=torch.float64) ** 4 * 10
        q[:3] = 0.0
        k[-2:] = 0.0
        count = (1, 10, 37)[trial % 3]
        t = q @ k.T / 8.0
        key = {"both": t.abs(), "positive": t, "negative": -t}[sign].flatten()
        flat, value = top_products(q, k, 8.0, count, sign)
        assert len(set(flat.tolist())) == count
        torch.testing.assert_close(key[flat], key.topk(count).values, rtol=0, atol=1e-12)
        torch.testing.assert_close(value, t.flatten()[flat], rtol=1e-12, atol=1e-12)
