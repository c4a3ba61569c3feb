"""Invariant Q1 of DESIGN.md §4 on all six families and all three bases, views, bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

from tl_circuits import AttributionGraph
from tl_circuits.attention.qk.attribution import QKAttribution
from tl_circuits.attention.qk.basis import BIAS, EXCLUDED, QKBasis
from tl_circuits.errors import QKError
from tl_circuits.testing import FAMILIES

F64 = torch.float64
QUERY = 9


def _graph(family: str, kind: str, **kw) -> AttributionGraph:
    model = cached_model(family, False, F64)
    tcs = cached_transcoders(family, kind, False, F64)
    return AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False, **kw)


def resid_sae(model: HookedTransformer, layer: int, jumprelu: bool, seed: int = 0):
    """A random SAE-Lens SAE at ``blocks.{layer}.hook_resid_pre`` (about half the features
    active per position)."""
    d = model.cfg.d_model
    cls, cfg_cls = (
        (JumpReLUSAE, JumpReLUSAEConfig) if jumprelu else (StandardSAE, StandardSAEConfig)
    )
    sae = cls(
        cfg_cls(
            d_in=d,
            d_sae=48,
            dtype="float64",
            metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_pre"),
        )
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=F64) / d**0.5)
        if jumprelu:
            sae.threshold.copy_(sae.threshold.abs() * 0.1)
    return sae


def attn_cache(model: HookedTransformer, tokens: torch.Tensor) -> dict:
    """The clean run's attention hooks and residual streams."""
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None], names_filter=lambda n: "attn.hook" in n or "hook_resid_pre" in n
        )
    return dict(cache.items())


def reference_scores(
    model: HookedTransformer, cache: dict, layer: int, head: int, query: int = QUERY
) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerLens's own pre-soft-cap scores (q.k / attn_scale) and hook_attn_scores."""
    cfg = model.cfg
    rotary = cfg.positional_embedding_type == "rotary"
    q_name, k_name = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    q = cache[f"blocks.{layer}.attn.{q_name}"][0, query, head]
    k = cache[f"blocks.{layer}.attn.{k_name}"][0, : query + 1, head // group]
    pre_cap = k @ q / model.blocks[layer].attn.attn_scale
    hooked = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, query, : query + 1]
    return pre_cap, hooked


def _unmasked(model: HookedTransformer, layer: int, query: int) -> torch.Tensor:
    """Which keys ``0..query`` the query sees (all, or a local layer's window)."""
    keys = torch.arange(query + 1)
    if model.blocks[layer].attn.attn_type == "local":
        return keys > query - model.cfg.window_size
    return torch.ones(query + 1, dtype=torch.bool)


def check_q1(qk: QKAttribution, model: HookedTransformer, cache: dict) -> None:
    """The dense terms sum to the model's scores (pre-cap; hook_attn_scores without a cap)."""
    pre_cap, hooked = reference_scores(model, cache, qk.layer, qk.head, qk.query_pos)
    total = qk.terms.sum((1, 2))
    torch.testing.assert_close(total, pre_cap, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(qk.scores, pre_cap, rtol=1e-4, atol=1e-10)
    cap = model.cfg.attn_scores_soft_cap
    assert qk.soft_capped == bool(cap and cap > 0)
    # unmasked entries only: a local (sliding-window) layer masks keys outside its window
    seen = _unmasked(model, qk.layer, qk.query_pos)
    assert torch.equal(torch.isfinite(hooked), seen)
    total, hooked = total[seen], hooked[seen]
    if qk.soft_capped:  # the cap is applied after these scores
        torch.testing.assert_close(cap * torch.tanh(total / cap), hooked, rtol=1e-4, atol=1e-10)
    else:  # DESIGN Q1: hook_attn_scores itself
        torch.testing.assert_close(total, hooked, rtol=1e-4, atol=1e-10)
    assert qk.terms.shape == (QUERY + 1, len(qk.q_components), len(qk.k_components))
    assert int(qk.q_components[-1]) == BIAS and int(qk.k_components[-1]) == BIAS
    # not all bias: the components carry real terms
    assert qk.terms[:, :-1, :-1].abs().sum() > 1e-3 * qk.terms.abs().sum()


@pytest.mark.parametrize("kind", ["relu", "clt"])  # skip transcoders: budgeted test
@pytest.mark.parametrize("family", FAMILIES)
def test_q1_graph_basis(family: str, kind: str) -> None:
    graph = _graph(family, kind)
    model = graph.context.model
    cache = attn_cache(model, graph.tokens)
    for layer in range(model.cfg.n_layers):
        basis = QKBasis.from_graph(graph, layer)
        for head in range(model.cfg.n_heads):
            qk = QKAttribution.compute(graph, layer=layer, head=head, query_pos=QUERY, basis=basis)
            check_q1(qk, model, cache)
            assert qk.basis == "graph"


@pytest.mark.parametrize("kind", ["relu", "clt", "jumprelu_skip"])
@pytest.mark.parametrize("family", FAMILIES)
def test_q1_graph_basis_by_reverse_passes(family: str, kind: str) -> None:
    """Reverse passes seeded at each head's query / key map (``method="reverse"``) give the
    same vectors as the forward propagation of every node, so Q1 holds for them too; a
    budget's left-out features arrive in EXCLUDED exactly; nothing is propagated forward."""
    full = _graph(family, kind)
    budget = None if kind != "jumprelu_skip" else full.nodes.count("feature") // 3
    graph = full if budget is None else _graph(family, kind, max_feature_nodes=budget)
    model = graph.context.model
    cache = attn_cache(model, graph.tokens)
    for layer in range(model.cfg.n_layers):
        reverse = QKBasis.from_graph(graph, layer, method="reverse")
        forward = QKBasis.from_graph(graph, layer, method="forward")
        for head in range(model.cfg.n_heads):
            by_seeds = QKAttribution.from_basis(reverse, head=head, query_pos=QUERY)
            check_q1(by_seeds, model, cache)
            by_rows = QKAttribution.from_basis(forward, head=head, query_pos=QUERY)
            assert torch.equal(by_seeds.q_components, by_rows.q_components)
            torch.testing.assert_close(by_seeds.q_vectors, by_rows.q_vectors, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(by_seeds.k_vectors, by_rows.k_vectors, rtol=1e-9, atol=1e-12)
        assert reverse.reverse is not None and not reverse.reverse.forward_built()
        group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
        n_key_heads = model.cfg.n_heads // group  # GQA: key passes shared by a group
        d_head = model.cfg.d_head
        expected = (model.cfg.n_heads + n_key_heads * (QUERY + 1)) * d_head
        assert reverse.reverse.seeds_run == expected
    if budget is not None:
        assert EXCLUDED in by_seeds.q_components.tolist()
        row = by_seeds.q_components.tolist().index(EXCLUDED)
        assert by_seeds.q_vectors[row].abs().sum() > 0


def test_auto_method_switches_to_forward_once_reverse_would_cost_more() -> None:
    """``method="auto"``: a small question runs reverse passes only; once the seeds would
    exceed one forward propagation of every node, the forward table answers the rest."""
    graph = _graph("llama", "relu")
    model = graph.context.model
    layer, d_head = 2, model.cfg.d_head
    basis = QKBasis.from_graph(graph, layer)
    engine = basis.reverse
    assert engine is not None and engine.seeds_run == 0 and not engine.forward_built()
    one = QKAttribution.from_basis(basis, head=0, query_pos=QUERY, key_pos=[4])
    assert engine.seeds_run == 2 * d_head and not engine.forward_built()
    n_rows, n_pos = engine.n_forward_rows, len(graph.tokens)
    n_key_heads = model.cfg.n_key_value_heads or model.cfg.n_heads
    every_seed = (model.cfg.n_heads + n_key_heads) * n_pos * d_head
    assert 2 * d_head < n_rows < every_seed  # reverse for everything would cost more
    for query in range(n_pos):
        for head in range(model.cfg.n_heads):
            QKAttribution.from_basis(basis, head=head, query_pos=query)
    assert engine.forward_built() and engine.seeds_run <= n_rows
    # cached reverse answers and forward answers agree
    again = QKAttribution.from_basis(basis, head=0, query_pos=QUERY, key_pos=[4])
    forward = QKBasis.from_graph(graph, layer, method="forward")
    ref = QKAttribution.from_basis(forward, head=0, query_pos=QUERY, key_pos=[4])
    for qk in (one, again):
        torch.testing.assert_close(qk.q_vectors, ref.q_vectors, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(qk.k_vectors, ref.k_vectors, rtol=1e-9, atol=1e-12)
    with pytest.raises(QKError, match="method must be"):
        QKBasis.from_graph(graph, layer, method="sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize("jumprelu", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_q1_sae_basis(family: str, jumprelu: bool) -> None:
    model, tokens = cached_model(family, False, F64), prompt_tokens()
    cache = attn_cache(model, tokens)
    for layer in range(model.cfg.n_layers):
        sae = resid_sae(model, layer, jumprelu, seed=layer)
        basis = QKBasis.from_sae(model, tokens, sae, layer)
        kinds = set(basis.table.kind)
        assert kinds == {"sae_feature", "sae_error", "bias"}
        for head in range(model.cfg.n_heads):
            check_q1(QKAttribution.from_basis(basis, head=head, query_pos=QUERY), model, cache)
    # the components at each position are the SAE's decomposition of the residual stream
    x = cache[f"blocks.{layer}.hook_resid_pre"][0]
    every = torch.arange(len(basis.table))
    torch.testing.assert_close(basis.contributions(every, range(len(tokens))).sum(0), x)
    acts = sae.encode(x)
    qk = QKAttribution.from_sae(model, tokens, sae, layer=layer, head=0, query_pos=QUERY)
    features = [int(basis.table.index[c]) for c in qk.q_components[:-2]]
    assert sorted(features) == acts[QUERY].nonzero()[:, 0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_q1_components_basis(family: str) -> None:
    model, tokens = cached_model(family, False, F64), prompt_tokens()
    n_heads = model.cfg.n_heads
    cache = attn_cache(model, tokens)
    for layer in range(model.cfg.n_layers):
        basis = QKBasis.from_components(model, tokens, layer)
        assert basis.table.kind.count("head") == layer * n_heads
        assert basis.table.kind.count("mlp") == layer
        # the residual stream is literally the sum of the components
        resid = cache[f"blocks.{layer}.hook_resid_pre"][0]
        every = torch.arange(len(basis.table))
        torch.testing.assert_close(basis.contributions(every, range(len(tokens))).sum(0), resid)
        for head in range(n_heads):
            check_q1(QKAttribution.from_basis(basis, head=head, query_pos=QUERY), model, cache)
    qk = QKAttribution.from_components(model, tokens, layer=1, head=2, query_pos=QUERY)
    assert qk.basis == "components" and qk.label(BIAS).startswith("biases")


def test_q1_budgeted_and_pruned_graphs_have_excluded_component() -> None:
    full = _graph("llama", "jumprelu_skip")
    budget = full.nodes.count("feature") // 4
    graph = _graph("llama", "jumprelu_skip", max_feature_nodes=budget)
    qk = QKAttribution.compute(graph, layer=2, head=1, query_pos=QUERY)
    assert EXCLUDED in qk.q_components.tolist()
    assert qk.label(EXCLUDED).startswith("nodes left out")
    cache = attn_cache(graph.context.model, graph.tokens)
    check_q1(qk, graph.context.model, cache)
    # a pruned graph: what pruning removed (features, errors, tokens) joins EXCLUDED
    pruned = full.prune(node_threshold=0.5, edge_threshold=0.9)
    assert len(pruned.nodes) < len(full.nodes) and len(pruned.excluded) == 0
    qk = QKAttribution.compute(pruned, layer=2, head=1, query_pos=QUERY)
    assert EXCLUDED in qk.q_components.tolist()
    check_q1(qk, graph.context.model, cache)
    full_qk = QKAttribution.compute(full, layer=2, head=1, query_pos=QUERY)
    assert EXCLUDED not in full_qk.q_components.tolist()  # nothing left out


def test_views() -> None:
    model, tokens = cached_model("gpt2", False, F64), prompt_tokens()
    qk = QKAttribution.from_components(model, tokens, layer=2, head=2, query_pos=QUERY)
    # marginals: each side's totals sum to the scores, and match the dense terms
    torch.testing.assert_close(qk.query_marginals(), qk.terms.sum(2))
    torch.testing.assert_close(qk.key_marginals(), qk.terms.sum(1))
    torch.testing.assert_close(qk.query_marginals().sum(1), qk.scores)
    # sorted terms: by |value|, most positive, most negative
    for key in (0, 4, QUERY):
        dense = qk.terms[key]
        top = qk.top_terms(key, k=4)
        assert [abs(t.value) for t in top] == sorted((abs(t.value) for t in top), reverse=True)
        assert abs(top[0].value) == pytest.approx(float(dense.abs().max()))
        assert qk.top_terms(key, 1, sign="positive")[0].value == pytest.approx(float(dense.max()))
        assert qk.top_terms(key, 1, sign="negative")[0].value == pytest.approx(float(dense.min()))
        q_row = qk.q_components.tolist().index(top[0].query)
        k_row = qk.k_components.tolist().index(top[0].key)
        assert float(dense[q_row, k_row]) == pytest.approx(top[0].value)
    # sparse top-k: exact sums, values are the largest terms
    sparse = qk.sparse_terms(5)
    torch.testing.assert_close(sparse.value.sum(1) + sparse.remainder, qk.scores)
    torch.testing.assert_close(sparse.value.abs(), qk.terms.flatten(1).abs().topk(5).values)
    # softmax competition: terms sum to score_k - sum_j p_j score_j; p is the real pattern
    _, cache = model.run_with_cache(tokens[None])
    p = cache["blocks.2.attn.hook_pattern"][0, 2, QUERY, : QUERY + 1]
    torch.testing.assert_close(qk.pattern, p)
    for key in (0, 7):
        c = qk.competition_terms(key)
        expected = qk.scores[key] - p @ qk.scores
        torch.testing.assert_close(c.sum(), expected)
        assert qk.competition_score(key) == pytest.approx(float(expected))
        q_tot, k_tot = qk.competition_marginals(key)
        torch.testing.assert_close(q_tot.sum(), expected)
        torch.testing.assert_close(k_tot.sum(), expected)
        torch.testing.assert_close(c, qk.terms[key] - torch.einsum("k,kij->ij", p, qk.terms))
        assert qk.top_terms(key, 1, competition=True)[0].value == pytest.approx(
            float(c.flatten()[c.abs().argmax()])
        )
    partial = QKAttribution.from_components(
        model, tokens, layer=2, head=2, query_pos=QUERY, key_pos=[3]
    )
    with pytest.raises(QKError, match="key_pos=None"):
        partial.competition_terms(0)
    recs = qk.records(0, k=2)
    assert set(recs[0]) == {"value", "query", "key"} and "label" in recs[0]["query"]


def test_bad_inputs() -> None:
    graph = _graph("gpt2", "relu")
    model, tokens = graph.context.model, graph.tokens
    with pytest.raises(QKError, match="after query position"):
        QKAttribution.compute(graph, layer=1, head=0, query_pos=3, key_pos=5)
    with pytest.raises(QKError, match="after query position"):
        QKAttribution.from_components(model, tokens, layer=1, head=0, query_pos=3, key_pos=[2, 4])
    with pytest.raises(QKError, match="layer 7 out of range"):
        QKAttribution.compute(graph, layer=7, head=0, query_pos=3)
    with pytest.raises(QKError, match="layer -1 out of range"):
        QKAttribution.from_components(model, tokens, layer=-1, head=0, query_pos=3)
    with pytest.raises(QKError, match="head 9 out of range"):
        QKAttribution.compute(graph, layer=0, head=9, query_pos=3)
    with pytest.raises(QKError, match="head 4 out of range"):
        QKAttribution.from_components(model, tokens, layer=0, head=4, query_pos=3)
    with pytest.raises(QKError, match="query position 40"):
        QKAttribution.compute(graph, layer=0, head=0, query_pos=40)
    sae = resid_sae(model, 1, jumprelu=False)
    expected = r"reads 'blocks.1.hook_resid_pre'.*'blocks.2.hook_resid_pre'"
    with pytest.raises(QKError, match=expected):
        QKAttribution.from_sae(model, tokens, sae, layer=2, head=0, query_pos=3)
    wrong = StandardSAE(
        StandardSAEConfig(d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.1.hook_mlp_out"))
    )
    with pytest.raises(QKError, match=r"hook_mlp_out.*blocks.1.hook_resid_pre"):
        QKAttribution.from_sae(model, tokens, wrong, layer=1, head=0, query_pos=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_basis_chunked_propagation_is_exact(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small propagation chunks start late (layer) and truncate early positions; the node
    contributions must equal one whole-model, whole-prompt propagation, skip paths and
    post-attention norms included."""
    import tl_circuits.attention.qk.graph_basis as qk_bases

    graph = _graph(family, "jumprelu_skip")
    model = graph.context.model
    layer = model.cfg.n_layers - 1
    monkeypatch.setattr(qk_bases, "PROPAGATE_CHUNK", 10**6)
    whole = QKBasis.from_graph(graph, layer)
    rows = whole.live_rows([len(graph.tokens) - 1])
    reference = whole.contributions(rows, range(len(graph.tokens)))
    monkeypatch.setattr(qk_bases, "PROPAGATE_CHUNK", 3)
    chunked = QKBasis.from_graph(graph, layer)
    torch.testing.assert_close(
        chunked.contributions(rows, range(len(graph.tokens))), reference, rtol=1e-10, atol=1e-12
    )
    assert len(rows) > 30  # many chunks of 3
    # nothing written before a node's position (causality survives the truncation)
    node_rows = rows[rows < len(graph.nodes)]
    for r, c in zip(node_rows.tolist(), reference[: len(node_rows)]):
        assert c[: int(graph.nodes.pos[r])].abs().sum() == 0
    check_q1(
        QKAttribution.from_basis(chunked, head=0, query_pos=QUERY),
        model,
        attn_cache(model, graph.tokens),
    )


@pytest.mark.parametrize("sign", ["both", "positive", "negative"])
@pytest.mark.parametrize(("n_q", "n_k", "k"), [(50, 40, 10), (3, 200, 7), (200, 3, 25), (4, 4, 16)])
def test_top_terms_search_equals_a_full_sort(n_q: int, n_k: int, k: int, sign: str) -> None:
    """The row-pruned top-k of qk._top_flat ranks exactly like a sort of every entry."""
    from tl_circuits.attention.qk.attribution import _top_flat

    gen = torch.Generator().manual_seed(n_q * 1000 + n_k)
    for trial in range(20):
        t = torch.randn(n_q, n_k, generator=gen, dtype=F64)
        if trial % 2:  # concentrate the large entries in a few rows
            t[torch.randint(0, n_q, (2,), generator=gen)] *= 10
        key = {"both": t.abs(), "positive": t, "negative": -t}[sign].flatten()
        expected = key.topk(k).values
        got = _top_flat(t, k, sign)
        assert len(set(got.tolist())) == k
        torch.testing.assert_close(key[got], expected, rtol=0, atol=0)
