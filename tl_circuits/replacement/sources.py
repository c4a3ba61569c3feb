"""What every source writes into the residual stream, and at which column it sits.

The *sources* of one prompt's replacement model are its active features, its error terms
and its token embeddings (DESIGN.md §2: the nodes that have no inputs from the frozen model
or whose inputs are cut). Every analysis reads them the same way, so they are described
once, here:

**Columns** (:class:`SourceColumns`), the order in which reverse passes read sources: the
active features sorted by (layer, pos, feature), then the errors layer-major (error
``(l, p)`` at ``n_features + l * n_pos + p``), then the tokens (``p`` at
``n_features + n_layers * n_pos + p``). A full graph's non-target nodes are exactly these
columns; a budgeted or pruned graph's nodes are a subset (:meth:`SourceColumns.columns_of`).

**Writes** (:class:`SourceWrites`): a source writes one vector per *write slot*, at its own
position. Slot ``j = 0`` is the residual stream entering block 0, slot ``j = w + 1`` is
``mlp_out(w)``:

- token ``p``: ``embedding[p]`` at slot 0;
- error ``(l, p)``: ``error_l[p]`` at slot ``l + 1``;
- feature ``(l, p, f)`` with activation ``a``: ``a * W_dec^(l->w)[f]`` at slot ``w + 1`` for
  every layer ``w`` it writes to (``target_layers(l)``: ``l`` alone for a per-layer
  transcoder, ``l..L-1`` for a cross-layer one).

Forward analyses (head loadings' source side, the QK forward table) propagate these writes
(:meth:`SourceWrites.residual_inputs`); reverse passes read their adjoint,
``write . G_slot[pos]`` for every column at once (:class:`ColumnSink`, what the graph build
and the QK reverse passes share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tl_circuits.replacement.context import FeatureTable, ReplacementContext

#: node kinds, by code (graph node tables use the same codes)
KINDS = ("feature", "error", "token", "target")
FEATURE, ERROR, TOKEN, TARGET = range(4)
#: sources whose write vectors are formed at once in :meth:`SourceWrites.residual_inputs`
WRITE_CHUNK = 4096


@dataclass(frozen=True)
class SourceColumns:
    """The column layout of a prompt's sources (module docstring)."""

    features: FeatureTable
    n_layers: int
    n_pos: int

    @classmethod
    def of(cls, ctx: ReplacementContext) -> SourceColumns:
        """The columns of ``ctx``'s prompt; the feature table is kept on the host (it is
        index bookkeeping; data tensors stay on the model's device)."""
        f = ctx.active_features()
        host = FeatureTable(
            f.layer.cpu(), f.pos.cpu(), f.feature.cpu(), f.activation.cpu(), f.pre_activation.cpu()
        )
        return cls(host, ctx.n_layers, ctx.n_pos)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_cols(self) -> int:
        """Number of source columns: features, errors, tokens."""
        return self.n_features + self.n_layers * self.n_pos + self.n_pos

    def error_column(self, layer: int) -> int:
        """Column of error ``(layer, 0)``; error ``(layer, p)`` is ``p`` further on."""
        return self.n_features + layer * self.n_pos

    @property
    def token_column(self) -> int:
        """Column of token 0; token ``p`` is ``p`` further on."""
        return self.n_features + self.n_layers * self.n_pos

    def layout(self, features: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Kind, layer and position ``[n]`` of the columns, with only the ``features`` rows
        (indices into :attr:`features`, ascending; default all) among the feature columns:
        features, errors layer-major, tokens."""
        long = dict(dtype=torch.long)
        fl, fp = self.features.layer, self.features.pos
        if features is not None:
            fl, fp = fl[features], fp[features]
        n_err, n_pos = self.n_layers * self.n_pos, self.n_pos
        kind = torch.cat(
            [
                torch.full((len(fl),), FEATURE, **long),
                torch.full((n_err,), ERROR, **long),
                torch.full((n_pos,), TOKEN, **long),
            ]
        )
        layer = torch.cat(
            [
                fl,
                torch.arange(self.n_layers).repeat_interleave(n_pos),
                torch.full((n_pos,), -1, **long),
            ]
        )
        pos = torch.cat([fp, torch.arange(n_pos).repeat(self.n_layers), torch.arange(n_pos)])
        return kind, layer, pos

    def columns_of(self, kind: Tensor, layer: Tensor, pos: Tensor, feature: Tensor) -> Tensor:
        """The column of each node ``[n]`` (-1 for targets). Raises ``ValueError`` if a
        feature node is not an active feature of this prompt."""
        col = torch.full((len(kind),), -1, dtype=torch.long)
        feats = self.features
        width = int(feats.feature.max()) + 1 if self.n_features else 1
        active_key = (feats.layer * self.n_pos + feats.pos) * width + feats.feature  # sorted
        is_feat = kind == FEATURE
        key = (layer[is_feat] * self.n_pos + pos[is_feat]) * width + feature[is_feat]
        found = torch.searchsorted(active_key, key)
        if len(key) and (
            self.n_features == 0
            or bool((feature[is_feat] >= width).any())
            or bool((found >= self.n_features).any())
            or bool((active_key[found.clamp_max(self.n_features - 1)] != key).any())
        ):
            raise ValueError("feature nodes are not among the prompt's active features")
        col[is_feat] = found
        is_err = kind == ERROR
        col[is_err] = self.n_features + layer[is_err] * self.n_pos + pos[is_err]
        is_tok = kind == TOKEN
        col[is_tok] = self.token_column + pos[is_tok]
        return col

    def writing_below(self, layer: int) -> Tensor:
        """``[n_cols]`` bool: the columns that write below ``layer`` (features and errors
        of earlier layers, every token), i.e. that can reach ``resid_pre(layer)``."""
        below = torch.zeros(self.n_cols, dtype=torch.bool)
        below[: self.n_features] = self.features.layer < layer
        below[self.n_features : self.error_column(layer)] = True
        below[self.token_column :] = True
        return below

    def sources(self, ctx: ReplacementContext, columns: Tensor) -> SourceWrites:
        """The :class:`SourceWrites` of ``columns``."""
        kind, layer, pos = self.layout()
        feature = torch.full((self.n_cols,), -1, dtype=torch.long)
        feature[: self.n_features] = self.features.feature
        activation = torch.zeros(self.n_cols, dtype=self.features.activation.dtype)
        activation[: self.n_features] = self.features.activation
        return SourceWrites(
            ctx, kind[columns], layer[columns], pos[columns], feature[columns], activation[columns]
        )


class SourceWrites:
    """What each of ``n`` sources writes (module docstring); vectors are formed on demand.

    ``kind``, ``layer``, ``pos``, ``feature``, ``activation``: ``[n]`` (the node-table
    columns; ``activation`` is read for features only). ``writes[j, s]``: source ``s``
    writes at slot ``j`` (``[n_layers + 1, n]``); ``first_slot[s]``: its first slot.
    """

    def __init__(
        self,
        ctx: ReplacementContext,
        kind: Tensor,
        layer: Tensor,
        pos: Tensor,
        feature: Tensor,
        activation: Tensor,
    ) -> None:
        if bool(((kind != FEATURE) & (kind != ERROR) & (kind != TOKEN)).any()):
            bad = int(kind[(kind != FEATURE) & (kind != ERROR) & (kind != TOKEN)][0])
            raise ValueError(f"a {KINDS[bad]} node is not a source (it writes nothing)")
        self.ctx = ctx
        self.kind, self.layer, self.pos = kind.cpu(), layer.cpu(), pos.cpu()
        self.feature, self.activation = feature.cpu(), activation
        n_layers = ctx.n_layers
        self.n_slots = n_layers + 1
        writes = torch.zeros(self.n_slots, len(kind), dtype=torch.bool)
        writes[0] = self.kind == TOKEN
        for la in range(n_layers):
            writes[la + 1] |= (self.kind == ERROR) & (self.layer == la)
            is_feat = (self.kind == FEATURE) & (self.layer == la)
            for w in ctx.transcoders.target_layers(la):
                writes[w + 1] |= is_feat
        self.writes = writes
        self.first_slot = torch.where(self.kind == TOKEN, 0, self.layer + 1)

    def __len__(self) -> int:
        return len(self.kind)

    def vectors(self, slot: int, index: Tensor) -> Tensor:
        """``[len(index), d_model]``: what sources ``index`` (each writing at ``slot``)
        write there, in the context's compute dtype, on the model's device."""
        ctx = self.ctx
        dtype, device = ctx.compute_dtype, ctx.embeddings.device
        index = index.cpu()
        pos = self.pos[index].to(device)
        if slot == 0:
            return ctx.compute_embeddings[pos]
        w = slot - 1
        out = torch.empty(len(index), ctx.model.cfg.d_model, dtype=dtype, device=device)
        is_err = self.kind[index] == ERROR
        if bool(is_err.any()):
            out[is_err.to(device)] = ctx.compute_errors[w][pos[is_err.to(device)]]
        tcs = ctx.transcoders
        for la in self.layer[index[~is_err]].unique().tolist():
            mine = (~is_err & (self.layer[index] == la)).nonzero(as_tuple=True)[0]
            act = self.activation[index[mine].to(self.activation.device)].to(device, dtype)
            rows = tcs.decoder(la, w)[self.feature[index[mine]].to(device)].to(dtype)
            out[mine.to(device)] = act[:, None] * rows
        return out

    def residual_inputs(
        self,
        unit: Tensor,
        members: Tensor,
        n_units: int,
        *,
        slot: Tensor | None = None,
        first_pos: int = 0,
        below: int | None = None,
    ) -> tuple[Tensor | None, dict[int, Tensor]]:
        """Inputs of :meth:`FrozenLinearModel.forward_residuals
        <tl_circuits.replacement.frozen.FrozenLinearModel.forward_residuals>` for a batch of
        ``n_units`` rows: source ``members[i]`` writes into row ``unit[i]`` (several sources
        may share a row; their writes add), at slot ``slot[i]`` only when given and
        ``>= 0`` (else at every slot it writes to).

        Returns ``(embed, writes)``: ``embed`` ``[n_units, n_pos - first_pos, d_model]`` or
        None (no slot-0 write), ``writes[w]`` likewise for ``mlp_out(w)``; positions start at
        ``first_pos`` (every member sits at or after it), and writes at layers ``>= below``
        (which cannot reach ``resid_pre(below)``) are left out.
        """
        ctx = self.ctx
        n_pos, d_model = ctx.n_pos, ctx.model.cfg.d_model
        dtype, device = ctx.compute_dtype, ctx.embeddings.device
        members, unit = members.cpu(), unit.cpu()
        embed: Tensor | None = None
        writes: dict[int, Tensor] = {}
        last_slot = self.n_slots if below is None else min(self.n_slots, below + 1)
        for j in range(last_slot):
            take = self.writes[j, members]
            if slot is not None:
                take &= (slot.cpu() < 0) | (slot.cpu() == j)
            every = take.nonzero(as_tuple=True)[0]
            if len(every) == 0:
                continue
            buf = torch.zeros(n_units, n_pos - first_pos, d_model, dtype=dtype, device=device)
            for idx in every.split(WRITE_CHUNK):  # bounds the [members, d_model] vectors
                where = (unit[idx].to(device), (self.pos[members[idx]] - first_pos).to(device))
                buf.index_put_(where, self.vectors(j, members[idx]), accumulate=True)
            if j == 0:
                embed = buf
            else:
                writes[j - 1] = buf
        return embed, writes


#: at most this many decoder elements gathered at once by :class:`ColumnSink` (16 MiB of
#: float32): the positions of one source layer are read in chunks of this size
GATHER_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class _PositionChunk:
    """Feature columns ``[c0, c1)`` of source layer ``source`` at positions ``[p0, p1)``,
    laid out padded: ``ids`` ``[p1 - p0, width]`` the features' dictionary indices (0 where
    a position has fewer than ``width``), ``valid`` the flat indices of the real ones in
    the ``[p1 - p0, width]`` layout, in column order."""

    source: int
    p0: int
    p1: int
    c0: int
    c1: int
    ids: Tensor
    valid: Tensor


class ColumnSink:
    """Reads every source column off the gradients of one reverse pass, in place.

    For a batch of rows with gradient ``G_w`` on each ``mlp_out(w)`` and ``G_embed`` on the
    embeddings, column ``c`` of row ``r`` gets ``sum_j write_j(c) . G_j[r, pos(c)]`` (the
    writes of :class:`SourceWrites`, read in reverse): ``a * W_dec^(l->w)[f] . G_w`` summed
    over a feature's write layers, ``error_l . G_l``, ``embedding . G_embed``.

    The features of one source layer are sorted by position, so a run of positions is one
    column range. Per write layer, such runs (:class:`_PositionChunk`, at most
    :data:`GATHER_ELEMENTS` decoder elements each) gather their decoder rows padded to
    ``[positions, width, d_model]`` and one batched GEMM over the positions,
    ``G_w[:, p] @ W_dec[f(p)].T``, gives every column of the run (one GEMM per position
    would be many small ones: about 9x slower on CPU); the activations scale the feature
    columns once per batch (:meth:`finish`). Rows are written into a ``[batch_size,
    n_cols]`` buffer allocated once (``n_cols`` >= the source columns; columns past them,
    e.g. a graph's target columns, stay 0).
    """

    def __init__(
        self, ctx: ReplacementContext, columns: SourceColumns, n_cols: int, batch_size: int
    ) -> None:
        tcs, features = ctx.transcoders, columns.features
        self.ctx = ctx
        self.n_cols = n_cols
        self.n_features = columns.n_features
        n_pos, dtype, device = ctx.n_pos, ctx.compute_dtype, ctx.embeddings.device
        self.activation = features.activation.to(device, dtype)
        d_model = ctx.model.cfg.d_model
        # chunks[w]: the position chunks of every source layer writing to layer w
        self.chunks: dict[int, list[_PositionChunk]] = {}
        for s in range(ctx.n_layers):
            made = _position_chunks(features, s, n_pos, d_model, device)
            for layer in tcs.target_layers(s) if made else []:
                self.chunks.setdefault(layer, []).extend(made)
        self.error_cols = [columns.error_column(la) for la in range(ctx.n_layers)]
        self.token_col = columns.token_column
        self.buffer = torch.empty(batch_size, n_cols, dtype=dtype, device=device)
        self.edges = self.buffer[:0]

    def start(self, batch: int, offset: int = 0) -> None:
        """Begin a pass of ``batch`` rows, written at rows ``offset ..`` of the buffer (a
        batch split into several passes fills one buffer; :meth:`rows` reads it whole)."""
        self.edges = self.buffer[offset : offset + batch]
        self.edges.zero_()

    def rows(self, n: int) -> Tensor:
        """The first ``n`` rows of the buffer ``[n, n_cols]`` (a view)."""
        return self.buffer[:n]

    def mlp_out(self, layer: int, grad: Tensor) -> None:
        """Read the columns writing to ``mlp_out(layer)`` off its gradient ``[B, pos, d]``."""
        n_pos, batch = grad.shape[1], grad.shape[0]
        decoders, dtype = self.ctx.transcoders, self.buffer.dtype
        for chunk in self.chunks.get(layer, []):
            if chunk.p0 >= n_pos:  # the batch's rows end before: zero gradient there
                continue
            p1 = min(chunk.p1, n_pos)
            ids = chunk.ids[: p1 - chunk.p0]
            decoder = decoders.decoder(chunk.source, layer)
            dec = decoder.index_select(0, ids.reshape(-1)).to(dtype)
            dec = dec.view(len(ids), ids.shape[1], -1)  # [positions, width, d_model]
            # [positions, width, B]: its (position, slot) rows are the chunk's columns
            dots = torch.bmm(dec, grad[:, chunk.p0 : p1].transpose(0, 1).transpose(1, 2))
            flat = dots.view(-1, batch)
            valid = chunk.valid if p1 == chunk.p1 else chunk.valid[chunk.valid < len(flat)]
            self.edges[:, chunk.c0 : chunk.c0 + len(valid)] += flat.index_select(0, valid).T
        self._dot_per_position(grad, self.ctx.compute_errors[layer], self.error_cols[layer])

    def attn_out(self, layer: int, grad: Tensor) -> None:
        """No source writes at an attention output: nothing to read."""

    def embeddings(self, grad: Tensor) -> None:
        """Read the token columns off the gradient on the embeddings ``[B, pos, d]``."""
        self._dot_per_position(grad, self.ctx.compute_embeddings, self.token_col)

    def _dot_per_position(self, grad: Tensor, values: Tensor, col: int) -> None:
        """``edges[:, col + p] = grad[:, p] · values[p]`` for every position ``p`` of grad."""
        n_pos = grad.shape[1]
        dots = torch.bmm(grad.transpose(0, 1), values[:n_pos, :, None])  # [pos, B, 1]
        self.edges[:, col : col + n_pos].copy_(dots[..., 0].T)

    def finish(self) -> Tensor:
        """The batch's rows ``[batch, n_cols]`` (a view of the reused buffer)."""
        self.edges[:, : self.n_features].mul_(self.activation)
        return self.edges


def _position_chunks(
    features: FeatureTable, source: int, n_pos: int, d_model: int, device: torch.device
) -> list[_PositionChunk]:
    """The active features of layer ``source`` as runs of positions whose padded decoder
    gather stays within :data:`GATHER_ELEMENTS` (column order: features are sorted by
    (layer, position, feature))."""
    in_layer = (features.layer == source).nonzero(as_tuple=True)[0]
    if len(in_layer) == 0:
        return []
    first_col = int(in_layer[0])
    counts = torch.bincount(features.pos[in_layer], minlength=n_pos).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    ids_all = features.feature[in_layer]
    out: list[_PositionChunk] = []
    p0 = 0
    while p0 < n_pos:
        p1, width = p0, 0
        while p1 < n_pos:  # grow the run while its padded gather fits
            w = max(width, counts[p1], 1)
            if p1 > p0 and (p1 + 1 - p0) * w * d_model > GATHER_ELEMENTS:
                break
            width, p1 = w, p1 + 1
        ids = torch.zeros(p1 - p0, width, dtype=torch.long)
        valid = []
        for i, p in enumerate(range(p0, p1)):
            ids[i, : counts[p]] = ids_all[starts[p] : starts[p + 1]]
            valid.append(torch.arange(counts[p]) + i * width)
        valid_t = torch.cat(valid)
        if len(valid_t):
            c0 = first_col + starts[p0]
            out.append(
                _PositionChunk(source, p0, p1, c0, c0 + len(valid_t), ids.to(device),
                               valid_t.to(device))
            )
        p0 = p1
    return out
