"""The ``qk`` entry of the graph JSON's extra block (format in
:func:`tl_circuits.graph.files.export_json`): for each link, the top QK terms of the heads its
loadings point to, at (query = target position, key = source position)."""

from __future__ import annotations

from typing import Any

from tl_circuits.attention.qk.attribution import BIAS, EXCLUDED, QKAttribution, QKBasis
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.graph import AttributionGraph


def qk_block(graph: AttributionGraph, ids: list[str], top_heads: int, k: int) -> dict[str, Any]:
    """Top ``k`` terms per (head, query, key) for the ``top_heads`` heads of each link."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise TLCircuitsError(f"qk_top_terms must be a non-negative integer, got {k!r}")
    hl = graph.head_loadings
    if hl is None:
        raise TLCircuitsError(
            "qk_top_terms needs head loadings (which heads each link crosses): call "
            "graph.compute_head_loadings() first"
        )
    if graph.context is None:
        raise TLCircuitsError(
            "qk_top_terms needs the graph's model (replacement context); a graph loaded from "
            "disk has none: rebuild it with AttributionGraph.build"
        )
    pos = graph.nodes.pos.tolist()
    adj = graph.adjacency
    # (layer, head, query) -> key positions needed; link -> its pair keys
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

    def component(c: int) -> str:
        return {BIAS: "bias", EXCLUDED: "excluded"}.get(c) or ids[c]

    pairs: dict[str, Any] = {}
    bases: dict[int, QKBasis] = {}
    for (m, h, q), keys in sorted(wanted.items()):
        if m not in bases:
            bases[m] = QKBasis.from_graph(graph, m)
        key_pos = sorted(keys)
        qk = QKAttribution.from_basis(bases[m], head=h, query_pos=q, key_pos=key_pos)
        sparse = qk.sparse_terms(k)
        for ki, p in enumerate(key_pos):
            pairs[_pair_id(m, h, q, p)] = {
                "layer": m,
                "head": h,
                "query_pos": q,
                "key_pos": p,
                "score": float(qk.scores[ki]),
                "soft_capped": qk.soft_capped,
                "remainder": float(sparse.remainder[ki]),
                "terms": [
                    {"value": float(v), "query": component(int(a)), "key": component(int(b))}
                    for a, b, v in zip(
                        sparse.query[ki].tolist(),
                        sparse.key[ki].tolist(),
                        sparse.value[ki].tolist(),
                        strict=True,
                    )
                ],
            }
    return {"top_terms": k, "basis": "graph", "pairs": pairs, "links": links}


def _pair_id(layer: int, head: int, query_pos: int, key_pos: int) -> str:
    return f"L{layer}H{head}@{query_pos}:{key_pos}"
