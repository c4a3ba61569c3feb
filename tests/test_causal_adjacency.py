"""Causal block storage of the adjacency (issue 3, work in progress): the causal source
sets hold every edge a real build produces, and the storage reproduces the dense matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens

from tl_circuits import AttributionGraph
from tl_circuits.graph.causal_adjacency import CausalAdjacency
from tl_circuits.graph.nodes import FEATURE, TARGET
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
    adj = CausalAdjacency.from_nodes(nodes.kind, nodes.layer, nodes.pos, dtype=F64)
    every = torch.arange(len(nodes))
    adj.set_rows(every, dense)
    # nothing outside the causal source sets: the blocks reproduce the matrix exactly
    torch.testing.assert_close(adj.to_dense(), dense, rtol=0, atol=0)
    assert adj.nbytes < 0.6 * dense.numel() * dense.element_size()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(len(nodes), 3, generator=gen, dtype=F64)
    torch.testing.assert_close(adj.matvec(v), dense @ v)
    torch.testing.assert_close(adj.rmatvec(v), dense.T @ v)
    torch.testing.assert_close(adj.matvec(v[:, 0]), dense @ v[:, 0])
    keep = torch.randperm(len(nodes), generator=gen)[: len(nodes) // 3].sort().values
    keep = torch.cat([keep, (nodes.kind == TARGET).nonzero()[:, 0]]).unique()
    torch.testing.assert_close(adj.submatrix(keep), dense[keep][:, keep], rtol=0, atol=0)
    # rows written in several batches land in the same place
    again = CausalAdjacency.from_nodes(nodes.kind, nodes.layer, nodes.pos, dtype=F64)
    order = torch.randperm(len(nodes), generator=gen)
    for chunk in order.split(7):
        again.set_rows(chunk, dense[chunk])
    torch.testing.assert_close(again.to_dense(), dense, rtol=0, atol=0)
    assert (nodes.kind == FEATURE).any()
