"""Graph-basis head vectors by reverse passes seeded at one head's query / key map.

A head of layer ``m`` reads ``resid_pre(m)`` through a linear map (ln1 with its frozen
scale, then ``W_Q[h]`` or ``W_K[h_kv]``; QK-norm and rotary come after, per position, and
are applied by :meth:`QKBasis.project`). Dimension ``e`` of the (unfinished) query vector at
position ``p`` is therefore ``<s_{p,e}, resid_pre(m)[p]>`` with the *seed*

    s_{p,e} = ln1_adjoint_p(W[:, e])        ([d_model], at position p only)

and one reverse pass of the frozen replacement model from that seed (the graph build's
:meth:`FrozenLinearModel.backward`, started at ``resid_pre(m)``) gives, through the build's
:class:`~tl_circuits.replacement.sources.ColumnSink`, the value of every source at once:
``a_f d_f . G`` for each active feature, ``G . error`` for each error, ``G . embedding`` for
each token. Seeds for
``d_head`` dimensions x the requested positions are batched, so a question about one head
and a few positions costs ``d_head x positions`` rows, not a propagation of every node.

The values equal the forward table of :func:`tl_circuits.attention.qk.graph_basis.forward_table`
projected by the same map (the reverse pass is its adjoint). Columns of active features,
errors and tokens that are not nodes of the graph (a budget or pruning left them out) sum
into ``EXCLUDED``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.attention.qk.components import Side
from tl_circuits.replacement.context import ReplacementContext
from tl_circuits.replacement.frozen import BackwardWorkspace, Seeds, SparseSeeds
from tl_circuits.replacement.norms import frozen_norm
from tl_circuits.replacement.sources import ColumnSink, SourceColumns

#: seed rows per reverse pass
SEED_BATCH = 256


class ReverseHeadVectors:
    """Unfinished query / key vectors of every graph-basis row, one reverse pass per batch
    of seeds, cached per ``(side, side head, position)``. ``check_rows(rows)`` raises for
    table rows that do not write below the layer (the basis's own check).

    ``vectors(side, side_head, rows, positions)`` returns ``[len(rows), P, d_head]`` for
    rows of the basis table (graph nodes, then ``EXCLUDED``, then ``BIAS``), or None where
    the forward propagation should answer instead; the bias row is zero here
    (:meth:`QKBasis.project` projects the bias residual itself).

    ``method``: "reverse" always answers; "forward" never does; "auto" answers while the
    seeds run so far plus the new ones stay within ``n_forward_rows`` (the rows one forward
    propagation of every node costs), the new ones alone within half of it, and the forward
    table is not built (``forward_built()``). Past that budget the forward table is cheaper
    for everything that follows, so the total never exceeds about twice the cheaper of the
    two; a single request costing more than half the table goes to the table at once (it
    would cost at least half as much again by reverse passes, and every later request is
    then free).
    ``seeds_run`` counts the seed rows propagated so far.
    """

    def __init__(
        self,
        ctx: ReplacementContext,
        columns: SourceColumns,
        layer: int,
        ln1_scale: Tensor | None,
        *,
        node_col: Tensor,
        excluded_cols: Tensor,
        check_rows: Callable[[Tensor], None],
        method: Literal["auto", "forward", "reverse"],
        n_forward_rows: int,
        forward_built: Callable[[], bool],
    ) -> None:
        self.ctx, self.columns, self.layer = ctx, columns, layer
        self.model = ctx.model
        self.ln1_scale = ln1_scale  # [pos, 1] or None (no normalisation)
        self.dtype, self.device = ctx.compute_dtype, ctx.embeddings.device
        self.method, self.n_forward_rows, self.forward_built = method, n_forward_rows, forward_built
        self.seeds_run = 0
        self.check_rows = check_rows
        #: the sink column of each graph node (-1: a target, or a node at or after the layer)
        self.node_col = node_col
        #: columns of sources writing below the layer that are not nodes (-> ``EXCLUDED``)
        self.excluded_cols = excluded_cols
        self._cache: dict[tuple[Side, int, int], Tensor] = {}
        self._sink: ColumnSink | None = None
        self._workspace: BackwardWorkspace | None = None

    # ---- seeds and passes ----------------------------------------------------------------

    def _seed_vectors(self, W: Tensor, positions: Sequence[int]) -> Tensor:
        """``[P, d_head, d_model]``: ``s_{p,e}``, the adjoint of ln1 (frozen scale at ``p``)
        applied to column ``e`` of the head's ``W`` ``[d_model, d_head]``."""
        block = self.model.blocks[self.layer]
        rows = W.T.to(self.dtype)[None].expand(len(positions), -1, -1)  # [P, d_head, d]
        if self.ln1_scale is None:
            return rows.clone()
        pos = torch.as_tensor(list(positions), dtype=torch.long, device=self.ln1_scale.device)
        scale = self.ln1_scale[pos][:, None, :]  # [P, 1, 1]
        norm = frozen_norm(block.ln1, scale).to(self.dtype)
        return norm.adjoint(rows)

    def _run(
        self, side: Side, side_head: int, W: Tensor, positions: list[int], show_progress: bool
    ) -> None:
        """Reverse passes for every dimension of ``W`` at ``positions``; fills the cache."""
        ctx, n_nodes = self.ctx, len(self.node_col)
        seeds = self._seed_vectors(W, positions)  # [P, d_head, d]
        d_head = seeds.shape[1]
        flat = seeds.reshape(-1, seeds.shape[-1])  # row r = (position r // d_head, dim)
        flat_pos = torch.as_tensor(positions, dtype=torch.long, device=self.device)
        flat_pos = flat_pos.repeat_interleave(d_head)
        batch = min(SEED_BATCH, len(flat))
        if self._sink is None or self._sink.buffer.shape[0] < batch:
            self._sink = ColumnSink(ctx, self.columns, self.columns.n_cols, batch)
            self._workspace = BackwardWorkspace(
                ctx.linear, batch, ctx.n_pos, self.dtype, self.device
            )
        values = torch.empty(len(flat), n_nodes + 2, dtype=self.dtype, device=self.device)
        has_col = self.node_col >= 0
        node_cols = self.node_col[has_col].to(self.device)
        has_col, excluded = has_col.to(self.device), self.excluded_cols.to(self.device)
        for start in tqdm(
            range(0, len(flat), batch),
            desc=f"QK {side} reverse passes",
            unit="batch",
            disable=not show_progress,
        ):
            vec, pos = flat[start : start + batch], flat_pos[start : start + batch]
            n = len(vec)
            self._sink.start(n)
            rows = torch.arange(n, device=self.device)
            g_embed = ctx.linear.backward(
                Seeds(resid=(self.layer, SparseSeeds(rows, pos, vec))),
                self._sink,
                n,
                n_pos=int(pos.max()) + 1,
                workspace=self._workspace,
            )
            self._sink.embeddings(g_embed)
            edges = self._sink.finish()  # [n, n_cols]
            out = values[start : start + n]
            out.zero_()
            out[:, :n_nodes][:, has_col] = edges[:, node_cols]
            out[:, n_nodes] = edges[:, excluded].sum(1)
        self.seeds_run += len(flat)
        per_pos = values.view(len(positions), d_head, n_nodes + 2)
        for i, p in enumerate(positions):
            self._cache[(side, side_head, p)] = per_pos[i].T.contiguous()  # [n_rows, d_head]

    # ---- the public face -----------------------------------------------------------------

    def missing(self, side: Side, side_head: int, positions: Sequence[int]) -> list[int]:
        """Positions whose vectors are not cached yet."""
        return sorted({p for p in positions if (side, side_head, p) not in self._cache})

    def answers(self, todo: list[int]) -> bool:
        """Whether :meth:`vectors` answers a request whose uncached positions are ``todo``
        (see the class doc)."""
        if self.method != "auto":
            return self.method == "reverse"
        if not todo:
            return True
        if self.forward_built():
            return False
        new = len(todo) * self.model.cfg.d_head
        return 2 * new <= self.n_forward_rows and self.seeds_run + new <= self.n_forward_rows

    def vectors(
        self,
        side: Side,
        side_head: int,
        W: Tensor,
        rows: Tensor,
        positions: Sequence[int],
        show_progress: bool = False,
    ) -> Tensor | None:
        """``[len(rows), P, d_head]`` unfinished vectors of table ``rows`` (bias row: 0) for
        the head reading ``W`` ``[d_model, d_head]`` (``W_Q[h]``, or ``W_K`` of key head
        ``side_head``), or None when the forward table should answer."""
        self.check_rows(rows)
        todo = self.missing(side, side_head, positions)
        if not self.answers(todo):
            return None
        if todo:
            self._run(side, side_head, W, todo, show_progress)
        return torch.stack([self._cache[(side, side_head, p)][rows] for p in positions], dim=1)
