"""A frozen copy of the head-loading passes as they were before issue 16's speed-ups
(``tl_circuits/attention/heads/compute.py`` at commit 628841e), kept as the reference the
new code path is compared with (tests/test_head_loadings_reference.py). Do not edit: it is
the previous behaviour, not a second implementation to maintain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_circuits.errors import HeadLoadingError
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import TARGET, TOKEN
from tl_circuits.replacement.context import ReplacementContext
from tl_circuits.replacement.frozen import FrozenLinearModel, Seeds
from tl_circuits.replacement.sources import SourceWrites


def head_loading_fields(
    graph: AttributionGraph,
    ctx: ReplacementContext,
    edges: Tensor,
    split: bool,
    target_batch: int | None,
    source_batch: int | None,
    edge_chunk: int,
    memory_bytes: int,
) -> dict[str, Tensor]:
    """The fields of the :class:`~tl_circuits.attention.heads.loadings.HeadLoadings` of
    ``edges`` ``[n, 2]`` (checked ``(target, source)`` pairs) of ``graph``, whose
    replacement context is ``ctx``; batching as in ``HeadLoadings.compute``."""
    lin = ctx.linear
    n_layers, n_pos, d_model = lin.n_layers, ctx.n_pos, lin.d_model
    crossed, top = _crossed_layers(graph, edges, n_layers, lin.parallel)
    units = _Units.of(ctx, graph, edges, split)
    acc = _Accumulators.zeros(ctx, len(edges), lin.blocks[0].W_O.shape[0], split)
    targets = torch.unique(edges[:, 0])
    read = _reading_layer(graph, targets, n_layers)
    targets = targets[torch.argsort(read, stable=True)]  # low targets stop their pass early
    element = ctx.compute_dtype.itemsize
    per_target = (4 * n_layers + 2) * n_pos * d_model * element  # peak, during the pass
    per_unit = (n_layers + 2) * n_pos * d_model * element
    # most of the memory to the target side: each target batch forwards its sources again
    t_batch = _batch_for(memory_bytes * 3 // 4, per_target, target_batch)
    u_batch = _batch_for(memory_bytes // 8, per_unit, source_batch)
    for t0 in range(0, len(targets), t_batch):
        rows = targets[t0 : t0 + t_batch]
        side = _target_side(lin, ctx, graph, rows.tolist())
        target_row = torch.full((graph.n_nodes,), -1, dtype=torch.long)
        target_row[rows] = torch.arange(len(rows))
        edge_row = target_row[edges[:, 0]]  # row of each edge's target in this batch, or -1
        _accumulate_write_values(acc, units, side, graph, edges, edge_row)
        side.post, side.embed = [], side.embed[:0]
        pairs = (edge_row[units.pair_edge] >= 0).nonzero(as_tuple=True)[0]
        in_batch = torch.unique(units.pair_unit[pairs])
        for u0 in range(0, len(in_batch), u_batch):
            chunk = in_batch[u0 : u0 + u_batch]
            _forward_and_contract(
                lin, units, side, acc, chunk, pairs, crossed, top, edge_row, edge_chunk
            )
    return _finish(graph, edges, crossed, acc, split)


def _crossed_layers(
    graph: AttributionGraph, edges: Tensor, n_layers: int, parallel: bool
) -> tuple[Tensor, Tensor]:
    """``crossed [n_edges, n_layers]`` (layer ``m``'s attention lies between source and
    target) and ``top [n_edges]`` (the last crossed layer; module docstring of
    :mod:`~tl_circuits.attention.heads.loadings`)."""
    kind, layer = graph.nodes.kind.cpu(), graph.nodes.layer.cpu()
    t_nodes, s_nodes = edges[:, 0], edges[:, 1]
    first = torch.where(kind[s_nodes] == TOKEN, -1, layer[s_nodes])
    read = _reading_layer(graph, t_nodes, n_layers)
    top = torch.where(read >= n_layers, n_layers - 1, read - 1 if parallel else read)
    m = torch.arange(n_layers)
    return (m[None] > first[:, None]) & (m[None] <= top[:, None]), top


def _reading_layer(graph: AttributionGraph, index: Tensor, n_layers: int) -> Tensor:
    """Reading layer of target rows ``index`` (``n_layers`` for graph targets)."""
    kind, layer = graph.nodes.kind.cpu(), graph.nodes.layer.cpu()
    return torch.where(kind[index] == TARGET, n_layers, layer[index])


def _batch_for(budget_bytes: int, per_item_bytes: int, cap: int | None) -> int:
    n = max(1, budget_bytes // max(1, per_item_bytes))
    return n if cap is None else min(n, cap)


@dataclass
class _Units:
    """What is propagated forward, and which edge needs which unit.

    ``sources``: the distinct source nodes of the edges and their :class:`SourceWrites`
    (``writes``); ``edge_source[e]``: edge ``e``'s source among them. A unit ``u`` is
    source ``unit_source[u]`` writing at slot ``unit_slot[u]`` (-1: every slot it writes
    to, when not splitting), sorted by ``unit_start[u]``, the first layer its signal can
    reach. Pair ``i`` joins edge ``pair_edge[i]`` with unit ``pair_unit[i]`` (slot
    ``pair_slot[i]``)."""

    sources: Tensor
    writes: SourceWrites
    edge_source: Tensor
    unit_source: Tensor
    unit_slot: Tensor
    unit_start: Tensor
    pair_edge: Tensor
    pair_unit: Tensor
    pair_slot: Tensor

    @classmethod
    def of(cls, ctx: ReplacementContext, graph: AttributionGraph, edges: Tensor, split: bool):
        nodes = graph.nodes
        sources, edge_source = torch.unique(edges[:, 1], return_inverse=True)
        dev = nodes.activation.device
        try:
            writes = SourceWrites(
                ctx,
                nodes.kind.cpu()[sources],
                nodes.layer.cpu()[sources],
                nodes.pos.cpu()[sources],
                nodes.feature.cpu()[sources],
                nodes.activation[sources.to(dev)],
            )
        except ValueError as e:
            raise HeadLoadingError(f"{e}: it cannot be the source of an edge") from e
        has = writes.writes  # [n_slots, n_sources]
        if split:
            unit_slot, unit_source = has.nonzero(as_tuple=True)
        else:
            unit_source = torch.arange(len(sources))
            unit_slot = torch.full_like(unit_source, -1)
        unit_start = torch.where(unit_slot >= 0, unit_slot, writes.first_slot[unit_source])
        order = torch.argsort(unit_start, stable=True)  # a forward chunk starts late
        unit_slot, unit_source, unit_start = unit_slot[order], unit_source[order], unit_start[order]
        if split:
            unit_of = torch.full(has.shape, -1, dtype=torch.long)  # [slot, source] -> unit
            unit_of[unit_slot, unit_source] = torch.arange(len(unit_source))
            pair_edge, pair_slot = has[:, edge_source].T.nonzero(as_tuple=True)
            pair_unit = unit_of[pair_slot, edge_source[pair_edge]]
        else:
            pair_edge = torch.arange(len(edges))
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order))
            pair_unit = rank[edge_source]
            pair_slot = torch.full_like(pair_edge, -1)
        return cls(
            sources,
            writes,
            edge_source,
            unit_source,
            unit_slot,
            unit_start,
            pair_edge,
            pair_unit,
            pair_slot,
        )


@dataclass
class _Accumulators:
    """Sums filled batch by batch: ``loadings [n, L, H]``, ``attn_bypass [n, L]`` (the part
    of the edge around layer ``m``'s attention carried by writes before ``m``),
    ``values_by_write [n, L + 1]`` (``v_w . G_w`` per slot) and, when splitting,
    ``loadings_by_write [n, L + 1, L, H]`` and ``bypass_by_write [n, L + 1, L]``."""

    loadings: Tensor
    attn_bypass: Tensor
    values_by_write: Tensor
    loadings_by_write: Tensor | None
    bypass_by_write: Tensor | None

    @classmethod
    def zeros(cls, ctx: ReplacementContext, n: int, n_heads: int, split: bool) -> _Accumulators:
        n_layers = ctx.n_layers
        like = dict(dtype=ctx.compute_dtype, device=ctx.embeddings.device)
        slots = n_layers + 1
        return cls(
            torch.zeros(n, n_layers, n_heads, **like),
            torch.zeros(n, n_layers, **like),
            torch.zeros(n, slots, **like),
            torch.zeros(n, slots, n_layers, n_heads, **like) if split else None,
            torch.zeros(n, slots, n_layers, **like) if split else None,
        )


@dataclass
class _TargetSide:
    """Per-layer target gradients of one batch of target rows, ready for contraction."""

    gv: list[Tensor]  # [heads, T, pos * d_head]: attention adjoint up to W_V
    gb: list[Tensor]  # [T, pos * d_model]: bypass gradient
    post: list[Tensor]  # [T, pos, d_model]: gradient on mlp_out(w) (write values)
    embed: Tensor  # [T, pos, d_model]: gradient on the embeddings


def _target_side(
    lin: FrozenLinearModel, ctx: ReplacementContext, graph: AttributionGraph, rows: list[int]
) -> _TargetSide:
    """Reverse pass of the target rows ``rows`` (node indices) with every residual
    gradient a loading needs (``bypass`` gradient: module docstring of
    :mod:`~tl_circuits.attention.heads.loadings`)."""
    nodes = graph.nodes
    dtype, device = ctx.compute_dtype, ctx.embeddings.device
    batch, n_pos, d_model = len(rows), ctx.n_pos, lin.d_model
    first_target = int(graph.indices("target")[0]) if graph.nodes.count("target") else 0
    seeds: dict[int, Tensor] = {}
    final_seed = None
    for i, t in enumerate(rows):
        if int(nodes.kind[t]) == TARGET:
            target = graph.targets[t - first_target]
            if final_seed is None:
                final_seed = torch.zeros(batch, n_pos, d_model, dtype=dtype, device=device)
            final_seed[i, target.pos] = target.vector.to(device, dtype)
        else:
            layer, pos = int(nodes.layer[t]), int(nodes.pos[t])
            if layer not in seeds:
                seeds[layer] = torch.zeros(batch, n_pos, d_model, dtype=dtype, device=device)
            w_enc = ctx.transcoders.encoder(layer).W_enc[:, int(nodes.feature[t])]
            seeds[layer][i, pos] = w_enc.to(device, dtype)
    grads = lin.backward_residuals(Seeds(x_in=seeds, final=final_seed), batch)
    gv, gb = [], []
    for block, g in zip(lin.blocks, grads.attn_out, strict=True):
        gz = torch.einsum("bqd,hed->bqhe", block.post_attn.adjoint(g), block.W_O)
        v = torch.einsum("hqk,bqhe->hbke", block.pattern, gz)
        gv.append(v.reshape(v.shape[0], batch, -1))
        if block.parallel and block.W_skip is not None:
            g = g + block.mlp_in.adjoint(g @ block.W_skip)
        gb.append(g.reshape(batch, -1))
    return _TargetSide(gv, gb, grads.post, grads.embed)


def _accumulate_write_values(
    acc: _Accumulators,
    units: _Units,
    side: _TargetSide,
    graph: AttributionGraph,
    edges: Tensor,
    edge_row: Tensor,
) -> None:
    """``values_by_write[e, j] = v_j . G_j`` at the source's position, for the edges whose
    target is in this batch (``edge_row >= 0``)."""
    pos_of = graph.nodes.pos.cpu()
    device = acc.loadings.device
    in_batch = edge_row >= 0
    for j in range(units.writes.n_slots):
        e = (in_batch & units.writes.writes[j, units.edge_source]).nonzero(as_tuple=True)[0]
        if len(e) == 0:
            continue
        v = units.writes.vectors(j, units.edge_source[e])
        g = side.embed if j == 0 else side.post[j - 1]
        g_at = g[edge_row[e].to(device), pos_of[edges[e, 1]].to(device)]
        acc.values_by_write[e.to(device), j] = (v * g_at).sum(-1)


def _forward_and_contract(
    lin: FrozenLinearModel,
    units: _Units,
    side: _TargetSide,
    acc: _Accumulators,
    chunk: Tensor,
    pairs: Tensor,
    crossed: Tensor,
    top: Tensor,
    edge_row: Tensor,
    edge_chunk: int,
) -> None:
    """One forward pass of the units ``chunk`` and, at every layer one of their pairs
    crosses, the contraction of their contributions with the batch's target gradients."""
    n_units = len(chunk)
    start = max(int(units.unit_start[chunk].min()), 0)
    embed, writes = units.writes.residual_inputs(
        torch.arange(n_units),
        units.unit_source[chunk],
        n_units,
        slot=units.unit_slot[chunk],
    )
    unit_row = torch.full((len(units.unit_source),), -1, dtype=torch.long)
    unit_row[chunk] = torch.arange(n_units)
    chunk_pairs = pairs[unit_row[units.pair_unit[pairs]] >= 0]
    pair_top = top[units.pair_edge[chunk_pairs]]  # last crossed layer of each pair
    stop = int(pair_top.max()) if len(pair_top) else lin.n_layers - 1
    resid = lin.forward_residuals(writes, embed, start=start, stop=stop)
    pair_start = units.unit_start[units.pair_unit]
    for m in range(start, stop + 1):
        at_m = chunk_pairs[
            crossed[units.pair_edge[chunk_pairs], m] & (pair_start[chunk_pairs] <= m)
        ]
        if len(at_m):
            _contract_layer(
                lin, m, resid[m], side, acc, units, at_m, unit_row, edge_row, edge_chunk
            )


def _contract_layer(
    lin: FrozenLinearModel,
    m: int,
    x: Tensor,
    side: _TargetSide,
    acc: _Accumulators,
    units: _Units,
    pairs: Tensor,
    unit_row: Tensor,
    edge_row: Tensor,
    edge_chunk: int,
) -> None:
    """Add ``loading[m, h] = sum_pos g_m . Attn_{m,h}(x_m)`` and the attention bypass
    ``sum_pos g_m . x_m`` of the (edge, unit) ``pairs`` at layer ``m``; ``x``: the units'
    contributions to ``resid_pre(m)`` ``[U, pos, d_model]``."""
    block = lin.blocks[m]
    n_heads, n_units, device = block.W_O.shape[0], x.shape[0], acc.loadings.device
    vx = torch.einsum("bkm,hme->hbke", block.ln1.forward_linear(x), block.W_V)
    vx = vx.reshape(n_heads, n_units, -1)
    xf = x.reshape(n_units, -1)
    t_rows = edge_row[units.pair_edge[pairs]]
    u_rows = unit_row[units.pair_unit[pairs]]
    dense = 4 * len(pairs) >= int(side.gb[m].shape[0]) * n_units
    if dense:
        lo_all = torch.bmm(side.gv[m], vx.transpose(1, 2))  # [H, T, U]
        by_all = side.gb[m] @ xf.T  # [T, U]
    for c0 in range(0, len(pairs), edge_chunk):
        ti = t_rows[c0 : c0 + edge_chunk].to(device)
        ui = u_rows[c0 : c0 + edge_chunk].to(device)
        if dense:
            lo, by = lo_all[:, ti, ui].T, by_all[ti, ui]
        else:
            lo = (side.gv[m][:, ti] * vx[:, ui]).sum(-1).T  # [n, H]
            by = (side.gb[m][ti] * xf[ui]).sum(-1)
        e = units.pair_edge[pairs[c0 : c0 + edge_chunk]].to(device)
        acc.loadings[:, m].index_add_(0, e, lo)
        acc.attn_bypass[:, m].index_add_(0, e, by)
        if acc.loadings_by_write is not None and acc.bypass_by_write is not None:
            j = units.pair_slot[pairs[c0 : c0 + edge_chunk]].to(device)
            acc.loadings_by_write[e, j, m] += lo
            acc.bypass_by_write[e, j, m] += by


def _finish(
    graph: AttributionGraph, edges: Tensor, crossed: Tensor, acc: _Accumulators, split: bool
) -> dict[str, Tensor]:
    """Mask to the crossed layers, add the writes at or after each layer to its bypass
    (they go around its attention), and read the edge values off the graph."""
    device = acc.loadings.device
    n_layers = acc.attn_bypass.shape[1]
    mask = crossed.to(device)
    values_w = acc.values_by_write
    later = values_w[:, 1:].flip(1).cumsum(1).flip(1)  # [n, n_layers]: sum over w >= m
    loadings = acc.loadings * mask[:, :, None]
    bypass = torch.where(mask, acc.attn_bypass + later, torch.zeros_like(acc.attn_bypass))
    adjacency = graph.adjacency
    t_nodes, s_nodes = edges[:, 0], edges[:, 1]
    edge_values = adjacency[t_nodes.to(adjacency.device), s_nodes.to(adjacency.device)]
    extra: dict[str, Any] = {}
    if split:
        assert acc.loadings_by_write is not None and acc.bypass_by_write is not None
        w_layer = torch.arange(-1, n_layers, device=device)
        after = w_layer[None, :, None] >= torch.arange(n_layers, device=device)[None, None, :]
        later_w = values_w[:, :, None] * after  # [n, writes, layers]
        by_w = acc.bypass_by_write
        extra = dict(
            write_layers=torch.arange(-1, n_layers),
            loadings_by_write=acc.loadings_by_write * mask[:, None, :, None],
            bypass_by_write=torch.where(mask[:, None, :], by_w + later_w, torch.zeros_like(by_w)),
            values_by_write=values_w,
        )
    return dict(
        edges=edges.clone(),
        edge_values=edge_values.to(device, values_w.dtype),
        loadings=loadings,
        bypass=bypass,
        crossed=mask,
        **extra,
    )
