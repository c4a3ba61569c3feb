"""Causal block storage of the adjacency: every build on 5 families x 3 transcoder kinds
fits the causal source sets (``set_rows`` raises on an acausal edge, and G1 in
test_graph_build checks the stored rows still sum to the pre-activations), the blocks
reproduce the dense matrix however the rows are written, and an acausal edge is an error."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens

from tl_circuits import AttributionGraph
from tl_circuits.graph.causal_adjacency import CausalAdjacency, causal_groups
from tl_circuits.graph.nodes import FEATURE
from tl_circuits.testing import FAMILIES

F64 = torch.float64


@pytest.mark.parametrize("kind", ["relu", "jumprelu_skip", "clt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_causal_blocks_hold_every_edge(family: str, kind: str) -> None:
    model = cached_model(family, False, F64)
    tcs = cached_transcoders(family, kind, False, F64)
    graph = AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)
    dense = graph.adjacency
    nodes = graph.nodes
    adj = CausalAdjacency.from_groups(
        len(nodes.kind), causal_groups(nodes.kind, nodes.layer, nodes.pos), dtype=F64
    )
    every = torch.arange(len(nodes))
    adj.set_rows(every, dense)
    # nothing outside the causal source sets: the blocks reproduce the matrix exactly
    torch.testing.assert_close(adj.to_dense(), dense, rtol=0, atol=0)
    assert adj.nbytes < 0.6 * dense.numel() * dense.element_size()
    gen = torch.Generator().manual_seed(0)
    # rows written in several batches land in the same place
    again = CausalAdjacency.from_groups(
        len(nodes.kind), causal_groups(nodes.kind, nodes.layer, nodes.pos), dtype=F64
    )
    order = torch.randperm(len(nodes), generator=gen)
    for chunk in order.split(7):
        again.set_rows(chunk, dense[chunk])
    torch.testing.assert_close(again.to_dense(), dense, rtol=0, atol=0)
    assert (nodes.kind == FEATURE).any()


def test_an_edge_outside_the_causal_set_is_an_error() -> None:
    # nodes: feature L0 @0, feature L1 @1, error L0 @0, token @0, token @1, target @1
    kind = torch.tensor([0, 0, 1, 2, 2, 3])
    layer = torch.tensor([0, 1, 0, -1, -1, 2])
    pos = torch.tensor([0, 1, 0, 0, 1, 1])
    adj = CausalAdjacency.from_groups(len(kind), causal_groups(kind, layer, pos), dtype=F64)
    ok = torch.zeros(1, 6, dtype=F64)
    ok[0, [0, 2, 3, 4]] = 1.0  # L1 @1 reads L0 features/errors and tokens @<=1
    adj.set_rows(torch.tensor([1]), ok)
    assert adj.to_dense()[1].tolist() == ok[0].tolist()
    bad = torch.zeros(1, 6, dtype=F64)
    bad[0, 4] = 1.0  # L0 @0 reading the token at position 1: acausal
    with pytest.raises(ValueError, match="outside their causal set"):
        adj.set_rows(torch.tensor([0]), bad)


@pytest.mark.parametrize("family", ["gpt2", "pythia"])
def test_pruning_scores_and_files_work_on_the_blocks(family: str, tmp_path) -> None:
    """Pruning, scores, subgraphs and saving a full graph read its causal blocks group by
    group: the dense matrix is never built, and every result equals the dense path's."""
    from tl_circuits.graph.pruning import subgraph

    model = cached_model(family, False, F64)
    tcs = cached_transcoders(family, "clt", False, F64)
    graph = AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)
    assert isinstance(graph.edges, CausalAdjacency)
    pruned = graph.prune(node_threshold=0.7, edge_threshold=0.95)
    scores = graph.scores()
    some = subgraph(graph, torch.arange(0, graph.n_nodes, 3))
    path = graph.save(tmp_path / "g")
    assert graph._dense is None  # none of the above made the dense view
    dense = graph.with_adjacency(graph.edges.to_dense())
    assert isinstance(dense.edges, torch.Tensor)
    reference = dense.prune(node_threshold=0.7, edge_threshold=0.95)
    assert pruned.info["pruned"] == reference.info["pruned"]
    assert torch.equal(pruned.adjacency, reference.adjacency)
    assert (pruned.adjacency != 0).sum() > 0 and len(pruned.nodes) < len(graph.nodes)
    ref_scores = dense.scores()
    assert scores.replacement == pytest.approx(ref_scores.replacement, rel=1e-12)
    assert scores.completeness == pytest.approx(ref_scores.completeness, rel=1e-12)
    assert torch.equal(some.adjacency, subgraph(dense, torch.arange(0, graph.n_nodes, 3)).adjacency)
    loaded = AttributionGraph.load(path)
    assert torch.equal(loaded.adjacency, dense.adjacency)
