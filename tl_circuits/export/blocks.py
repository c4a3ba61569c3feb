"""The ``head_loadings`` and ``qk`` entries of the frontend JSON's extra block (formats in
:func:`tl_circuits.export.frontend.export_json`): for each link, the heads that carried it
and the top QK terms of those heads at (query = target position, key = source position)."""

from __future__ import annotations

from typing import Any

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.attention.qk.attribution import QKAttribution
from tl_circuits.attention.qk.basis import BIAS, EXCLUDED, QKBasis
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.graph import AttributionGraph


def head_loadings_block(
    graph: AttributionGraph, hl: HeadLoadings, ids: list[str], top_heads: int
) -> dict[str, Any]:
    """Per link (an edge of ``hl`` that is a nonzero adjacency entry, counted once): its
    weight, its ``top_heads`` heads and its largest bypass."""
    _check_count("top_heads", top_heads)
    hl.check_graph(graph)
    adj = graph.adjacency.detach().cpu()
    bypass = hl.bypass.detach().cpu().double()
    crossed = hl.crossed.detach().cpu()
    _, n_layers, n_heads = hl.loadings.shape
    links: dict[str, Any] = {}
    for i, (t, s) in enumerate(hl.edges.detach().cpu().tolist()):
        key = f"{ids[s]}->{ids[t]}"
        if adj[t, s] == 0 or key in links:
            continue  # not a link, or listed already
        heads = [{"layer": m, "head": h, "loading": v} for m, h, v in hl.top_heads(i, top_heads)]
        largest_bypass = None
        layers = crossed[i].nonzero(as_tuple=True)[0]
        if len(layers):
            m = int(layers[int(bypass[i, layers].abs().argmax())])
            largest_bypass = {"layer": m, "value": float(bypass[i, m])}
        links[key] = {"weight": float(adj[t, s]), "heads": heads, "bypass": largest_bypass}
    return {
        "top_heads": top_heads,
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "head_totals": hl.head_totals().detach().cpu().double().tolist(),
        "links": links,
    }


def qk_block(
    graph: AttributionGraph, hl: HeadLoadings, ids: list[str], top_heads: int, top_terms: int
) -> dict[str, Any]:
    """Top ``top_terms`` QK terms per (head, query, key) for the ``top_heads`` heads of
    each link (graph-node basis, one basis per layer shared by its heads)."""
    _check_count("qk_top_terms", top_terms)
    if graph.context is None:
        raise TLCircuitsError(
            "qk_top_terms needs the graph's model (replacement context); a graph loaded from "
            "disk has none: rebuild it with AttributionGraph.build"
        )
    hl.check_graph(graph)
    wanted, links = _pairs_of_links(graph, hl, ids, top_heads)

    def component(c: int) -> str:
        return {BIAS: "bias", EXCLUDED: "excluded"}.get(c) or ids[c]

    pairs: dict[str, Any] = {}
    bases: dict[int, QKBasis] = {}
    for (m, h, q), keys in sorted(wanted.items()):
        if m not in bases:
            bases[m] = QKBasis.from_graph(graph, m)
        key_pos = sorted(keys)
        qk = QKAttribution.from_basis(bases[m], head=h, query_pos=q, key_pos=key_pos)
        sparse = qk.sparse_terms(top_terms)
        for ki, p in enumerate(key_pos):
            terms = zip(
                sparse.query[ki].tolist(),
                sparse.key[ki].tolist(),
                sparse.value[ki].tolist(),
                strict=True,
            )
            pairs[_pair_id(m, h, q, p)] = {
                "layer": m,
                "head": h,
                "query_pos": q,
                "key_pos": p,
                "score": float(qk.scores[ki]),
                "soft_capped": qk.soft_capped,
                "remainder": float(sparse.remainder[ki]),
                "terms": [
                    {"value": float(v), "query": component(a), "key": component(b)}
                    for a, b, v in terms
                ],
            }
    return {"top_terms": top_terms, "basis": "graph", "pairs": pairs, "links": links}


def _pairs_of_links(
    graph: AttributionGraph, hl: HeadLoadings, ids: list[str], top_heads: int
) -> tuple[dict[tuple[int, int, int], set[int]], dict[str, list[str]]]:
    """``(layer, head, query) -> key positions`` needed, and ``link -> its pair ids``."""
    pos = graph.nodes.pos.tolist()
    adj = graph.adjacency
    wanted: dict[tuple[int, int, int], set[int]] = {}
    links: dict[str, list[str]] = {}
    for i, (t, s) in enumerate(hl.edges.tolist()):
        key = f"{ids[s]}->{ids[t]}"
        if adj[t, s] == 0 or key in links:
            continue
        q, p = pos[t], pos[s]
        links[key] = []
        for m, h, _ in hl.top_heads(i, top_heads):
            wanted.setdefault((m, h, q), set()).add(p)
            links[key].append(_pair_id(m, h, q, p))
    return wanted, links


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TLCircuitsError(f"{name} must be a non-negative integer, got {value!r}")


def _pair_id(layer: int, head: int, query_pos: int, key_pos: int) -> str:
    return f"L{layer}H{head}@{query_pos}:{key_pos}"
