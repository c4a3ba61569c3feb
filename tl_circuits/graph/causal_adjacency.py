"""Causal block storage of an attribution graph's adjacency.

A feature node at (layer ``l``, position ``p``) has incoming edges only from features and
errors of layers ``< l`` at positions ``<= p`` and from tokens at positions ``<= p``; error
and token nodes have none; a target reads everything. Grouping the rows by (layer,
position) and storing, per group, a dense ``[rows, sources]`` block over exactly those
sources keeps about a quarter of the dense ``n_nodes x n_nodes`` matrix.

``CausalAdjacency.from_groups(n_nodes, causal_groups(kind, layer, pos))`` lays the blocks
out for a node table; rows are then written with :meth:`set_rows` (dense rows over all
columns, as the build's reverse passes produce them), and read back with :meth:`to_dense`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tl_circuits.graph.nodes import ERROR, FEATURE, TARGET, TOKEN


@dataclass
class RowGroup:
    """Rows (node indices) sharing one source set ``cols``; ``values[i, j]`` is the edge
    ``cols[j] -> rows[i]``."""

    rows: Tensor  # [n_rows] long
    cols: Tensor  # [n_cols] long, ascending
    values: Tensor  # [n_rows, n_cols]


class CausalAdjacency:
    """``A[target, source]`` stored as row groups with causal source sets (module doc)."""

    def __init__(self, n_nodes: int, groups: list[RowGroup]) -> None:
        self.n_nodes = n_nodes
        self.groups = groups
        self.group_of = torch.full((n_nodes,), -1, dtype=torch.long)
        self.slot_of = torch.full((n_nodes,), -1, dtype=torch.long)
        for g, group in enumerate(groups):
            self.group_of[group.rows] = g
            self.slot_of[group.rows] = torch.arange(len(group.rows))

    @classmethod
    def from_groups(
        cls,
        n_nodes: int,
        groups: list[tuple[Tensor, Tensor]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> CausalAdjacency:
        """Zero blocks for the ``(rows, cols)`` groups of :func:`causal_groups`."""
        blocks = [
            RowGroup(rows, cols, torch.zeros(len(rows), len(cols), dtype=dtype, device=device))
            for rows, cols in groups
        ]
        return cls(n_nodes, blocks)

    @property
    def nbytes(self) -> int:
        return sum(g.values.numel() * g.values.element_size() for g in self.groups)

    def set_rows(self, rows: Tensor, dense_rows: Tensor) -> None:
        """Store ``dense_rows`` ``[len(rows), n_nodes]`` (node-ordered columns).

        Entries outside a row's source set must be zero; a ``ValueError`` says so when
        they are not (an edge the causal layout cannot hold), instead of dropping them.
        """
        groups = self.group_of[rows]
        total = dense_rows.abs().sum()
        kept = dense_rows.new_zeros(())
        for g in groups.unique().tolist():
            if g < 0:
                continue  # error / token rows: no incoming edges
            mine = (groups == g).nonzero(as_tuple=True)[0]
            group = self.groups[g]
            block = dense_rows[mine][:, group.cols]
            group.values[self.slot_of[rows[mine]]] = block
            kept += block.abs().sum()
        if float(total - kept) > 1e-5 * float(total) + 1e-30:
            raise ValueError(
                f"rows {rows.tolist()[:8]}... have edges from sources outside their causal "
                f"set (|dropped| = {float(total - kept):.3g} of {float(total):.3g})"
            )

    def set_columns(self, rows: Tensor, cols: Tensor, values: Tensor) -> None:
        """Write ``values[i, j]`` at ``A[rows[i], cols[j]]``: rows of one group, columns
        (ascending) all in its source set (``ValueError`` otherwise)."""
        groups = self.group_of[rows.cpu()].unique().tolist()
        if len(groups) != 1 or groups[0] < 0:
            raise ValueError(f"rows {rows.tolist()[:8]} are not the rows of one causal group")
        group = self.groups[groups[0]]
        gcols = group.cols.to(cols.device)
        at = torch.searchsorted(gcols, cols).clamp_max(max(len(gcols) - 1, 0))
        if len(cols) and not bool((gcols[at] == cols).all()):
            raise ValueError(f"columns outside the causal source set of rows {rows.tolist()[:8]}")
        slots = self.slot_of[rows.cpu()].to(group.values.device)
        group.values[slots[:, None], at.to(group.values.device)[None, :]] = values

    def to_dense(self) -> Tensor:
        every = torch.arange(self.n_nodes)
        return dense_submatrix(row_groups(self), self.n_nodes, every)


def causal_groups(kind: Tensor, layer: Tensor, pos: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(rows, cols)`` of every row group: the feature rows of each (layer ``l``, position
    ``p``) with the features and errors of layers ``< l`` and the tokens, at positions
    ``<= p``; the target rows with every non-target node. Error and token rows have no
    inputs and no group."""
    n = len(kind)
    layered = (kind == FEATURE) | (kind == ERROR)
    out: list[tuple[Tensor, Tensor]] = []
    feature = (kind == FEATURE).nonzero(as_tuple=True)[0]
    keys = layer[feature] * (int(pos.max()) + 1 if n else 1) + pos[feature]
    for key in keys.unique().tolist():
        rows = feature[keys == key]
        la, p = int(layer[rows[0]]), int(pos[rows[0]])
        sources = ((layered & (layer < la)) | (kind == TOKEN)) & (pos <= p)
        out.append((rows, sources.nonzero(as_tuple=True)[0]))
    targets = (kind == TARGET).nonzero(as_tuple=True)[0]
    if len(targets):
        out.append((targets, (kind != TARGET).nonzero(as_tuple=True)[0]))
    return out


def row_groups(edges: Tensor | CausalAdjacency) -> list[RowGroup]:
    """The edges as row groups: a :class:`CausalAdjacency`'s own blocks, or a dense
    ``[n, n]`` matrix as one group over every row and column (no copy). Index tensors are
    on the values' device."""
    if isinstance(edges, CausalAdjacency):
        return [
            RowGroup(g.rows.to(g.values.device), g.cols.to(g.values.device), g.values)
            for g in edges.groups
        ]
    every = torch.arange(edges.shape[0], device=edges.device)
    return [RowGroup(every, every, edges)]


def dense_submatrix(
    groups: list[RowGroup], n_nodes: int, index: Tensor, masks: list[Tensor] | None = None
) -> Tensor:
    """The dense ``[len(index), len(index)]`` block ``A[index][:, index]`` of the edges held
    in ``groups`` (``index`` ascending, without repeats); with ``masks`` (one bool per
    group value), entries where the mask is False are 0."""
    like = groups[0].values if groups else torch.zeros(0)
    index = index.to(like.device)
    slot = torch.full((n_nodes,), -1, dtype=torch.long, device=like.device)
    slot[index] = torch.arange(len(index), device=like.device)
    out = like.new_zeros(len(index), len(index))
    for i, g in enumerate(groups):
        r, c = slot[g.rows], slot[g.cols]
        keep_r, keep_c = (r >= 0).nonzero()[:, 0], (c >= 0).nonzero()[:, 0]
        if len(keep_r) == 0 or len(keep_c) == 0:
            continue
        values = g.values if masks is None else torch.where(masks[i], g.values, 0)
        out[r[keep_r][:, None], c[keep_c][None, :]] = values[keep_r][:, keep_c]
    return out


def causal_group_sizes(kind: Tensor, layer: Tensor, pos: Tensor) -> list[tuple[int, int]]:
    """``(n_rows, n_cols)`` of every group of :func:`causal_groups` (same order), counted
    without building the index tensors: what a reader checks against the memory before
    laying out blocks for a node table it has not built itself. Positions must be ``>= 0``
    and feature/error layers ``>= 0``."""
    n = len(kind)
    out: list[tuple[int, int]] = []
    feature = (kind == FEATURE).nonzero(as_tuple=True)[0]
    if len(feature):
        width = int(pos.max()) + 1
        keys, counts = (layer[feature] * width + pos[feature]).unique(return_counts=True)
        g_layer, g_pos = keys // width, keys % width
        n_cols = torch.bincount(pos[kind == TOKEN], minlength=width).cumsum(0)[g_pos]
        layered = (kind == FEATURE) | (kind == ERROR)
        src_layer, order = torch.sort(layer[layered])
        src_pos = pos[layered][order]
        hist = torch.zeros(width, dtype=torch.long)
        done = 0
        for la in g_layer.unique().tolist():  # ascending
            upto = int(torch.searchsorted(src_layer, la))  # sources with layer < la
            if upto > done:
                hist += torch.bincount(src_pos[done:upto], minlength=width)
                done = upto
            sel = g_layer == la
            n_cols[sel] += hist.cumsum(0)[g_pos[sel]]
        out = [(int(r), int(c)) for r, c in zip(counts.tolist(), n_cols.tolist())]
    n_targets = int((kind == TARGET).sum())
    if n_targets:
        out.append((n_targets, n - n_targets))
    return out
