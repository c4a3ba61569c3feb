"""Computing head loadings (maths in :mod:`tl_circuits.attention.heads.loadings`).

Phases of :func:`head_loading_fields`: crossed layers per edge -> *units* (what is
propagated forward: each distinct source, or each (source, write slot) when splitting by
write layer) and the (edge, unit) pairs -> *chunks* of each side (target rows sorted by
position, one reverse pass each; units sorted by position and first layer, one forward
pass each; :mod:`~tl_circuits.attention.heads.sides`) -> the *plan*: which side is held in
memory batch by batch and which is recomputed for each held batch, whichever costs less
(:mod:`~tl_circuits.attention.heads.plan`) -> for each held batch and each chunk of the
other side, the contraction of every (target chunk, unit chunk) block at every layer its
pairs cross -> the write values of targets no block needed -> bypass from the writes at
or after each layer -> the result.

A pair of edge ``e`` (source first writing at layer ``w0``) and unit ``u`` crosses layer
``m`` exactly when ``unit_start[u] <= m <= top[e]`` (``unit_start >= w0 + 1``, the first
layer the unit's signal reaches).

What a source writes, and at which slot, is
:class:`~tl_circuits.replacement.sources.SourceWrites`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_circuits.attention.heads.plan import Chunks, cut, plan
from tl_circuits.attention.heads.sides import (
    EdgeWrites,
    TargetBlock,
    UnitBlock,
    contract,
    target_block,
    unit_block,
)
from tl_circuits.errors import HeadLoadingError
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import TARGET, TOKEN
from tl_circuits.replacement.context import ReplacementContext
from tl_circuits.replacement.frozen import BackwardWorkspace
from tl_circuits.replacement.sources import SourceWrites

#: default caps on target rows per reverse pass and units per forward pass
TARGET_CHUNK = 256
UNIT_CHUNK = 128


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
    replacement context is ``ctx``; batching as in ``HeadLoadings.compute``: at most
    ``target_batch`` rows per reverse pass, ``source_batch`` units per forward pass,
    ``edge_chunk`` edges per gathered write-value product, about ``memory_bytes`` held."""
    lin = ctx.linear
    crossed, top = _crossed_layers(graph, edges, lin.n_layers, lin.parallel)
    units = _Units.of(ctx, graph, edges, split)
    acc = _Accumulators.zeros(ctx, len(edges), lin.blocks[0].W_O.shape[0], split)
    if len(edges) == 0:
        return _finish(graph, edges, crossed, acc, split)
    sides = _Sides.of(ctx, graph, edges, top, units, target_batch, source_batch, memory_bytes)
    order = plan(sides.targets, sides.units, memory_bytes)
    run = _Run(ctx, graph, edges, units, sides, acc, edge_chunk)
    for held in order.held_batches:
        blocks = {c: run.compute(order.held, c) for c in held}
        for c in order.streamed_chunks(sides.pairs, held):
            streamed = run.compute(order.streamed, c)
            for h, block in blocks.items():
                run.contract_pair(order.held, h, block, c, streamed)
    run.remaining_write_values()
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


@dataclass
class _Units:
    """What is propagated forward, and which edge needs which unit.

    ``sources``: the distinct source nodes of the edges and their :class:`SourceWrites`
    (``writes``); ``edge_source[e]``: edge ``e``'s source among them. A unit ``u`` is
    source ``unit_source[u]`` writing at slot ``unit_slot[u]`` (-1: every slot it writes
    to, when not splitting), sorted by (position, ``unit_start[u]``: the first layer its
    signal can reach). Pair ``i`` joins edge ``pair_edge[i]`` with unit ``pair_unit[i]`` (slot
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
        # by (position, first layer): a forward chunk starts late and skips early positions
        key = writes.pos[unit_source] * (writes.n_slots + 1) + unit_start
        order = torch.argsort(key, stable=True)
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
class _Sides:
    """Both sides in chunks and the pair blocks joining them.

    ``targets``: chunks of target nodes, sorted by (position, last crossed layer);
    ``units``: chunks of the units that cross a layer, in :class:`_Units` order.
    ``pairs[(a, b)]``: the (edge, unit) pairs with their target in target chunk ``a`` and
    their unit in unit chunk ``b`` that cross at least one layer; ``target_row[node]`` /
    ``unit_row[unit]``: the row in its chunk; ``target_chunk[node]``: its chunk;
    ``top[e]``: edge ``e``'s last crossed layer."""

    targets: Chunks
    units: Chunks
    pairs: dict[tuple[int, int], Tensor]
    target_row: Tensor
    unit_row: Tensor
    target_chunk: Tensor
    top: Tensor

    @classmethod
    def of(
        cls,
        ctx: ReplacementContext,
        graph: AttributionGraph,
        edges: Tensor,
        top: Tensor,
        units: _Units,
        target_batch: int | None,
        source_batch: int | None,
        memory_bytes: int,
    ) -> _Sides:
        lin, n_pos, n_nodes = ctx.linear, ctx.n_pos, graph.n_nodes
        width = lin.blocks[0].W_O.shape[0] * lin.blocks[0].W_O.shape[1]  # H * d_head
        row_bytes = (width + lin.d_model) * ctx.compute_dtype.itemsize
        node_top = torch.full((n_nodes,), -1, dtype=torch.long)
        node_top[edges[:, 0]] = top
        pos = graph.nodes.pos.cpu()
        t_nodes = torch.unique(edges[:, 0])
        t_order = t_nodes[torch.argsort(pos[t_nodes] * (lin.n_layers + 1) + node_top[t_nodes])]
        zeros = torch.zeros(n_nodes, dtype=torch.long)
        t_span = (zeros, pos + 1, zeros, node_top)
        budget = memory_bytes // 8  # one chunk's block
        targets = cut(t_order, t_span, row_bytes, target_batch or TARGET_CHUNK, budget)
        pair_top = top[units.pair_edge]
        crossing = units.unit_start[units.pair_unit] <= pair_top
        n_units = len(units.unit_source)
        u_stop = torch.full((n_units,), -1, dtype=torch.long)
        u_stop.scatter_reduce_(0, units.pair_unit[crossing], pair_top[crossing], "amax")
        u_order = (u_stop >= 0).nonzero(as_tuple=True)[0]  # in _Units order already
        u_pos = units.writes.pos[units.unit_source]
        u_span = (u_pos, torch.full_like(u_pos, n_pos), units.unit_start, u_stop)
        unit_chunks = cut(u_order, u_span, row_bytes, source_batch or UNIT_CHUNK, budget)
        target_chunk, target_row = targets.chunk_of(n_nodes)
        unit_chunk, unit_row = unit_chunks.chunk_of(n_units)
        kept = crossing.nonzero(as_tuple=True)[0]
        key = target_chunk[edges[units.pair_edge[kept], 0]] * len(unit_chunks)
        key = key + unit_chunk[units.pair_unit[kept]]
        order = torch.argsort(key, stable=True)
        blocks, counts = torch.unique_consecutive(key[order], return_counts=True)
        pairs = {
            divmod(int(b), len(unit_chunks)): p
            for b, p in zip(blocks.tolist(), kept[order].split(counts.tolist()), strict=True)
        }
        return cls(targets, unit_chunks, pairs, target_row, unit_row, target_chunk, top)


class _Run:
    """The passes and contractions of one computation, filling ``acc``."""

    def __init__(
        self,
        ctx: ReplacementContext,
        graph: AttributionGraph,
        edges: Tensor,
        units: _Units,
        sides: _Sides,
        acc: _Accumulators,
        edge_chunk: int,
    ) -> None:
        self.ctx, self.graph, self.edges, self.units = ctx, graph, edges, units
        self.sides, self.acc, self.edge_chunk = sides, acc, edge_chunk
        widest = max(len(sides.targets.items(c)) for c in range(len(sides.targets)))
        self.workspace = BackwardWorkspace(
            ctx.linear, widest, ctx.n_pos, ctx.compute_dtype, ctx.embeddings.device
        )
        self.valued: set[int] = set()  # target chunks whose write values are in acc

    def compute(self, side: str, c: int) -> TargetBlock | UnitBlock:
        """The block of chunk ``c`` of ``side`` ("target": a reverse pass, reading the
        chunk's write values the first time; "unit": a forward pass)."""
        if side == "target":
            chunks = self.sides.targets
            writes = None if c in self.valued else self._edge_writes(c)
            self.valued.add(c)
            rows = chunks.items(c).tolist()
            return target_block(self.ctx, self.graph, rows, chunks.stop[c], writes, self.workspace)
        chunks, u = self.sides.units, self.sides.units.items(c)
        return unit_block(
            self.ctx,
            self.units.writes,
            self.units.unit_source[u],
            self.units.unit_slot[u],
            chunks.start[c],
            chunks.stop[c],
            chunks.first_pos[c],
        )

    def _edge_writes(self, c: int) -> EdgeWrites:
        """The write values' inputs for the edges whose target is in target chunk ``c``."""
        sides, units = self.sides, self.units
        e = (sides.target_chunk[self.edges[:, 0]] == c).nonzero(as_tuple=True)[0]
        source = units.edge_source[e]
        return EdgeWrites(
            writes=units.writes,
            edge=e,
            row=sides.target_row[self.edges[e, 0]],
            source=source,
            pos=units.writes.pos[source],
            values=self.acc.values_by_write,
            chunk=self.edge_chunk,
        )

    def contract_pair(self, held: str, h: int, h_block: Any, c: int, s_block: Any) -> None:
        """Contract the pair block of held chunk ``h`` and streamed chunk ``c`` at every
        layer its pairs cross, adding into the accumulators."""
        a, b, tb, ub = (h, c, h_block, s_block) if held == "target" else (c, h, s_block, h_block)
        pairs = self.sides.pairs.get((a, b))
        if pairs is None:
            return
        units, acc = self.units, self.acc
        edge, unit = units.pair_edge[pairs], units.pair_unit[pairs]
        lo, hi = units.unit_start[unit], self.sides.top[edge]
        t_rows = self.sides.target_row[self.edges[edge, 0]]
        u_rows = self.sides.unit_row[unit]
        device = acc.loadings.device
        for m in range(int(lo.min()), int(hi.max()) + 1):
            at = ((lo <= m) & (hi >= m)).nonzero(as_tuple=True)[0]
            if len(at) == 0:
                continue
            loading, bypass = contract(tb, ub, m, t_rows[at], u_rows[at])
            e = edge[at].to(device)
            acc.loadings[:, m].index_add_(0, e, loading)
            acc.attn_bypass[:, m].index_add_(0, e, bypass)
            if acc.loadings_by_write is not None and acc.bypass_by_write is not None:
                j = units.pair_slot[pairs[at]].to(device)
                acc.loadings_by_write[e, j, m] += loading
                acc.bypass_by_write[e, j, m] += bypass

    def remaining_write_values(self) -> None:
        """Write values of the target chunks no pair block needed (a reverse pass that
        keeps no layer's gradients)."""
        chunks = self.sides.targets
        for c in range(len(chunks)):
            if c not in self.valued:
                rows = chunks.items(c).tolist()
                writes = self._edge_writes(c)
                self.valued.add(c)
                target_block(self.ctx, self.graph, rows, -1, writes, self.workspace)


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
