"""The graph picture: files written, what is drawn, prompt text escaped, bad options."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.errors import TLCircuitsError
from tl_circuits.export.picture import (
    _edges_to_draw,
    draw_graph,
    node_coordinates,
    save_graph_picture,
)
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph.nodes import TOKEN


@pytest.fixture(scope="module")
def pruned() -> AttributionGraph:
    model = cached_model("gpt2")
    graph = AttributionGraph.build(model, cached_transcoders("gpt2", "relu"), prompt_tokens(8))
    return graph.prune()


@pytest.fixture(scope="module")
def loadings(pruned: AttributionGraph) -> HeadLoadings:
    return HeadLoadings.compute(pruned)


def test_layout_rows_and_columns(pruned: AttributionGraph) -> None:
    xy = node_coordinates(pruned)
    nodes = pruned.nodes
    n_layers = pruned.info["n_layers"]
    # rows: tokens at 0, layer l at l + 1, targets at n_layers + 1
    expected_y = torch.where(nodes.kind == TOKEN, 0, nodes.layer + 1).double()
    assert torch.equal(xy[:, 1], expected_y)
    assert float(xy[:, 1].max()) == n_layers + 1
    # columns: every node within half a column of its position, no two nodes on one spot
    assert bool(((xy[:, 0] - nodes.pos.double()).abs() <= 0.41).all())
    assert len({tuple(p) for p in xy.tolist()}) == len(nodes)


def test_edges_drawn_are_the_largest(pruned: AttributionGraph) -> None:
    edges = _edges_to_draw(pruned, 10)
    weights = pruned.adjacency[edges[:, 0], edges[:, 1]].abs()
    all_weights = pruned.adjacency[pruned.adjacency != 0].abs()
    assert edges.shape[0] == 10
    assert float(weights.min()) >= float(torch.sort(all_weights, descending=True).values[9])


def test_pictures_written_and_heads_named(
    pruned: AttributionGraph, loadings: HeadLoadings, tmp_path
) -> None:
    files = save_graph_picture(pruned, tmp_path / "g", head_loadings=loadings, label_heads=5)
    assert [f.suffix for f in files] == [".svg", ".png"]
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = files[0].read_text()
    # the strongest cross-position edge's top head is named in the picture
    pos = pruned.nodes.pos
    cross = [i for i, (t, s) in enumerate(loadings.edges.tolist()) if pos[t] != pos[s]]
    best = max(cross, key=lambda i: abs(float(loadings.edge_values[i])))
    layer, head, _ = loadings.top_heads(best, k=1)[0]
    assert f"L{layer}H{head}" in svg


def test_prompt_text_is_escaped(pruned: AttributionGraph, tmp_path) -> None:
    strings = list(pruned.token_strings)
    strings[1] = "<script>alert(1)</script>"
    graph = replace(pruned, token_strings=strings, info={**pruned.info, "prompt": "a<b>&c"})
    svg = save_graph_picture(graph, tmp_path / "x", formats=("svg",))[0].read_text()
    assert "<script>" not in svg and "<b>" not in svg
    assert "&lt;script&gt;" in svg


def test_bad_options(pruned: AttributionGraph, tmp_path) -> None:
    with pytest.raises(TLCircuitsError, match="max_edges"):
        draw_graph(pruned, max_edges=0)
    with pytest.raises(TLCircuitsError, match="unsupported picture formats"):
        save_graph_picture(pruned, tmp_path / "g", formats=("gif",))
