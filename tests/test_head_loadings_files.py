"""Head loadings as a value of their own: save/load beside a graph, the check that they
belong to the graph, and the frontend JSON's ``extra["tl_circuits"]["head_loadings"]``
block (issue 4; results-as-values design of issue 12)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens

from tl_circuits.attention.heads.loadings import FILE_NAME, HeadLoadings
from tl_circuits.errors import HeadLoadingError, TLCircuitsError
from tl_circuits.export.frontend import export_json
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph.files import HEADER_FILE, load_graph, save_graph

F64 = torch.float64
HL_FIELDS = ("edges", "edge_values", "loadings", "bypass", "crossed")
SPLIT_FIELDS = ("write_layers", "loadings_by_write", "bypass_by_write", "values_by_write")


@functools.cache
def _pruned() -> AttributionGraph:
    model = cached_model("gpt2", False, F64)
    tcs = cached_transcoders("gpt2", "jumprelu_skip", False, F64)
    graph = AttributionGraph.build(
        model, tcs, prompt_tokens(), targets=[7, (3, 9)], show_progress=False, batch_size=32
    )
    return graph.prune(node_threshold=0.8, edge_threshold=0.9)


@functools.cache
def _loadings(split: bool = False) -> HeadLoadings:
    graph = _pruned()
    hl = HeadLoadings.compute(graph, split_write_layers=split)
    assert hl.n_edges == int((graph.adjacency != 0).sum()) > 0
    return hl


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("single_file", [False, True])
def test_head_loadings_round_trip_exact(tmp_path, split, single_file):
    graph, hl = _pruned(), _loadings(split)
    path = tmp_path / ("hl.safetensors" if single_file else "g")
    if not single_file:
        save_graph(graph, path)
    written = hl.save(path)
    assert written == (path if single_file else path / FILE_NAME)
    if not single_file:  # the graph's own files do not mention the loadings
        assert "head_loadings" not in json.loads((path / HEADER_FILE).read_text())
        graph = load_graph(path)
    got = HeadLoadings.load(path, graph=graph)
    for name in HL_FIELDS + SPLIT_FIELDS:
        a, b = getattr(hl, name), getattr(got, name)
        if not split and name in SPLIT_FIELDS:
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b), name
    # the JSON export with the loaded graph and loadings equals the original's
    assert export_json(graph, head_loadings=got) == export_json(_pruned(), head_loadings=hl)


def test_graph_without_loadings(tmp_path):
    graph = _pruned()
    save_graph(graph, tmp_path / "g")
    assert "head_loadings" not in json.loads((tmp_path / "g" / HEADER_FILE).read_text())
    with pytest.raises(FileNotFoundError, match=r"HeadLoadings\.save"):
        HeadLoadings.load(tmp_path / "g")
    assert export_json(graph)["extra"]["tl_circuits"]["head_loadings"] is None
    assert graph.to_json()["extra"]["tl_circuits"]["head_loadings"] is None


def test_loadings_of_another_graph_are_refused(tmp_path):
    graph, hl = _pruned(), _loadings()
    small = graph.prune(node_threshold=0.5, edge_threshold=0.5)
    assert small.n_nodes < graph.n_nodes
    assert int(hl.edges.max()) >= small.n_nodes  # (target rows come last)
    with pytest.raises(HeadLoadingError, match="another graph"):
        hl.check_graph(small)
    with pytest.raises(TLCircuitsError, match="another graph"):
        export_json(small, head_loadings=hl)
    # same node count, different edge values: refused as well
    shifted = graph.with_adjacency(graph.adjacency * 2)
    with pytest.raises(HeadLoadingError, match="another graph"):
        export_json(shifted, head_loadings=hl)
    save_graph(shifted, tmp_path / "g")
    hl.save(tmp_path / "g")
    with pytest.raises(HeadLoadingError, match="another graph"):
        HeadLoadings.load(tmp_path / "g", graph=load_graph(tmp_path / "g"))


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata={"format": "no"})
    with pytest.raises(HeadLoadingError, match=r"not a tl_circuits\.head_loadings file"):
        HeadLoadings.load(tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HeadLoadingError, match="not a readable safetensors"):
        HeadLoadings.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("k", [3, 1])
def test_export_head_loadings_block(k):
    graph, hl = _pruned(), _loadings()
    doc = json.loads(json.dumps(export_json(graph, head_loadings=hl, top_heads=k), allow_nan=False))
    block = doc["extra"]["tl_circuits"]["head_loadings"]
    n_layers, n_heads = hl.loadings.shape[1:]
    assert (block["top_heads"], block["n_layers"], block["n_heads"]) == (k, n_layers, n_heads)
    assert torch.equal(torch.tensor(block["head_totals"], dtype=F64), hl.head_totals())

    link_weight = {f"{x['source']}->{x['target']}": x["weight"] for x in doc["links"]}
    ids = [node["node_id"] for node in doc["nodes"]]
    links = block["links"]
    # every edge of the loadings is a link here (pruned graph: all its edges computed)
    assert set(links) == set(link_weight)
    for i, (t, s) in enumerate(hl.edges.tolist()):
        key = f"{ids[s]}->{ids[t]}"
        entry = links[key]
        assert entry["weight"] == link_weight[key] == float(hl.edge_values[i])
        expected = hl.top_heads(i, k)
        assert [(h["layer"], h["head"], h["loading"]) for h in entry["heads"]] == expected
        assert 0 < len(entry["heads"]) <= k or not bool(hl.crossed[i].any())
        mags = [abs(h["loading"]) for h in entry["heads"]]
        assert mags == sorted(mags, reverse=True)
        crossed = hl.crossed[i]
        if not bool(crossed.any()):
            assert entry["heads"] == [] and entry["bypass"] is None
            continue
        # the listed heads are the largest |loading| of the edge
        if len(entry["heads"]) == k:
            rest = hl.loadings[i].abs().flatten().sort(descending=True).values
            assert mags[-1] == float(rest[k - 1])
        m = entry["bypass"]["layer"]
        assert bool(crossed[m]) and entry["bypass"]["value"] == float(hl.bypass[i, m])
        assert abs(entry["bypass"]["value"]) == float(hl.bypass[i][crossed].abs().max())


def test_export_only_links_and_user_extra_wins():
    graph, hl = _pruned(), _loadings()
    # loadings of a subset of edges; drop one of them from the adjacency (no longer a link)
    sub = HeadLoadings.compute(graph, hl.edges[:5])
    t, s = sub.edges[0].tolist()
    adjacency = graph.adjacency.clone()
    adjacency[t, s] = 0
    cut = graph.with_adjacency(adjacency)
    block = export_json(cut, head_loadings=sub)["extra"]["tl_circuits"]["head_loadings"]
    assert len(block["links"]) == 4
    doc = export_json(cut, head_loadings=sub, extra={"head_loadings": {"mine": 1}})
    assert doc["extra"]["tl_circuits"]["head_loadings"] == {"mine": 1}
