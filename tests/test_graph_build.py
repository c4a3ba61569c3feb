"""Invariants G1 and G2 of DESIGN.md §2 on all families and transcoder kinds, plus targets,
budgets and bad inputs of AttributionGraph.build."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_KINDS, cached_model, cached_transcoders, prompt_tokens

from tl_circuits import PromptError, TLCircuitsError
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph.targets import TargetError, target_values
from tl_circuits.testing import FAMILIES

F64 = torch.float64


def _graph(family: str, kind: str, targets=None, **kw) -> AttributionGraph:
    model = cached_model(family, False, F64)
    tcs = cached_transcoders(family, kind, False, F64)
    return AttributionGraph.build(
        model, tcs, prompt_tokens(), targets=targets, show_progress=False, batch_size=32, **kw
    )


def _custom_targets(family: str):
    gen = torch.Generator().manual_seed(2)
    d_model = cached_model(family, False, F64).cfg.d_model
    return [7, (3, 9), torch.randn(d_model, generator=gen, dtype=F64)]


def _rows(graph: AttributionGraph) -> torch.Tensor:
    return torch.cat([graph.indices("feature"), graph.indices("target")])


def _row_outputs(graph: AttributionGraph, rec) -> torch.Tensor:
    """The row quantities (feature pre-activations, target values) of a recorded run."""
    nodes = graph.nodes
    feats = graph.indices("feature")
    pres = torch.stack(
        [
            rec.pre_activations[int(la)][0, int(p), int(f)]
            for la, p, f in zip(nodes.layer[feats], nodes.pos[feats], nodes.feature[feats])
        ]
    )
    return torch.cat([pres, target_values(graph.targets, rec.final_normalized[0])])


def check_g1(graph: AttributionGraph) -> None:
    """G1: every row's input edges plus its constant equal its value (float64 graphs)."""
    rows = _rows(graph)
    total = graph.adjacency[rows].sum(1) + graph.constants[rows]
    torch.testing.assert_close(total, graph.row_values[rows], rtol=1e-10, atol=1e-10)
    # error and token nodes have no incoming edges
    others = torch.cat([graph.indices("error"), graph.indices("token")])
    assert not graph.adjacency[others].any()
    # and the edges are not trivially zero
    assert graph.adjacency[graph.indices("target")].abs().sum() > 0


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_g1_inputs_complete(family: str, kind: str) -> None:
    for targets in (None, _custom_targets(family)):
        check_g1(_graph(family, kind, targets))


@pytest.mark.parametrize("kind", ["relu", "skip", "jumprelu_skip", "topk", "clt", "clt_topk"])
@pytest.mark.parametrize("family", FAMILIES)
def test_g2_interventions_agree(family: str, kind: str) -> None:
    check_g2(_graph(family, kind, _custom_targets(family)), (family, kind))


def check_g2(graph: AttributionGraph, label: tuple = ()) -> None:
    """G2: scaling sampled feature, error and token sources by ``1 + eps`` in the frozen
    model moves every row by ``eps`` times its edge."""
    ctx = graph.context
    assert ctx is not None
    nodes, rows = graph.nodes, _rows(graph)
    _, base_rec = ctx.run(feature_acts=dict(enumerate(ctx.activations)))
    base = _row_outputs(graph, base_rec)
    eps = 0.5
    gen = torch.Generator().manual_seed(0)
    picks = []
    for kind_name in ("feature", "error", "token"):
        idx = graph.indices(kind_name)
        picks += idx[torch.randperm(len(idx), generator=gen)[:4]].tolist()
    for s in picks:
        la, p, f = int(nodes.layer[s]), int(nodes.pos[s]), int(nodes.feature[s])
        acts = {i: a.clone() for i, a in enumerate(ctx.activations)}
        errors, embeddings = None, None
        k = int(nodes.kind[s])
        if k == 0:
            acts[la][p, f] *= 1 + eps
        elif k == 1:
            errors = {la: ctx.errors[la].clone()}
            errors[la][p] *= 1 + eps
        else:
            embeddings = ctx.embeddings.clone()
            embeddings[p] *= 1 + eps
        with torch.no_grad():
            _, rec = ctx.run(feature_acts=acts, errors=errors, embeddings=embeddings)
        measured = _row_outputs(graph, rec) - base
        predicted = eps * graph.adjacency[rows, s]
        scale = predicted.abs().max().clamp_min(1e-12)
        assert (measured - predicted).abs().max() <= 1e-4 * scale, (*label, s)


def test_default_targets_cover_probability() -> None:
    graph = _graph("gpt2", "relu")
    probs = torch.tensor([t.probability for t in graph.targets])
    assert 1 <= len(probs) <= 10
    assert probs.sum() >= 0.95 or len(probs) == 10
    assert (probs[:-1] >= probs[1:]).all()
    first = int(graph.indices("target")[0])
    assert graph.node_label(first) == f'Output "{graph.targets[0].label}" (p={probs[0]:.3f})'


def test_budget_keeps_exactly_budget_and_same_edges() -> None:
    full = _graph("llama", "jumprelu_skip")
    n_feat = full.nodes.count("feature")
    budget = n_feat // 3
    small = _graph("llama", "jumprelu_skip", max_feature_nodes=budget)
    assert small.nodes.count("feature") == budget
    assert len(small.excluded) == n_feat - budget
    # map each kept node to the full graph's node index
    key = lambda g: {  # noqa: E731
        (int(k), int(la), int(p), int(f)): i
        for i, (k, la, p, f) in enumerate(
            zip(g.nodes.kind, g.nodes.layer, g.nodes.pos, g.nodes.feature)
        )
    }
    full_index, small_index = key(full), key(small)
    idx = torch.tensor([full_index[k] for k in small_index])
    order = torch.tensor(list(small_index.values()))
    sub = full.adjacency[idx][:, idx]
    torch.testing.assert_close(small.adjacency[order][:, order], sub, rtol=1e-12, atol=1e-12)


def test_bad_inputs() -> None:
    model = cached_model("gpt2", False, F64)
    tcs = cached_transcoders("gpt2", "relu", False, F64)
    with pytest.raises(PromptError, match="empty"):
        AttributionGraph.build(model, tcs, [], show_progress=False)
    with pytest.raises(PromptError, match="n_ctx"):
        AttributionGraph.build(model, tcs, list(range(10)) * 10, show_progress=False)
    with pytest.raises(TargetError, match="outside the vocabulary"):
        AttributionGraph.build(model, tcs, prompt_tokens(), targets=[10_000], show_progress=False)
    with pytest.raises(TLCircuitsError, match="max_feature_nodes"):
        AttributionGraph.build(
            model, tcs, prompt_tokens(), max_feature_nodes=0, show_progress=False
        )
    with pytest.raises(TLCircuitsError, match="GiB"):
        AttributionGraph.build(
            model, tcs, prompt_tokens(), memory_limit_bytes=1000, show_progress=False
        )
