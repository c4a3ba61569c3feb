"""Head loadings after issue 16's speed-ups equal the previous code path (a frozen copy in
tests/_reference_head_loadings.py) on every family, per-layer and cross-layer transcoders,
float32, split by write layer or not, across batchings that make either side the held
one; and H1 still holds on the new path."""

from __future__ import annotations

import functools

import pytest
import torch
from _reference_head_loadings import head_loading_fields as reference_fields
from conftest import cached_model, cached_transcoders, prompt_tokens

import tl_circuits.attention.heads.compute as compute
from tl_circuits import HeadLoadings
from tl_circuits.attention.heads.plan import Plan
from tl_circuits.graph import AttributionGraph
from tl_circuits.testing import FAMILIES

F32 = torch.float32
RTOL = 1e-5


@functools.cache
def _graph(family: str, kind: str, pruned: bool) -> AttributionGraph:
    model = cached_model(family, False, F32)
    tcs = cached_transcoders(family, kind, False, F32)
    graph = AttributionGraph.build(
        model, tcs, prompt_tokens(14), show_progress=False, batch_size=64
    )
    return graph.prune(node_threshold=0.9, edge_threshold=0.98) if pruned else graph


def _reference(graph: AttributionGraph, edges: torch.Tensor, split: bool) -> dict:
    assert graph.context is not None
    with torch.no_grad():
        return reference_fields(graph, graph.context, edges, split, None, None, 4096, 2**30)


def _assert_same(new: HeadLoadings, ref: dict) -> None:
    """Every field equal to ``RTOL`` of the edge's scale (the largest of |edge|, its
    loadings and bypasses: a loading much smaller than the edge keeps float32 noise of
    the edge's size)."""
    assert torch.equal(new.edges, ref["edges"])
    assert torch.equal(new.crossed, ref["crossed"])
    assert torch.equal(new.edge_values, ref["edge_values"])
    scale = torch.maximum(ref["edge_values"].abs(), ref["loadings"].abs().amax((1, 2)))
    scale = torch.maximum(scale, ref["bypass"].abs().amax(1))[:, None]
    for name in ("loadings", "bypass", "values_by_write", "loadings_by_write", "bypass_by_write"):
        a, b = getattr(new, name), ref.get(name)
        if b is None:
            assert a is None, name
            continue
        s = scale.view(-1, *([1] * (b.dim() - 1)))
        err = ((a - b).abs() / s).max()
        assert float(err) <= RTOL, (name, float(err))


@pytest.mark.parametrize("kind", ["relu", "jumprelu_skip", "clt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_equal_to_the_previous_code_path(family: str, kind: str) -> None:
    graph = _graph(family, kind, pruned=True)
    edges = (graph.adjacency != 0).nonzero().cpu()
    assert len(edges) > 200
    split = kind == "clt"
    ref = _reference(graph, edges, split)
    new = HeadLoadings.compute(graph, edges, split_write_layers=split)
    _assert_same(new, ref)
    # small chunks and a small memory budget: many chunks, several held batches
    small = HeadLoadings.compute(
        graph, edges, split_write_layers=split, target_batch=7, source_batch=5, memory_bytes=2**20
    )
    _assert_same(small, ref)


@pytest.mark.parametrize("held", ["target", "unit"])
def test_either_side_held_gives_the_same_loadings(
    held: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forcing the plan to hold targets (units recomputed per batch) or units (targets
    recomputed) changes nothing; write values are read once per target chunk."""
    graph = _graph("llama", "clt", pruned=True)
    edges = (graph.adjacency != 0).nonzero().cpu()
    ref = _reference(graph, edges, True)

    def forced(targets, units, memory_bytes):
        chunks = targets if held == "target" else units
        batches = [[c] for c in range(len(chunks))]  # one chunk per held batch
        return Plan(held, batches)

    monkeypatch.setattr(compute, "plan", forced)
    new = HeadLoadings.compute(
        graph, edges, split_write_layers=True, target_batch=9, source_batch=6
    )
    _assert_same(new, ref)
