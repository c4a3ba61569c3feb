"""Q2 (DESIGN.md §4): scaling components inside chosen heads' QK circuit moves their scores
exactly as the terms predict and leaves every other head's scores untouched (frozen mode)."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens
from jaxtyping import TypeCheckError

from tl_circuits import AttributionGraph
from tl_circuits.attention.qk.attribution import QKAttribution
from tl_circuits.attention.qk.basis import BIAS, QKBasis
from tl_circuits.attention.qk.interventions import intervene_qk
from tl_circuits.errors import QKError
from tl_circuits.testing import FAMILIES

F64 = torch.float64
LAYER = 1
QUERIES = (6, 11)


def _predicted(basis: QKBasis, head: int, query: int, scales: dict, side: str) -> torch.Tensor:
    """Clean scores plus ``(c - 1)`` times each scaled component's marginal (the terms)."""
    qk = QKAttribution.from_basis(basis, head=head, query_pos=query)
    ids = (qk.q_components if side == "q" else qk.k_components).tolist()
    marginals = qk.query_marginals() if side == "q" else qk.key_marginals()
    out = qk.scores.clone()
    for c, factor in scales.items():
        if c in ids:  # a component with no contribution there moves nothing
            out += (factor - 1.0) * marginals[:, ids.index(c)]
    return out


def _check(basis: QKBasis, scales: dict, side: str, heads: list[int]) -> None:
    model = basis.model
    cfg = model.cfg
    result = intervene_qk(basis, scales, side=side, heads=heads)  # type: ignore[arg-type]
    moved = 0.0
    for i, head in enumerate(heads):
        for query in QUERIES:
            predicted = _predicted(basis, head, query, scales, side)
            new = result.scores[i, query, : query + 1]
            torch.testing.assert_close(new, predicted, rtol=1e-6, atol=1e-9)
            old = result.clean_scores[i, query, : query + 1]
            moved = max(moved, float((new - old).abs().max()))
    assert moved > 1e-4  # the intervention did something
    # frozen mode: every other head's scores (and so patterns) equal the clean run's
    _, cache = model.run_with_cache(basis.tokens[None])
    for m in range(cfg.n_layers):
        clean = cache[f"blocks.{m}.attn.hook_attn_scores"][0]
        for h in range(cfg.n_heads):
            if m == basis.layer and h in heads:
                continue
            assert torch.equal(result.attn_scores[m, h], clean[h]), (m, h)
    assert not torch.equal(result.logits, result.clean_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_q2_query_side(family: str) -> None:
    model = cached_model(family, False, F64)
    basis = QKBasis.from_components(model, prompt_tokens(), LAYER)
    kinds = basis.table.kind
    scales = {kinds.index("embed"): 0.0, kinds.index("mlp"): 2.5, kinds.index("head") + 1: -1.0}
    _check(basis, scales, "q", heads=[1])
    _check(basis, {BIAS: 0.5}, "q", heads=[0, 3])


@pytest.mark.parametrize("family", FAMILIES)
def test_q2_key_side(family: str) -> None:
    model = cached_model(family, False, F64)
    cfg = model.cfg
    basis = QKBasis.from_components(model, prompt_tokens(), LAYER)
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    group = cfg.n_heads // n_kv
    key_head = min(1, n_kv - 1)  # key head 1 (0 when there is a single key/value head)
    heads = list(range(key_head * group, (key_head + 1) * group))  # its every query head
    kinds = basis.table.kind
    _check(basis, {kinds.index("head") + 2: 0.0, kinds.index("embed"): 3.0}, "k", heads)
    if group > 1:  # a shared key head cannot be changed for one of its query heads only
        with pytest.raises(QKError, match="shared by query heads"):
            intervene_qk(basis, {0: 0.0}, side="k", heads=[heads[0]])


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_q2_graph_basis_and_live_mode(method: str) -> None:
    model = cached_model("llama", False, F64)
    tcs = cached_transcoders("llama", "relu", False, F64)
    graph = AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)
    # layer 2 lies downstream (live vs frozen); both ways of computing the vectors
    basis = QKBasis.from_graph(graph, 1, method=method)  # type: ignore[arg-type]
    qk = QKAttribution.from_basis(basis, head=1, query_pos=QUERIES[1])
    # the two features with the largest query-side totals
    feats = [int(c) for c in qk.q_components if c >= 0 and basis.table.kind[c] == "feature"]
    marg = qk.query_marginals()[0]
    ids = qk.q_components.tolist()
    top = sorted(feats, key=lambda c: -abs(float(marg[ids.index(c)])))[:2]
    _check(basis, {top[0]: 0.0, top[1]: 2.0}, "q", heads=[1])
    # live mode: later heads recompute their attention, so they move
    live = intervene_qk(basis, {top[0]: 0.0}, side="q", heads=[1], freeze_other_heads=False)
    frozen = intervene_qk(basis, {top[0]: 0.0}, side="q", heads=[1])
    torch.testing.assert_close(live.scores, frozen.scores)  # the chosen head's own layer
    assert not torch.equal(live.logits, frozen.logits)
    assert len(live.top_predictions(3)) == 3
    assert basis.reverse is not None and basis.reverse.forward_built() == (method == "forward")


def test_q2_bad_inputs() -> None:
    model = cached_model("gpt2", False, F64)
    basis = QKBasis.from_components(model, prompt_tokens(), LAYER)
    with pytest.raises(QKError, match="head 4 out of range"):
        intervene_qk(basis, {0: 0.0}, side="q", heads=[4])
    with pytest.raises(QKError, match="component id 99"):
        intervene_qk(basis, {99: 0.0}, side="q", heads=[0])
    with pytest.raises(TypeCheckError, match="side"):
        intervene_qk(basis, {0: 0.0}, side="v", heads=[0])  # type: ignore[arg-type]
    with pytest.raises(QKError, match="positions"):
        intervene_qk(basis, {0: 0.0}, side="q", heads=[0], positions=[30])
