"""The ``head_loadings`` and ``qk`` entries of the frontend JSON's extra block (formats in
:func:`tl_circuits.export.frontend.export_json`): for each link, the heads that carried it
and the top QK terms of those heads at (query = target position, key = source position)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.attention.qk.attribution import QKAttribution, QKTerm
from tl_circuits.attention.qk.basis import BIAS, EXCLUDED, QKBasis
from tl_circuits.attention.qk.components import pre_cap_scores, score_hook_names
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.typing import Float


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
    each link (graph-node basis, one basis per layer shared by its heads).

    Each pair also carries (fields documented in
    :func:`tl_circuits.export.frontend.export_json`): ``model_score``, the model's own
    clean pre-soft-cap score ``q . k / attn_scale`` read from ``hook_rot_q`` / ``hook_rot_k``
    (rotary models) or ``hook_q`` / ``hook_k`` of a clean run without any hook (what Q1
    compares the terms' sum with; TransformerLens' ``hook_attn_scores`` is after the
    soft-cap of Gemma-2, so it is not used); the top positive and negative terms; the top
    query / key marginals; and the softmax-competition view, computed from one attribution
    over every key ``0..query_pos`` the query sees.
    """
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

    def listed(terms: list[QKTerm]) -> list[dict[str, Any]]:
        return [
            {"value": t.value, "query": component(t.query), "key": component(t.key)} for t in terms
        ]

    def marginals(values: Tensor, comps: Tensor) -> list[dict[str, Any]]:
        order = values.abs().argsort(descending=True)[:top_terms].tolist()
        return [{"id": component(int(comps[i])), "value": float(values[i])} for i in order]

    pairs: dict[str, Any] = {}
    bases: dict[int, QKBasis] = {}
    clean: dict[int, Tensor] = {}
    for (m, h, q), keys in sorted(wanted.items()):
        if m not in bases:
            bases[m] = QKBasis.from_graph(graph, m)
            clean[m] = clean_pre_cap_scores(graph.context.model, graph.tokens, m)
        key_pos = sorted(keys)
        qk = QKAttribution.from_basis(bases[m], head=h, query_pos=q, key_pos=key_pos)
        every_key = QKAttribution.from_basis(bases[m], head=h, query_pos=q)  # keys 0..q
        sparse = qk.sparse_terms(top_terms)
        q_marg, k_marg = qk.query_marginals(), qk.key_marginals()
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
                "model_score": float(clean[m][h, q, p]),
                "soft_capped": qk.soft_capped,
                "remainder": float(sparse.remainder[ki]),
                "terms": [
                    {"value": float(v), "query": component(a), "key": component(b)}
                    for a, b, v in terms
                ],
                "positive": listed(
                    [t for t in qk.top_terms(ki, top_terms, sign="positive") if t.value > 0]
                ),
                "negative": listed(
                    [t for t in qk.top_terms(ki, top_terms, sign="negative") if t.value < 0]
                ),
                "query_marginals": marginals(q_marg[ki], qk.q_components),
                "key_marginals": marginals(k_marg[ki], qk.k_components),
                "competition": {
                    "score": every_key.competition_score(p),
                    "terms": listed(every_key.top_terms(p, top_terms, competition=True)),
                },
            }
    return {"top_terms": top_terms, "basis": "graph", "pairs": pairs, "links": links}


def clean_pre_cap_scores(
    model: HookedTransformer, tokens: Tensor, layer: int
) -> Float[Tensor, "n_heads pos pos"]:
    """Layer ``layer``'s clean pre-soft-cap scores ``q . k / attn_scale`` ``[n_heads, pos,
    pos]`` (``hook_rot_q/k`` in rotary models, else ``hook_q/k``; keys repeated to query heads
    under GQA), from a run of ``model`` on ``tokens`` with no other hook."""
    cfg = model.cfg
    q_name, k_name = score_hook_names(cfg, layer)
    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: HookPoint) -> None:
        kept[hook.name] = x.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(q_name, keep), (k_name, keep)]):
        model(tokens.reshape(1, -1).to(cfg.device))
    scores = pre_cap_scores(model, kept[q_name][0], kept[k_name][0], layer)
    return scores.detach().cpu().double()


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
