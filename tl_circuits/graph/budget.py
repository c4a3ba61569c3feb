"""A feature budget: which features a budgeted build computes rows for (DESIGN.md §2).

With ``max_feature_nodes`` set, the build does not compute every active feature's row: it
computes the targets' rows, then repeatedly ranks the unvisited features by their influence
on the targets as far as the rows known so far tell (the same normalised ``|A|`` series as
pruning, :mod:`~tl_circuits.graph.pruning`) and computes the next batch of the most
influential ones, until the budget is spent.

The visited feature rows are kept in :class:`CausalRows`: each only over its causal columns
(a feature at (layer ``l``, position ``p``) reads only features and errors of layers ``< l``
and tokens, at positions ``<= p``), never as a dense ``[rows, n_cols]`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.graph.nodes import Target, normalized_target_weights
from tl_circuits.replacement.sources import SourceColumns
from tl_circuits.storage import SpillFile

#: rows of a stored group read at once (bounds the ``[rows, n_causal]`` temporaries) ...
ROW_CHUNK = 128
#: ... and at most this many elements (16 MiB of float32): a long prompt's rows are wide
READ_ELEMENTS = 1 << 22
#: rows of a batch handled at once while storing it (its ``[rows, n_cols]`` temporaries)
STORE_ROWS = 8


def row_totals(dense: Tensor) -> Tensor:
    """``|dense|.sum(1)`` ``[n]``, :data:`STORE_ROWS` rows at a time (no ``[n, n_cols]``
    temporary)."""
    return torch.cat([r.abs().sum(1) for r in dense.split(STORE_ROWS)])


@dataclass
class _Piece:
    """Rows of one group stored by one :meth:`CausalRows.add`: ``values`` ``[n_rows,
    n_causal]`` in memory, or ``n_rows x n_causal`` elements at byte ``offset`` of the
    spill file."""

    n_rows: int
    values: Tensor | None = None
    offset: int = -1


@dataclass
class _Group:
    """The visited rows of one (layer, position): their slots and stored pieces."""

    slots: list[Tensor] = field(default_factory=list)
    pieces: list[_Piece] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return sum(p.n_rows for p in self.pieces)


class CausalRows:
    """Visited feature rows, each stored over its causal columns only.

    Rows are grouped by (layer ``l``, position ``p``); a group holds ``slots`` (the rows'
    visiting order) and values ``[rows, n_causal]`` over the group's causal columns in
    column order: for each layer ``l' < l`` the features of ``(l', 0..p)`` (one contiguous
    column range, as features are sorted by (layer, pos, feature)), then for each layer
    ``l' < l`` its errors at ``0..p``, then the tokens ``0..p``. The first
    :meth:`n_feature_cols` of them are feature columns.

    Values live in memory, or, with ``spill`` (a :class:`~tl_circuits.storage.SpillFile`),
    on disk: each :meth:`add` appends its blocks to the file and :meth:`items` reads them
    back piece by piece. Either way a group is read as the same row chunks with the same
    values, so the two give bit-identical rankings.
    """

    def __init__(
        self,
        columns: SourceColumns,
        dtype: torch.dtype,
        device: torch.device,
        spill: SpillFile | None = None,
    ) -> None:
        self.columns = columns
        self.n_feat = columns.n_features
        self.dtype, self.device = dtype, device
        self.spill = spill
        feats, n_layers, n_pos = columns.features, columns.n_layers, columns.n_pos
        counts = torch.bincount(feats.layer * n_pos + feats.pos, minlength=n_layers * n_pos)
        ends = counts.cumsum(0).reshape(n_layers, n_pos)
        self._feat_start = (ends - counts.reshape(n_layers, n_pos))[:, 0].tolist()
        self._feat_end = ends.tolist()  # [l'][p]: end of the features of (l', 0..p)
        self.groups: dict[tuple[int, int], _Group] = {}
        self.n_rows = 0
        self.stored_elements = 0
        self._ranges: dict[tuple[int, int], tuple[Tensor, Tensor, int]] = {}

    def _range_table(self, layer: int, pos: int) -> tuple[Tensor, Tensor, int]:
        """``(starts, lengths, n_feature_cols)`` of the causal column ranges of (layer, pos)."""
        key = (layer, pos)
        if key not in self._ranges:
            cols = self.columns
            ranges = [(self._feat_start[s], self._feat_end[s][pos]) for s in range(layer)]
            n_fc = sum(c1 - c0 for c0, c1 in ranges)
            ranges += [(cols.error_column(s), cols.error_column(s) + pos + 1) for s in range(layer)]
            ranges.append((cols.token_column, cols.token_column + pos + 1))
            ranges = [(c0, c1) for c0, c1 in ranges if c1 > c0]
            starts = torch.tensor([c0 for c0, _ in ranges], dtype=torch.long)
            lengths = torch.tensor([c1 - c0 for c0, c1 in ranges], dtype=torch.long)
            self._ranges[key] = (starts, lengths, n_fc)
        return self._ranges[key]

    def causal_columns(self, layer: int, pos: int) -> tuple[Tensor, int]:
        """The causal columns (ascending, on the device) of a row at (layer, pos) and how
        many of them are feature columns."""
        starts, lengths, n_fc = self._range_table(layer, pos)
        offsets = lengths.cumsum(0) - lengths
        total = int(lengths.sum())
        idx = torch.arange(total) + torch.repeat_interleave(starts - offsets, lengths)
        return idx.to(self.device), n_fc

    def n_causal(self, layer: int, pos: int) -> int:
        return int(self._range_table(layer, pos)[1].sum())

    @property
    def nbytes(self) -> int:
        """Bytes of stored values held in memory (0 when they are spilled)."""
        return 0 if self.spill is not None else self.stored_elements * self.dtype.itemsize

    def add(self, features: Tensor, dense: Tensor) -> None:
        """Store the rows ``dense`` ``[n, >= n_cols]`` of ``features`` (indices into the
        feature table), as the next ``n`` rows in visiting order. Raises ``ValueError``
        when a row has entries outside its causal columns (they would be dropped)."""
        table = self.columns.features
        features = features.cpu()
        layers, poss = table.layer[features], table.pos[features]
        keys = layers * self.columns.n_pos + poss
        total = row_totals(dense).sum()
        kept = dense.new_zeros(())
        for key in keys.unique().tolist():
            mine = (keys == key).nonzero(as_tuple=True)[0]
            layer, pos = divmod(int(key), self.columns.n_pos)
            cols, _ = self.causal_columns(layer, pos)
            # a few rows at a time: no [rows, n_cols] copy of the group's rows
            pieces = mine.to(dense.device).split(STORE_ROWS)
            parts = [dense[m].index_select(1, cols) for m in pieces]
            kept += sum(part.abs().sum() for part in parts)
            group = self.groups.setdefault((layer, pos), _Group())
            group.slots.append((mine + self.n_rows).to(self.device))
            if self.spill is None:
                block = parts[0] if len(parts) == 1 else torch.cat(parts)
                group.pieces.append(_Piece(len(mine), values=block))
            else:  # consecutive appends: one piece of the file
                offsets = [self.spill.append(part) for part in parts]
                group.pieces.append(_Piece(len(mine), offset=offsets[0]))
            self.stored_elements += len(mine) * len(cols)
        self.n_rows += len(features)
        if float(total - kept) > 1e-5 * float(total) + 1e-30:
            raise ValueError(
                f"feature rows {features.tolist()[:8]}... have edges from sources outside "
                f"their causal set (|dropped| = {float(total - kept):.3g} of {float(total):.3g})"
            )

    def items(self, chunk: int = ROW_CHUNK) -> Iterator[tuple[Tensor, Tensor, int, Tensor]]:
        """``(slots, causal columns, n_feature_cols, values)`` of every group, in pieces of
        at most ``chunk`` rows and :data:`READ_ELEMENTS` elements (bounding the temporaries
        a reader forms from them)."""
        for (layer, pos), group in self.groups.items():
            cols, n_fc = self.causal_columns(layer, pos)
            slots = torch.cat(group.slots)
            chunk = max(1, min(chunk, READ_ELEMENTS // max(len(cols), 1)))
            for start in range(0, len(slots), chunk):
                stop = min(start + chunk, len(slots))
                yield slots[start:stop], cols, n_fc, self._rows(group, start, stop, len(cols))

    def _rows(self, group: _Group, start: int, stop: int, width: int) -> Tensor:
        """Rows ``start .. stop`` of ``group`` ``[stop - start, width]``: a view of one
        in-memory piece, else the parts of the pieces they span, joined."""
        parts: list[Tensor] = []
        first = 0  # the group row where the current piece begins
        for piece in group.pieces:
            a, b = max(start, first), min(stop, first + piece.n_rows)
            if a < b:
                if piece.values is not None:
                    parts.append(piece.values[a - first : b - first])
                else:
                    assert self.spill is not None
                    offset = piece.offset + (a - first) * width * self.dtype.itemsize
                    parts.append(self.spill.read(offset, (b - a, width)).to(self.device))
            first += piece.n_rows
            if first >= stop:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def causal_sizes(columns: SourceColumns) -> Tensor:
    """``[n_features]``: the number of causal source columns of each active feature's row
    (features and errors of earlier layers and tokens, at positions up to its own)."""
    feats, n_layers, n_pos = columns.features, columns.n_layers, columns.n_pos
    counts = torch.bincount(feats.layer * n_pos + feats.pos, minlength=n_layers * n_pos)
    per_pos = counts.reshape(n_layers, n_pos).cumsum(1)  # [l', p]: features of (l', <= p)
    below = torch.cat([torch.zeros(1, n_pos, dtype=torch.long), per_pos.cumsum(0)])  # [l, p]
    layer, pos = feats.layer, feats.pos
    return below[layer, pos] + (layer + 1) * (pos + 1)


@dataclass
class Selection:
    """What a budgeted selection chose: ``chosen`` (feature indices in visiting order) and
    ``tied_at_cut``, how many of them were picked among features of exactly equal
    influence straddling a batch's cut (the feature with the lower index goes first; any
    of them would have been as right). Typically features of influence exactly 0 once the
    budget exceeds the features that reach a target."""

    chosen: Tensor
    tied_at_cut: int = 0


#: features whose stored-row entries the ranking's read also keeps, per batch taken: the
#: next batch is almost always among the top ones of the current influence (it only grows)
CANDIDATES_PER_TAKE = 4


def select_by_influence(
    store: CausalRows,
    target_rows: Tensor,
    budget: int,
    batch_size: int,
    target_list: list[Target],
    feature_rows: Callable[[Tensor], tuple[Tensor, Tensor]],
    progress: tqdm,
) -> Selection:
    """Compute feature rows (``feature_rows(indices)`` -> ``(indices in the order
    computed, rows [n, n_cols])``) in order of influence on the targets until ``budget``,
    storing them in ``store``.

    Before each batch, every feature's influence on the targets is recomputed from the rows
    known so far (``target_rows`` ``[n_tgt, n_cols]`` and the visited features';
    :class:`_Ranking`) and the top unvisited features are computed next
    (:func:`rank_unvisited`). Returns the visited feature indices in visiting order (the
    order of ``store``'s slots) and the tie count.
    """
    n_feat, device = store.n_feat, target_rows.device
    ranking = _Ranking(store, target_rows, target_list, budget)
    chosen = torch.zeros(0, dtype=torch.long, device=device)
    visited = torch.zeros(n_feat, dtype=torch.bool, device=device)
    tied = 0
    candidates = chosen
    while len(chosen) < budget:
        n_done = len(chosen)
        take = min(batch_size, budget - n_done)
        influence, kept = ranking.influence(chosen, candidates)
        order = rank_unvisited(influence, visited)  # one sort for the batch and candidates
        idx, n_tied = cut_ranking(order, influence, take)
        tied += n_tied
        visited[idx] = True
        # the next read keeps the entries of the likeliest next batch's columns
        candidates = order[take : take + CANDIDATES_PER_TAKE * batch_size]
        idx, dense = feature_rows(idx)  # in the order the passes computed them
        ranking.add_batch(chosen, idx, dense, kept)
        store.add(idx, dense)
        chosen = torch.cat([chosen, idx])
        progress.update(take)
    return Selection(chosen, tied)


class _Ranking:
    """The influence of every feature on the targets, from the rows computed so far.

    ``B`` is ``|row| / total`` (each row normalised by its total over all columns, as in
    pruning); influence ``= x_1 + sum_k y_k @ B_done`` with ``x_1 = w B_targets`` and
    ``y_1 = x_1[done]``, ``y_{k+1} = y_k @ B_done[:, done]``. The series runs on the
    visited-by-visited block ``square`` (``[budget, budget]``, slot order), kept up to date
    as batches arrive: a new row's entries from its dense row, an earlier row's entries in
    the new columns from what the previous read kept (``kept``: the entries of the
    candidates' columns) or, for a column that was not a candidate, from one more read of
    the stored rows. Then one read of the stored groups adds each group's weighted
    ``|values|`` into its feature columns (no dense row block is formed). The entries are
    the same numbers whichever way they arrive, so the ranking is the same.
    """

    def __init__(
        self, store: CausalRows, target_rows: Tensor, targets: list[Target], budget: int
    ) -> None:
        dtype, device = target_rows.dtype, target_rows.device
        self.store, self.n_feat = store, store.n_feat
        self.tiny = torch.finfo(dtype).tiny
        weights = normalized_target_weights(targets, dtype).to(device)
        totals = target_rows.abs().sum(1)[:, None].clamp_min(self.tiny)
        self.x_1 = weights @ (target_rows[:, : self.n_feat].abs() / totals)
        self.scale = torch.zeros(budget, dtype=dtype, device=device)  # 1 / row total
        self.square = torch.zeros(budget, budget, dtype=dtype, device=device)
        self.extra_reads = 0  # reads for columns that were not candidates

    def influence(self, done: Tensor, candidates: Tensor) -> tuple[Tensor, _Kept]:
        """``(influence [n_features], kept)``: ``kept`` holds the stored rows' scaled
        ``|entries|`` in the ``candidates``' columns, read on the way."""
        x = self.x_1.clone()
        n_done = len(done)
        kept = _Kept.of(candidates, n_done, self.n_feat, x)
        if n_done == 0:
            return x, kept
        square, scale = self.square[:n_done, :n_done], self.scale[:n_done]
        y = x[done]
        y_sum = torch.zeros_like(y)
        for _ in range(n_done):  # a DAG: the series ends after the longest path
            y_sum += y
            y = y @ square
            if not bool(y.any()):
                break
        weight = y_sum * scale
        for slots, cols, n_fc, values in self.store.items():
            if n_fc:
                x.index_add_(0, cols[:n_fc], weight[slots] @ values[:, :n_fc].abs())
                kept.take(slots, cols[:n_fc], values, scale)
        return x, kept

    def add_batch(self, done: Tensor, new: Tensor, dense: Tensor, kept: _Kept) -> None:
        """Extend ``square`` by the batch ``new`` (its rows ``dense`` ``[n, >= n_cols]``),
        visited after ``done``: the earlier rows' entries in the new columns, the new rows'
        entries in every visited column, and the new rows' scales."""
        n_done, n_new = len(done), len(new)
        stop = n_done + n_new
        self.scale[n_done:stop] = 1.0 / row_totals(dense).clamp_min(self.tiny)
        if n_done:
            found = kept.slot_of[new]  # where each new column is in kept, or -1
            have = (found >= 0).nonzero(as_tuple=True)[0]
            self.square[:n_done, n_done + have] = kept.values[:, found[have]]
            missing = (found < 0).nonzero(as_tuple=True)[0]
            if len(missing):
                self.extra_reads += 1
                again = _Kept.of(new[missing], n_done, self.n_feat, self.square)
                for slots, cols, n_fc, values in self.store.items():
                    again.take(slots, cols[:n_fc], values, self.scale[:n_done])
                self.square[:n_done, n_done + missing] = again.values
        every = torch.cat([done, new])
        self.square[n_done:stop, :stop] = dense[:, every].abs() * self.scale[n_done:stop, None]


@dataclass
class _Kept:
    """Scaled ``|entries|`` of the stored rows in some feature columns: ``values[slot,
    j]`` for the column ``columns[j]`` (``slot_of[feature]``: its ``j``, or -1)."""

    columns: Tensor
    slot_of: Tensor
    values: Tensor

    @classmethod
    def of(cls, columns: Tensor, n_rows: int, n_feat: int, like: Tensor) -> _Kept:
        slot_of = torch.full((n_feat,), -1, dtype=torch.long, device=like.device)
        slot_of[columns] = torch.arange(len(columns), device=like.device)
        return cls(columns, slot_of, like.new_zeros(n_rows, len(columns)))

    def take(self, slots: Tensor, feature_cols: Tensor, values: Tensor, scale: Tensor) -> None:
        """Keep the entries of the stored chunk ``values`` (rows ``slots``, its first
        columns ``feature_cols``) that fall in the kept columns."""
        at = self.slot_of[feature_cols]
        keep = (at >= 0).nonzero(as_tuple=True)[0]
        if len(keep):
            block = values[:, keep].abs() * scale[slots, None]
            self.values[slots[:, None], at[keep][None, :]] = block


def rank_unvisited(influence: Tensor, visited: Tensor) -> Tensor:
    """The unvisited features, most influential first (ties: lower index first)."""
    order = torch.sort(influence.masked_fill(visited, -1.0), descending=True, stable=True)
    return order.indices[: int((~visited).sum())]


def cut_ranking(order: Tensor, influence: Tensor, take: int) -> tuple[Tensor, int]:
    """The first ``take`` of ``order`` (:func:`rank_unvisited`) and how many of them tie
    exactly with the best one left out."""
    idx = order[:take]
    if take >= len(order):
        return idx, 0
    return idx, int((influence[idx] == influence[order[take]]).sum())


def top_unvisited(influence: Tensor, visited: Tensor, take: int) -> tuple[Tensor, int]:
    """The ``take`` unvisited features of highest influence (ties: lower index first) and
    how many of them tie exactly with an unvisited feature left out."""
    return cut_ranking(rank_unvisited(influence, visited), influence, take)
