"""The graph JSON's ``extra["tl_circuits"]["qk"]`` block: top QK terms of the heads each
link's loadings point to (query = target position, key = source position)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.attention.qk.attribution import QKAttribution
from tl_circuits.attention.qk.basis import BIAS, EXCLUDED, QKBasis
from tl_circuits.errors import TLCircuitsError
from tl_circuits.export.frontend import export_json
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph.files import load_graph, save_graph

F64 = torch.float64
COMPONENT = {"type": "string", "minLength": 1}
TERM = {
    "type": "object",
    "required": ["value", "query", "key"],
    "properties": {"value": {"type": "number"}, "query": COMPONENT, "key": COMPONENT},
    "additionalProperties": False,
}
TERMS = {"type": "array", "items": TERM}
MARGINALS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["id", "value"],
        "properties": {"id": COMPONENT, "value": {"type": "number"}},
        "additionalProperties": False,
    },
}
SCHEMA = {
    "type": "object",
    "required": ["top_terms", "basis", "pairs", "links"],
    "properties": {
        "top_terms": {"type": "integer", "minimum": 1},
        "basis": {"const": "graph"},
        "pairs": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": [
                    "layer",
                    "head",
                    "query_pos",
                    "key_pos",
                    "score",
                    "soft_capped",
                    "remainder",
                    "terms",
                    "model_score",
                    "positive",
                    "negative",
                    "query_marginals",
                    "key_marginals",
                    "competition",
                ],
                "properties": {
                    "layer": {"type": "integer", "minimum": 0},
                    "head": {"type": "integer", "minimum": 0},
                    "query_pos": {"type": "integer", "minimum": 0},
                    "key_pos": {"type": "integer", "minimum": 0},
                    "score": {"type": "number"},
                    "soft_capped": {"type": "boolean"},
                    "remainder": {"type": "number"},
                    "terms": TERMS,
                    "model_score": {"type": "number"},
                    "positive": TERMS,
                    "negative": TERMS,
                    "query_marginals": MARGINALS,
                    "key_marginals": MARGINALS,
                    "competition": {
                        "type": "object",
                        "required": ["score", "terms"],
                        "properties": {"score": {"type": "number"}, "terms": TERMS},
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
        "links": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
    },
    "additionalProperties": False,
}


def _graph() -> tuple[AttributionGraph, HeadLoadings]:
    model = cached_model("llama", False, F64)
    tcs = cached_transcoders("llama", "relu", False, F64)
    graph = AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)
    pruned = graph.prune(node_threshold=0.6, edge_threshold=0.9)
    return pruned, HeadLoadings.compute(pruned)


def test_export_qk_block(tmp_path) -> None:
    graph, hl = _graph()
    k, top_heads = 4, 2
    doc = json.loads(
        json.dumps(
            export_json(graph, head_loadings=hl, top_heads=top_heads, qk_top_terms=k),
            allow_nan=False,
        )
    )
    block = doc["extra"]["tl_circuits"]["qk"]
    jsonschema.validate(block, SCHEMA)
    assert block["top_terms"] == k
    ids = [node["node_id"] for node in doc["nodes"]]
    node_of = {nid: i for i, nid in enumerate(ids)}
    heads_block = doc["extra"]["tl_circuits"]["head_loadings"]["links"]
    assert set(block["links"]) == set(heads_block)
    _, cache = graph.context.model.run_with_cache(graph.tokens[None])
    checked = 0
    bases: dict[int, QKBasis] = {}
    for link, pair_ids in block["links"].items():
        source, target = (node_of[x] for x in link.split("->"))
        # the link's listed heads, in the same order
        listed = [(h["layer"], h["head"]) for h in heads_block[link]["heads"]]
        assert [(block["pairs"][p]["layer"], block["pairs"][p]["head"]) for p in pair_ids] == listed
        for pid in pair_ids:
            pair = block["pairs"][pid]
            m, h, q, p = pair["layer"], pair["head"], pair["query_pos"], pair["key_pos"]
            assert (q, p) == (int(graph.nodes.pos[target]), int(graph.nodes.pos[source]))
            values = [t["value"] for t in pair["terms"]]
            assert len(values) == k
            assert [abs(v) for v in values] == sorted((abs(v) for v in values), reverse=True)
            # exact: listed terms + remainder = the model's own score
            assert sum(values) + pair["remainder"] == pytest_approx(pair["score"])
            real = cache[f"blocks.{m}.attn.hook_attn_scores"][0, h, q, p]
            assert pair["score"] == pytest_approx(float(real), rel=1e-4)
            # the listed terms are the QK attribution's largest ones
            if m not in bases:
                bases[m] = QKBasis.from_graph(graph, m)
            qk = QKAttribution.from_basis(bases[m], head=h, query_pos=q, key_pos=p)
            top = qk.top_terms(0, k)
            name = {BIAS: "bias", EXCLUDED: "excluded"}
            assert [(t["query"], t["key"]) for t in pair["terms"]] == [
                (name.get(t.query) or ids[t.query], name.get(t.key) or ids[t.key]) for t in top
            ]
            # the model's own clean pre-cap score (Q1)
            assert pair["model_score"] == pytest_approx(pair["score"], rel=1e-4)
            # signed views: all of one sign, ranked, the same terms as the attribution's
            pos_v = [t["value"] for t in pair["positive"]]
            neg_v = [t["value"] for t in pair["negative"]]
            assert all(v > 0 for v in pos_v) and pos_v == sorted(pos_v, reverse=True)
            assert all(v < 0 for v in neg_v) and neg_v == sorted(neg_v)
            assert pos_v == pytest.approx(
                [t.value for t in qk.top_terms(0, k, sign="positive") if t.value > 0]
            )
            assert neg_v == pytest.approx(
                [t.value for t in qk.top_terms(0, k, sign="negative") if t.value < 0]
            )
            # marginals: ranked by |value|, each equal to the row / column sum of the terms
            dense = qk.key_terms(0)
            q_ids = [name.get(c) or ids[c] for c in qk.q_components.tolist()]
            k_ids = [name.get(c) or ids[c] for c in qk.k_components.tolist()]
            for side, sums, names in (
                ("query_marginals", dense.sum(1), q_ids),
                ("key_marginals", dense.sum(0), k_ids),
            ):
                got = pair[side]
                assert 0 < len(got) <= k
                assert [abs(x["value"]) for x in got] == sorted(
                    (abs(x["value"]) for x in got), reverse=True
                )
                for x in got:  # a component live only at another listed key: 0 here
                    want_x = float(sums[names.index(x["id"])]) if x["id"] in names else 0.0
                    assert x["value"] == pytest_approx(want_x, 1e-6)
            # competition: score_k - sum_j p_j score_j over every key 0..q
            every = QKAttribution.from_basis(bases[m], head=h, query_pos=q)
            pattern = cache[f"blocks.{m}.attn.hook_pattern"][0, h, q, : q + 1].double()
            every_scores = cache[f"blocks.{m}.attn.hook_attn_scores"][0, h, q, : q + 1].double()
            want = float(every_scores[p] - pattern @ every_scores)
            assert pair["competition"]["score"] == pytest.approx(want, rel=1e-4, abs=1e-6)
            comp = [t["value"] for t in pair["competition"]["terms"]]
            assert 0 < len(comp) <= k
            assert [abs(v) for v in comp] == sorted((abs(v) for v in comp), reverse=True)
            full = every.competition_terms(p)
            assert abs(comp[0]) == pytest.approx(float(full.abs().max()), rel=1e-9)
            assert float(full.sum()) == pytest.approx(want, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked > 0
    # off by default; refused without head loadings or without the model (loaded graph)
    assert export_json(graph, head_loadings=hl)["extra"]["tl_circuits"]["qk"] is None
    loaded = load_graph(save_graph(graph, tmp_path / "g"))
    with pytest.raises(TLCircuitsError, match="loaded from disk"):
        export_json(loaded, head_loadings=hl, qk_top_terms=3)
    with pytest.raises(TLCircuitsError, match="needs head loadings"):
        export_json(graph, qk_top_terms=3)
    with pytest.raises(TLCircuitsError, match="non-negative"):
        export_json(graph, head_loadings=hl, qk_top_terms=-1)


def pytest_approx(x: float, rel: float = 1e-9):
    return pytest.approx(x, rel=rel, abs=1e-12)
