"""The graph-node QK basis (DESIGN.md §4): the attribution graph's nodes as components.

Components of ``resid_pre(m)``: the graph's nodes that write below layer ``m`` (features and
errors of earlier layers, token embeddings), each propagated through the frozen replacement
model (attention and norm scales frozen, features cut, the transcoders' skip path kept),
then ``EXCLUDED`` (every source writing below ``m`` that is not a node: a budget or pruning
left it out) and ``BIAS`` (``resid_pre(m)`` with every source zero: all constants). What a
node writes is :mod:`tl_circuits.replacement.sources`'s; which columns are left out too.

A head's vectors of every component come one of two exact ways (:func:`graph_basis`'s
``method``): the *forward table* (:func:`forward_table`: every component's contribution
to ``resid_pre(m)``, shared by all heads and positions) or *reverse passes* seeded at the
head's query / key map (:mod:`tl_circuits.attention.qk.reverse`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from tl_circuits.attention.qk.components import (
    BasisParts,
    ComponentTable,
    component_table,
    frozen_scales,
)
from tl_circuits.attention.qk.reverse import ReverseHeadVectors
from tl_circuits.errors import QKError
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import ERROR, FEATURE, KINDS, TOKEN
from tl_circuits.replacement.sources import SourceColumns

Method = Literal["auto", "forward", "reverse"]
PROPAGATE_CHUNK = 64
"""Components per forward propagation (small, so each chunk spans few positions and its
causal suffix stays short)."""


def graph_basis(graph: AttributionGraph, layer: int, method: Method) -> BasisParts:
    """The graph basis at ``layer`` (module docstring); nothing is propagated until asked."""
    ctx = graph.context
    assert ctx is not None
    nodes = graph.nodes
    n_nodes = len(nodes)
    kind, node_layer, node_pos = nodes.kind, nodes.layer, nodes.pos
    writes_below = ((kind == FEATURE) | (kind == ERROR)) & (node_layer < layer) | (kind == TOKEN)
    live = writes_below.nonzero()[:, 0]
    columns = SourceColumns.of(ctx)
    node_col = columns.columns_of(kind, node_layer, node_pos, nodes.feature)
    node_col[~writes_below] = -1  # nodes at or after the layer read nothing from here
    left_out = left_out_columns(columns, node_col, layer)
    special = torch.tensor(([n_nodes] if len(left_out) else []) + [n_nodes + 1])
    rows = torch.cat([live, special])
    slot = torch.full((n_nodes + 2,), -1, dtype=torch.long)
    slot[rows] = torch.arange(len(rows))
    pos_of_row = torch.cat([node_pos, torch.tensor([-1, -1])])
    forward: list[Tensor] = []  # the forward table [len(rows), pos, d], built on first need

    @functools.cache
    def bias() -> Tensor:
        """``[pos, d_model]``: ``resid_pre(layer)`` with every node zero (the constants)."""
        name = f"blocks.{layer}.hook_resid_pre"
        return ctx.in_compute(ctx.run_zero_nodes(capture=(name,))[1][name][0])

    def check_rows(r: Tensor) -> None:
        s = slot[r]
        if (s < 0).any():
            raise QKError(f"components {r[s < 0].tolist()} do not write below layer {layer}")

    def contributions(r: Tensor, positions: Sequence[int]) -> Tensor:
        check_rows(r)
        pos = list(positions)
        if bool((r == n_nodes + 1).all()):  # the bias alone needs no propagation
            return bias()[pos].expand(len(r), -1, -1).clone()
        if not forward:
            units = torch.cat([node_col[live], left_out])
            forward.append(forward_table(graph, columns, layer, units, len(live), bias()))
        return forward[0][slot[r]][:, pos]

    def live_rows(positions: Sequence[int]) -> Tensor:
        p = pos_of_row[rows]
        return rows[(p <= max(positions)) | (p < 0)]  # causal: a node reaches later positions

    frozen = frozen_scales(ctx.frozen, ctx.model, layer)
    reverse = ReverseHeadVectors(
        ctx,
        columns,
        layer,
        frozen.get("ln1"),
        node_col=node_col,
        excluded_cols=left_out,
        check_rows=check_rows,
        method=method,
        n_forward_rows=len(rows),
        forward_built=lambda: bool(forward),
    )
    return BasisParts(
        name="graph",
        table=_table(graph),
        frozen=frozen,
        contributions=contributions,
        live_rows=live_rows,
        reverse=reverse,
    )


def left_out_columns(columns: SourceColumns, node_col: Tensor, layer: int) -> Tensor:
    """Source columns writing below ``layer`` that are not graph nodes (``node_col``: the
    column of each node, -1 where none)."""
    below = columns.writing_below(layer)
    below[node_col[node_col >= 0]] = False
    return below.nonzero()[:, 0]


def _table(graph: AttributionGraph) -> ComponentTable:
    """One row per graph node, then ``excluded`` and ``bias``."""
    nodes = graph.nodes
    rows = [
        (KINDS[int(k)], int(la), int(p), i, graph.node_label(i))
        for i, (k, la, p) in enumerate(
            zip(nodes.kind.tolist(), nodes.layer.tolist(), nodes.pos.tolist(), strict=True)
        )
    ]
    rows += [
        ("excluded", -1, -1, -1, "nodes left out of the graph (budget or pruning)"),
        ("bias", -1, -1, -1, "bias (all constants of the model)"),
    ]
    return component_table(rows)


def forward_table(
    graph: AttributionGraph,
    columns: SourceColumns,
    layer: int,
    cols: Tensor,
    n_single: int,
    bias: Tensor,
) -> Tensor:
    """Contributions ``[n_single + bool(rest) + 1, pos, d_model]`` to ``resid_pre(layer)``:
    one row per source column ``cols[:n_single]``, one row for ``cols[n_single:]``
    together (the left-out sources), and ``bias`` ``[pos, d_model]`` last, propagated by
    :meth:`FrozenLinearModel.forward_residuals
    <tl_circuits.replacement.frozen.FrozenLinearModel.forward_residuals>`.

    Rows are sorted by (first slot written, first position) and propagated in chunks of
    :data:`PROPAGATE_CHUNK`; a chunk starts at its earliest layer and position (blocks
    before it and positions before it carry nothing), so a late node costs a few blocks over
    a suffix of the prompt instead of the whole model over the whole prompt.
    """
    ctx = graph.context
    assert ctx is not None
    n_pos, d_model = ctx.n_pos, ctx.model.cfg.d_model
    sources = columns.sources(ctx, cols)
    n_units = n_single + (1 if len(cols) > n_single else 0)
    unit = torch.arange(len(cols)).clamp_max(n_single)  # the left-out sources share a row
    first_slot = torch.full((n_units,), ctx.n_layers + 1, dtype=torch.long)
    first_slot.scatter_reduce_(0, unit, sources.first_slot, "amin")
    first_pos = torch.full((n_units,), n_pos, dtype=torch.long)
    first_pos.scatter_reduce_(0, unit, sources.pos, "amin")
    order = torch.argsort(first_slot * (n_pos + 1) + first_pos, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_units)
    out = torch.zeros(
        n_units + 1, n_pos, d_model, dtype=ctx.compute_dtype, device=ctx.embeddings.device
    )
    for begin in range(0, n_units, PROPAGATE_CHUNK):
        chunk = order[begin : begin + PROPAGATE_CHUNK]
        members = ((rank[unit] >= begin) & (rank[unit] < begin + len(chunk))).nonzero()[:, 0]
        f, start = int(first_pos[chunk].min()), int(first_slot[chunk].min())
        embed, writes = sources.residual_inputs(
            rank[unit[members]] - begin, members, len(chunk), first_pos=f, below=layer
        )
        res = ctx.linear.forward_residuals(
            writes=writes, embed=embed, start=start, stop=layer, first_pos=f
        )[layer]
        out[chunk.to(out.device), f:] = res
    out[-1] = bias
    return out
