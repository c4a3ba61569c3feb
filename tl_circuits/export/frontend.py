"""The frontend graph JSON with the attention analyses handed in (DESIGN.md §6).

:func:`export_json` writes what :func:`tl_circuits.graph.frontend.frontend_json` writes for
the graph itself, plus, under ``json["extra"]["tl_circuits"]``, the head loadings the caller
computed and, optionally, QK terms of the heads they name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.errors import TLCircuitsError
from tl_circuits.export.blocks import head_loadings_block, qk_block
from tl_circuits.graph.frontend import frontend_json
from tl_circuits.graph.graph import AttributionGraph


def export_json(
    graph: AttributionGraph,
    path: str | Path | None = None,
    *,
    head_loadings: HeadLoadings | None = None,
    top_heads: int = 3,
    qk_top_terms: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """The frontend JSON of ``graph`` with its head loadings and QK terms; written to
    ``path`` if given. ``options`` are those of
    :func:`~tl_circuits.graph.frontend.frontend_json` (slug, scan, clerps, extra, ...).

    ``json["extra"]["tl_circuits"]["head_loadings"]`` is ``null`` unless ``head_loadings``
    (:meth:`HeadLoadings.compute` of this graph) is given; then, for a viewer to show on
    hovering a link::

        {
          "top_heads": k,                  # the top_heads argument
          "n_layers": L, "n_heads": H,
          "head_totals": [[...H floats] * L],   # HeadLoadings.head_totals(): sum |loading|
          "links": {
            "{source node_id}->{target node_id}": {   # ids exactly as in json["links"]
              "weight": float,             # the edge (= the link's weight)
              "heads": [{"layer": m, "head": h, "loading": float}, ...],
              "bypass": {"layer": m, "value": float} | null,
            },
            ...
          },
        }

    ``heads``: up to ``k`` heads of crossed layers, largest ``|loading|`` first
    (:meth:`HeadLoadings.top_heads`); ``bypass``: the crossed layer whose bypass (the part
    of the edge around that layer's attention) is largest in magnitude, ``null`` when the
    edge crosses no attention layer. Only edges that are both links (nonzero adjacency)
    and rows of the loadings are listed; an edge listed twice in the loadings counts once.

    ``json["extra"]["tl_circuits"]["qk"]`` is ``null`` unless ``qk_top_terms > 0``, which
    needs ``head_loadings`` and the graph's replacement context (a graph loaded from disk
    has none: rebuild it; both are refused with :class:`~tl_circuits.errors.TLCircuitsError`).
    Then, for each link's listed heads, the head's QK attribution (graph-node basis,
    :class:`~tl_circuits.attention.qk.attribution.QKAttribution`) at query position = the
    target's position and key position = the source's::

        {
          "top_terms": k, "basis": "graph",
          "pairs": {
            "L{m}H{h}@{query_pos}:{key_pos}": {
              "layer": m, "head": h, "query_pos": q, "key_pos": p,
              "score": float,              # the pre-soft-cap score (sum of all terms)
              "soft_capped": bool,         # the model caps it with tanh afterwards
              "remainder": float,          # score minus the listed terms
              "terms": [{"value": float, "query": id, "key": id}, ...],  # top |value|
              "model_score": float,        # the model's clean pre-cap q.k / attn_scale
              "positive": [term, ...],     # the top terms > 0, largest first
              "negative": [term, ...],     # the top terms < 0, most negative first
              "query_marginals": [{"id": id, "value": float}, ...],  # top |value|
              "key_marginals": [{"id": id, "value": float}, ...],
              "competition": {             # over every key 0..query_pos the query sees
                "score": float,            # score_k - sum_j p_j score_j (p: clean pattern)
                "terms": [term, ...],      # top |value| terms of that difference
              },
            }, ...
          },
          "links": {"{source node_id}->{target node_id}": ["L{m}H{h}@q:p", ...]},
        }

    Component ids are node ids as in ``json["nodes"]``, or ``"bias"`` (all constants) and
    ``"excluded"`` (nodes a budget or pruning left out).
    """
    if qk_top_terms and head_loadings is None:
        raise TLCircuitsError(
            "qk_top_terms needs head loadings (which heads each link crosses): pass "
            "head_loadings=HeadLoadings.compute(graph)"
        )

    def blocks(ids: list[str]) -> Mapping[str, Any]:
        if head_loadings is None:
            return {}
        out = {"head_loadings": head_loadings_block(graph, head_loadings, ids, top_heads)}
        if qk_top_terms:
            out["qk"] = qk_block(graph, head_loadings, ids, top_heads, qk_top_terms)
        return out

    return frontend_json(graph, path, blocks=blocks, **options)
