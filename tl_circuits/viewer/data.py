"""The viewer document: the frontend graph JSON plus what the interactive viewer shows.

:func:`viewer_document` is :func:`tl_circuits.export.frontend.export_json` (``metadata``,
``qParams``, ``nodes``, ``links`` and ``extra.tl_circuits`` with ``head_loadings`` and
``qk``, unchanged) plus ``doc["extra"]["tl_circuits"]["viewer"]``::

    {
      "version": 1,
      "n_layers": L, "n_heads": H, "n_pos": P, "prompt_tokens": [str, ...],
      "attention": {"L{m}H{h}": [[float] * P] * P},     # clean pattern, rows = queries
      "link_heads": {
        "{source node_id}->{target node_id}": {
          "layers": [m, ...],                # the attention layers the edge crosses
          "loadings": [[H floats], ...],     # per crossed layer (HeadLoadings.loadings)
          "bypass": [float, ...],            # per crossed layer
          "weight": float,                   # the link's weight (= bypass + sum loadings, H1)
        }, ...
      },
      "feature_cards": {node_id: {"contexts": [
          {"tokens": [str], "acts": [float], "max_act": float, "max_pos": int}, ...]}},
      "annotations": {"pinned": [node_id, ...], "supernodes": [{"name": str,
                      "members": [node_id, ...]}, ...]},
    }

``attention`` lists every head named in a link's ``head_loadings`` entry (``{}`` without the
graph's replacement context, e.g. a graph loaded from disk); ``link_heads`` the
``link_heads_edges`` strongest links that have head loadings. A context's ``max_pos`` is the
index of its maximum in its ``tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.errors import TLCircuitsError
from tl_circuits.export.frontend import export_json
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import KINDS
from tl_circuits.transcoders.feature_cards import FeatureCards

__all__ = [
    "MAX_ANNOTATION_IDS",
    "MAX_SUPERNODES",
    "MAX_SUPERNODE_NAME",
    "VIEWER_VERSION",
    "check_annotations",
    "empty_annotations",
    "merge_annotations",
    "node_ids",
    "viewer_document",
]

VIEWER_VERSION = 1
#: bounds on an annotations object (the server refuses larger ones)
MAX_ANNOTATION_IDS = 10_000
MAX_SUPERNODES = 1_000
MAX_SUPERNODE_NAME = 200


def viewer_document(
    graph: AttributionGraph,
    head_loadings: HeadLoadings | None = None,
    *,
    qk_top_terms: int = 10,
    top_heads: int = 3,
    link_heads_edges: int = 300,
    feature_cards: FeatureCards | Mapping[str, Any] | None = None,
    annotations: Mapping[str, Any] | None = None,
    decode: Callable[[int], str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The viewer document of ``graph`` (module docstring).

    - ``head_loadings``: :meth:`HeadLoadings.compute` of this graph (no ``link_heads``,
      attention or QK terms without it); QK terms need the graph's replacement context and
      are left out (``qk: null``) when the graph has none
    - ``feature_cards``: :class:`FeatureCards` of the graph's transcoders (cards of its
      feature nodes are embedded; token strings by ``decode``, default the graph's model's
      ``to_single_str_token`` when it has a context), or a ready ``{node_id: card}`` mapping
    - ``annotations``: checked by :func:`check_annotations`
    - ``options``: passed to :func:`export_json` (slug, scan, clerps, ...)
    """
    if isinstance(link_heads_edges, bool) or not isinstance(link_heads_edges, int):
        raise TLCircuitsError(f"link_heads_edges must be an integer, got {link_heads_edges!r}")
    if link_heads_edges < 0:
        raise TLCircuitsError(f"link_heads_edges must be >= 0, got {link_heads_edges}")
    ctx = graph.context
    qk_terms = qk_top_terms if (head_loadings is not None and ctx is not None) else 0
    doc = export_json(
        graph, head_loadings=head_loadings, qk_top_terms=qk_terms, top_heads=top_heads, **options
    )
    ids = node_ids(doc)
    block = doc["extra"]["tl_circuits"]
    n_layers = int(graph.info.get("n_layers", 0)) if isinstance(graph.info, dict) else 0
    if ctx is not None:
        n_layers = int(ctx.model.cfg.n_layers)
    n_heads = 0
    if head_loadings is not None:
        _, n_layers, n_heads = (int(x) for x in head_loadings.loadings.shape)
    elif ctx is not None:
        n_heads = int(ctx.model.cfg.n_heads)
    heads_block = block.get("head_loadings") or {}
    viewer = {
        "version": VIEWER_VERSION,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_pos": len(graph.token_strings),
        "prompt_tokens": list(graph.token_strings),
        "attention": _attention(graph, heads_block),
        "link_heads": (
            _link_heads(graph, head_loadings, ids, link_heads_edges)
            if head_loadings is not None
            else {}
        ),
        "feature_cards": _cards(graph, ids, feature_cards, decode),
        "annotations": empty_annotations(),
    }
    block["viewer"] = viewer
    if annotations is not None:
        merge_annotations(doc, check_annotations(annotations, set(ids)))
    return doc


def node_ids(doc: Mapping[str, Any]) -> list[str]:
    """The ``node_id`` of every node of a frontend JSON document."""
    nodes = doc.get("nodes")
    if not isinstance(nodes, list):
        return []
    return [
        n["node_id"] for n in nodes if isinstance(n, dict) and isinstance(n.get("node_id"), str)
    ]


def empty_annotations() -> dict[str, list[Any]]:
    return {"pinned": [], "supernodes": []}


def check_annotations(value: Any, ids: set[str]) -> dict[str, Any]:
    """``value`` as a clean annotations object, or :class:`TLCircuitsError` saying what is
    wrong: exactly the keys ``pinned`` (unique node ids of the graph) and ``supernodes``
    (``{"name": str, "members": [node id, ...]}``), within the ``MAX_*`` bounds."""
    if not isinstance(value, Mapping):
        raise TLCircuitsError("annotations must be a JSON object")
    keys = set(value)
    if keys != {"pinned", "supernodes"}:
        raise TLCircuitsError(
            "annotations must have exactly the keys 'pinned' and 'supernodes', got "
            f"{sorted(map(str, keys))[:5]}"
        )
    pinned = _id_list(value["pinned"], ids, "pinned")
    sups = value["supernodes"]
    if not isinstance(sups, list) or len(sups) > MAX_SUPERNODES:
        raise TLCircuitsError(f"supernodes must be a list of at most {MAX_SUPERNODES}")
    supernodes = []
    for i, sup in enumerate(sups):
        if not isinstance(sup, Mapping) or set(sup) != {"name", "members"}:
            raise TLCircuitsError(f"supernodes[{i}] must be {{'name': str, 'members': [...]}}")
        name = sup["name"]
        if not isinstance(name, str) or len(name) > MAX_SUPERNODE_NAME:
            raise TLCircuitsError(
                f"supernodes[{i}].name must be a string of at most {MAX_SUPERNODE_NAME} characters"
            )
        members = _id_list(sup["members"], ids, f"supernodes[{i}].members")
        supernodes.append({"name": name, "members": members})
    total = len(pinned) + sum(len(s["members"]) for s in supernodes)
    if total > MAX_ANNOTATION_IDS:
        raise TLCircuitsError(f"annotations name {total} node ids, more than {MAX_ANNOTATION_IDS}")
    return {"pinned": pinned, "supernodes": supernodes}


def merge_annotations(doc: dict[str, Any], annotations: Mapping[str, Any]) -> dict[str, Any]:
    """Put checked ``annotations`` into ``doc``: ``extra.tl_circuits.viewer.annotations``
    when the document has a viewer block, and always ``qParams.pinnedIds`` /
    ``qParams.supernodes`` (circuit-tracer's form, ``[name, *members]``)."""
    extra = doc.get("extra")
    block = extra.get("tl_circuits") if isinstance(extra, dict) else None
    viewer = block.get("viewer") if isinstance(block, dict) else None
    if isinstance(viewer, dict):
        viewer["annotations"] = {
            "pinned": list(annotations["pinned"]),
            "supernodes": [
                {"name": s["name"], "members": list(s["members"])}
                for s in annotations["supernodes"]
            ],
        }
    q = doc.get("qParams")
    if not isinstance(q, dict):
        q = doc["qParams"] = {}
    q["pinnedIds"] = list(annotations["pinned"])
    q["supernodes"] = [[s["name"], *s["members"]] for s in annotations["supernodes"]]
    return doc


def _id_list(value: Any, ids: set[str], what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_ANNOTATION_IDS:
        raise TLCircuitsError(f"{what} must be a list of at most {MAX_ANNOTATION_IDS} node ids")
    seen: set[str] = set()
    for x in value:
        if not isinstance(x, str) or x not in ids:
            shown = x[:80] if isinstance(x, str) else type(x).__name__
            raise TLCircuitsError(f"{what}: {shown!r} is not a node id of this graph")
        if x in seen:
            raise TLCircuitsError(f"{what}: {x[:80]!r} is listed twice")
        seen.add(x)
    return list(value)


def _attention(graph: AttributionGraph, heads_block: Mapping[str, Any]) -> dict[str, Any]:
    ctx = graph.context
    if ctx is None:
        return {}
    wanted = sorted(
        {
            (h["layer"], h["head"])
            for link in heads_block.get("links", {}).values()
            for h in link["heads"]
        }
    )
    out = {}
    for m, h in wanted:
        pattern = ctx.frozen.get(f"blocks.{m}.attn.hook_pattern")
        if pattern is None:
            continue
        rows = pattern[0, h].detach().cpu().double().tolist()
        out[f"L{m}H{h}"] = [[_finite(v) for v in row] for row in rows]
    return out


def _link_heads(
    graph: AttributionGraph, hl: HeadLoadings, ids: list[str], limit: int
) -> dict[str, Any]:
    hl.check_graph(graph)
    adj = graph.adjacency.detach().cpu().double()
    seen: set[str] = set()
    rows: list[tuple[float, int, str]] = []
    for i, (t, s) in enumerate(hl.edges.detach().cpu().tolist()):
        key = f"{ids[s]}->{ids[t]}"
        weight = float(adj[t, s])
        if weight == 0 or key in seen:
            continue  # not a link, or listed already
        seen.add(key)
        rows.append((weight, i, key))
    rows.sort(key=lambda r: -abs(r[0]))
    loadings = hl.loadings.detach().cpu().double()
    bypass = hl.bypass.detach().cpu().double()
    crossed = hl.crossed.detach().cpu()
    out = {}
    for weight, i, key in rows[:limit]:
        layers = crossed[i].nonzero(as_tuple=True)[0].tolist()
        out[key] = {
            "layers": layers,
            "loadings": [[_finite(v) for v in loadings[i, m].tolist()] for m in layers],
            "bypass": [_finite(float(bypass[i, m])) for m in layers],
            "weight": weight,
        }
    return out


def _cards(
    graph: AttributionGraph,
    ids: list[str],
    cards: FeatureCards | Mapping[str, Any] | None,
    decode: Callable[[int], str] | None,
) -> dict[str, Any]:
    if cards is None:
        return {}
    if not isinstance(cards, FeatureCards):
        return {k: v for k, v in cards.items() if k in set(ids)}
    if decode is None and graph.context is not None:
        decode = graph.context.model.to_single_str_token
    feature = KINDS.index("feature")
    nodes = graph.nodes
    out: dict[str, Any] = {}
    for n in (nodes.kind == feature).nonzero(as_tuple=True)[0].tolist():
        contexts = cards.contexts(int(nodes.layer[n]), int(nodes.feature[n]), decode)
        if contexts:
            out[ids[n]] = {
                "contexts": [
                    {
                        "tokens": [str(t) for t in c["tokens"]],
                        "acts": [_finite(a) for a in c["acts"]],
                        "max_act": _finite(c["max_act"]),
                        "max_pos": c["max_pos"],
                    }
                    for c in contexts
                ]
            }
    return out


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
