"""The two sides of a head loading and their contraction (maths in
:mod:`tl_circuits.attention.heads.loadings`).

- **Target side** (:func:`target_block`): one reverse pass of a chunk of target rows over
  the positions ``0..P-1`` they can read (``P``: the chunk's last position + 1; attention
  is causal), keeping at every layer ``m`` up to the chunk's last crossed layer the two
  gradients a contraction needs: ``gv[m]`` ``[H, T, P, d_head]``, the gradient ``g_m`` on
  layer ``m``'s attention output carried back through ``W_O`` and the frozen pattern (the
  attention adjoint up to ``W_V``), and ``gb[m]`` ``[T, P, d_model]``, the bypass gradient.
  On the way the write values ``v_w . G_w`` of the chunk's edges are read off the MLP-output
  gradients (:class:`_WriteValueSink`), so those gradients are never stored.
- **Unit side** (:func:`unit_block`): one forward pass of a chunk of units from its first
  layer and first position ``f`` on (``forward_residuals(first_pos=f)``), keeping
  ``x[m]`` ``[U, n_pos - f, d_model]`` (its part of ``resid_pre(m)``) and
  ``vx[m] = LN1(x_m) W_V`` ``[H, U, n_pos - f, d_head]``.
- **Contraction** (:func:`contract`): for the (edge, unit) pairs of a target chunk and a
  unit chunk crossing layer ``m``, ``loading[m, h] = sum_pos gv_h . vx_h`` and
  ``bypass[m] = sum_pos gb . x`` over the positions both are nonzero at (``f..P-1``): one
  batched GEMM over the pairs' rows when they are dense enough, else gathered per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import TARGET
from tl_circuits.replacement.context import ReplacementContext
from tl_circuits.replacement.frozen import BackwardWorkspace, Seeds, SparseSeeds
from tl_circuits.replacement.norms import norm_adjoint_
from tl_circuits.replacement.sources import SourceWrites

#: bytes of one gathered operand of the per-pair contraction (bounds its temporaries)
GATHER_BYTES = 64 * 2**20
#: a pair block is contracted as a dense GEMM over its rows when the pairs fill at least
#: 1 / DENSE_FILL of the (target rows x unit rows) block (a GEMM entry costs far less than
#: a gathered one)
DENSE_FILL = 16
#: rows of a block: a range (a view) or indices (gathered)
Rows = slice | Tensor


@dataclass
class TargetBlock:
    """Target-side gradients of one chunk of target rows (module docstring): ``gv[m]``
    ``[H, T, P, d_head]`` and ``gb[m]`` ``[T, P, d_model]`` for ``m <= top`` (None above
    ``top``, the chunk's last crossed layer); positions ``0..n_pos - 1``."""

    gv: list[Tensor | None]
    gb: list[Tensor | None]
    n_pos: int


@dataclass
class UnitBlock:
    """Unit-side contributions of one chunk of units (module docstring): ``x[m]``
    ``[U, n - first_pos, d_model]`` and ``vx[m]`` ``[H, U, n - first_pos, d_head]`` for
    ``start <= m <= stop`` (None elsewhere); positions ``first_pos..n - 1``."""

    x: list[Tensor | None]
    vx: list[Tensor | None]
    first_pos: int


@dataclass(frozen=True)
class EdgeWrites:
    """What the write values of a chunk's edges need: edge ``edge[i]`` has its target in
    row ``row[i]`` of the chunk, its source ``source[i]`` (index into ``writes``) at
    position ``pos[i]``; ``values`` ``[n_edges, n_slots]`` receives ``v_j . G_j``."""

    writes: SourceWrites
    edge: Tensor
    row: Tensor
    source: Tensor
    pos: Tensor
    values: Tensor
    chunk: int


def target_block(
    ctx: ReplacementContext,
    graph: AttributionGraph,
    rows: list[int],
    top: int,
    edge_writes: EdgeWrites | None,
    workspace: BackwardWorkspace,
) -> TargetBlock:
    """Reverse pass of target ``rows`` (node indices) with the gradients of every layer up
    to ``top``; with ``edge_writes``, their edges' write values are read on the way."""
    lin = ctx.linear
    n_pos = int(graph.nodes.pos[rows].max()) + 1
    block = TargetBlock([None] * lin.n_layers, [None] * lin.n_layers, n_pos)
    sink = _WriteValueSink(ctx, block, top, edge_writes)
    g_embed = lin.backward(
        _target_seeds(ctx, graph, rows, n_pos),
        sink,
        len(rows),
        n_pos=n_pos,
        workspace=workspace,
        values=sink.values,
    )
    if edge_writes is not None:
        sink.read_writes(0, g_embed)
    return block


def _target_seeds(
    ctx: ReplacementContext, graph: AttributionGraph, rows: list[int], n_pos: int
) -> Seeds:
    """Encoder rows at ``x_in(l)`` for feature targets, read-out vectors on the final norm's
    output for graph targets (``[B, n_pos, d_model]``)."""
    nodes, lin = graph.nodes, ctx.linear
    dtype, device = ctx.compute_dtype, ctx.embeddings.device
    first_target = int(graph.indices("target")[0]) if nodes.count("target") else 0
    final = None
    by_layer: dict[int, list[tuple[int, int, Tensor]]] = {}
    for i, t in enumerate(rows):
        if int(nodes.kind[t]) == TARGET:
            target = graph.targets[t - first_target]
            if final is None:
                final = torch.zeros(len(rows), n_pos, lin.d_model, dtype=dtype, device=device)
            final[i, target.pos] = target.vector.to(device, dtype)
        else:
            layer = int(nodes.layer[t])
            w_enc = ctx.transcoders.encoder(layer).W_enc[:, int(nodes.feature[t])]
            by_layer.setdefault(layer, []).append((i, int(nodes.pos[t]), w_enc))
    x_in = {
        layer: SparseSeeds(
            torch.tensor([r for r, _, _ in seeds]),
            torch.tensor([p for _, p, _ in seeds]),
            torch.stack([v for _, _, v in seeds]).to(device, dtype),
        )
        for layer, seeds in by_layer.items()
    }
    return Seeds(x_in=x_in, final=final)


class _WriteValueSink:
    """A :class:`~tl_circuits.replacement.frozen.GradientSink` keeping ``gb`` (and, through
    :meth:`values`, ``gv``) of every layer up to ``top`` and reading the write values of
    ``edge_writes`` off the MLP-output gradients."""

    def __init__(
        self,
        ctx: ReplacementContext,
        block: TargetBlock,
        top: int,
        edge_writes: EdgeWrites | None,
    ) -> None:
        self.lin, self.block, self.top, self.edge_writes = ctx.linear, block, top, edge_writes

    def mlp_out(self, layer: int, grad: Tensor) -> None:
        if self.edge_writes is not None:
            self.read_writes(layer + 1, grad)

    def attn_out(self, layer: int, grad: Tensor) -> None:
        if layer > self.top:
            return
        frozen = self.lin.blocks[layer]
        gb = grad.clone(memory_format=torch.contiguous_format)  # [T, P, d], owned
        if frozen.parallel and frozen.W_skip is not None:  # the skip MLP beside attention
            skip = grad.transpose(0, 1) @ frozen.W_skip  # position-major [P, T, d]
            norm_adjoint_(frozen.mlp_in, skip)
            gb += skip.transpose(0, 1)
        self.block.gb[layer] = gb

    def values(self, layer: int, g_v: Tensor) -> None:
        """Keep ``gv`` ``[H, T, P, d_head]`` from the backward's gradient on the values
        ``[H, P, T, d_head]`` (``W_O^T`` and the transposed pattern already applied:
        ``gv_h[k] = sum_q P_h[q, k] W_O^h post^T(g_m)[q]``)."""
        if layer <= self.top:
            self.block.gv[layer] = g_v.permute(0, 2, 1, 3).clone(
                memory_format=torch.contiguous_format
            )

    def read_writes(self, slot: int, grad: Tensor) -> None:
        """``values[e, slot] = v_slot(source) . grad[row, pos]`` for the edges whose
        source writes at ``slot`` (``grad`` ``[T, P, d]``)."""
        ew = self.edge_writes
        assert ew is not None
        mine = ew.writes.writes[slot, ew.source].nonzero(as_tuple=True)[0]
        device = grad.device
        for part in mine.split(ew.chunk):
            v = ew.writes.vectors(slot, ew.source[part])
            g_at = grad[ew.row[part].to(device), ew.pos[part].to(device)]
            ew.values[ew.edge[part].to(device), slot] = (v * g_at).sum(-1)


def unit_block(
    ctx: ReplacementContext,
    writes: SourceWrites,
    sources: Tensor,
    slots: Tensor,
    start: int,
    stop: int,
    first_pos: int,
) -> UnitBlock:
    """Forward pass of the units ``(sources[i], slots[i])`` (slot -1: every slot the source
    writes at) from layer ``start`` and position ``first_pos``, kept at layers
    ``start..stop`` (module docstring)."""
    lin = ctx.linear
    n = len(sources)
    embed, inputs = writes.residual_inputs(
        torch.arange(n), sources, n, slot=slots, first_pos=first_pos, below=stop
    )
    # every unit writes below a layer it crosses, so something reaches resid_pre(stop)
    assert embed is not None or inputs
    resid = lin.forward_residuals(inputs, embed, start=start, stop=stop, first_pos=first_pos)
    block = UnitBlock([None] * lin.n_layers, [None] * lin.n_layers, first_pos)
    for m in range(start, stop + 1):
        frozen = lin.blocks[m]
        y = frozen.ln1.forward_linear(resid[m], first_pos)
        block.x[m] = resid[m]
        block.vx[m] = torch.einsum("bkm,hme->hbke", y, frozen.W_V).contiguous()
    return block


def contract(
    target: TargetBlock,
    unit: UnitBlock,
    m: int,
    t_rows: Tensor,
    u_rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(loadings [n, H], bypass [n])`` at layer ``m`` of the pairs (target row
    ``t_rows[i]`` of ``target``, unit row ``u_rows[i]`` of ``unit``), summed over the
    positions both blocks hold (``unit.first_pos .. target.n_pos - 1``)."""
    gv, gb, vx, x = target.gv[m], target.gb[m], unit.vx[m], unit.x[m]
    assert gv is not None and gb is not None and vx is not None and x is not None
    f, p = unit.first_pos, target.n_pos
    n_heads = gv.shape[0]
    if f >= p:  # no position in common (cannot happen for a real edge: causal)
        zeros = torch.zeros(len(t_rows), n_heads, dtype=gv.dtype, device=gv.device)
        return zeros, zeros[:, 0]
    # [H, T, K] / [T, K'] views over the common positions
    gv_s = gv[:, :, f:p].reshape(n_heads, gv.shape[1], -1)
    vx_s = vx[:, :, : p - f].reshape(n_heads, vx.shape[1], -1)
    gb_s = gb[:, f:p].reshape(gb.shape[0], -1)
    x_s = x[:, : p - f].reshape(x.shape[0], -1)
    device = gv.device
    t_rows, u_rows = t_rows.to(device), u_rows.to(device)
    dense = _dense_rows(t_rows, u_rows)
    if dense is not None:
        (t_index, t_loc), (u_index, u_loc) = dense
        lo_all = torch.bmm(_rows(gv_s, 1, t_index), _rows(vx_s, 1, u_index).transpose(1, 2))
        by_all = _rows(gb_s, 0, t_index) @ _rows(x_s, 0, u_index).T  # [t, u]
        return lo_all[:, t_loc, u_loc].T, by_all[t_loc, u_loc]
    width = n_heads * gv_s.shape[2] * gv_s.element_size()
    step = max(1, GATHER_BYTES // max(1, width))
    lo_parts, by_parts = [], []
    for ti, ui in zip(t_rows.split(step), u_rows.split(step), strict=True):
        a, b = gv_s[:, ti], vx_s[:, ui]  # [H, n, K]
        lo_parts.append((a.unsqueeze(-2) @ b.unsqueeze(-1)).view(n_heads, -1).T)
        by_parts.append((gb_s[ti].unsqueeze(-2) @ x_s[ui].unsqueeze(-1)).view(-1))
    return torch.cat(lo_parts), torch.cat(by_parts)


def _dense_rows(
    t_rows: Tensor, u_rows: Tensor
) -> tuple[tuple[Rows, Tensor], tuple[Rows, Tensor]] | None:
    """The target and unit rows of a dense GEMM covering the pairs, each as (rows, the
    pairs' place among them), or None when the pairs are too sparse for one: the range of
    rows they span (a view, no copy) if they fill 1 / :data:`DENSE_FILL` of it, else the
    distinct rows (gathered) if they fill that of those."""
    n = len(t_rows)
    t_lo, t_hi = int(t_rows.min()), int(t_rows.max()) + 1
    u_lo, u_hi = int(u_rows.min()), int(u_rows.max()) + 1
    if DENSE_FILL * n >= (t_hi - t_lo) * (u_hi - u_lo):
        return (slice(t_lo, t_hi), t_rows - t_lo), (slice(u_lo, u_hi), u_rows - u_lo)
    t_sel, t_loc = torch.unique(t_rows, return_inverse=True)
    u_sel, u_loc = torch.unique(u_rows, return_inverse=True)
    if DENSE_FILL * n >= len(t_sel) * len(u_sel):
        return (t_sel, t_loc), (u_sel, u_loc)
    return None


def _rows(x: Tensor, dim: int, rows: Rows) -> Tensor:
    """``x``'s ``rows`` along ``dim``: a slice as a view, indices gathered."""
    if isinstance(rows, slice):
        return x[:, rows] if dim == 1 else x[rows]
    return x.index_select(dim, rows)
