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

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.graph.nodes import Target, normalized_target_weights
from tl_circuits.replacement.sources import SourceColumns

#: rows of a stored group read at once (bounds the ``[rows, n_causal]`` temporaries)
ROW_CHUNK = 128


class CausalRows:
    """Visited feature rows, each stored over its causal columns only.

    Rows are grouped by (layer ``l``, position ``p``); a group holds ``slots`` (the rows'
    visiting order) and ``values`` ``[rows, n_causal]`` over the group's causal columns in
    column order: for each layer ``l' < l`` the features of ``(l', 0..p)`` (one contiguous
    column range, as features are sorted by (layer, pos, feature)), then for each layer
    ``l' < l`` its errors at ``0..p``, then the tokens ``0..p``. The first
    :meth:`n_feature_cols` of them are feature columns.
    """

    def __init__(self, columns: SourceColumns, dtype: torch.dtype, device: torch.device) -> None:
        self.columns = columns
        self.n_feat = columns.n_features
        self.dtype, self.device = dtype, device
        feats, n_layers, n_pos = columns.features, columns.n_layers, columns.n_pos
        counts = torch.bincount(feats.layer * n_pos + feats.pos, minlength=n_layers * n_pos)
        ends = counts.cumsum(0).reshape(n_layers, n_pos)
        self._feat_start = (ends - counts.reshape(n_layers, n_pos))[:, 0].tolist()
        self._feat_end = ends.tolist()  # [l'][p]: end of the features of (l', 0..p)
        self.groups: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.n_rows = 0
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
    def stored_elements(self) -> int:
        return sum(v.numel() for _, v in self.groups.values())

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for _, v in self.groups.values())

    def add(self, features: Tensor, dense: Tensor) -> None:
        """Store the rows ``dense`` ``[n, >= n_cols]`` of ``features`` (indices into the
        feature table), as the next ``n`` rows in visiting order. Raises ``ValueError``
        when a row has entries outside its causal columns (they would be dropped)."""
        table = self.columns.features
        features = features.cpu()
        layers, poss = table.layer[features], table.pos[features]
        keys = layers * self.columns.n_pos + poss
        total = dense.abs().sum()
        kept = dense.new_zeros(())
        for key in keys.unique().tolist():
            mine = (keys == key).nonzero(as_tuple=True)[0]
            layer, pos = divmod(int(key), self.columns.n_pos)
            cols, _ = self.causal_columns(layer, pos)
            block = dense.index_select(0, mine.to(dense.device)).index_select(1, cols)
            kept += block.abs().sum()
            slots = (mine + self.n_rows).to(self.device)
            if (layer, pos) in self.groups:
                old_slots, old = self.groups[(layer, pos)]
                slots, block = torch.cat([old_slots, slots]), torch.cat([old, block])
            self.groups[(layer, pos)] = (slots, block)
        self.n_rows += len(features)
        if float(total - kept) > 1e-5 * float(total) + 1e-30:
            raise ValueError(
                f"feature rows {features.tolist()[:8]}... have edges from sources outside "
                f"their causal set (|dropped| = {float(total - kept):.3g} of {float(total):.3g})"
            )

    def items(self, chunk: int = ROW_CHUNK) -> Iterator[tuple[Tensor, Tensor, int, Tensor]]:
        """``(slots, causal columns, n_feature_cols, values)`` of every group, in pieces of
        at most ``chunk`` rows (bounding the temporaries a reader forms from them)."""
        for (layer, pos), (slots, values) in self.groups.items():
            cols, n_fc = self.causal_columns(layer, pos)
            for start in range(0, len(slots), chunk):
                yield slots[start : start + chunk], cols, n_fc, values[start : start + chunk]


def causal_sizes(columns: SourceColumns) -> Tensor:
    """``[n_features]``: the number of causal source columns of each active feature's row
    (features and errors of earlier layers and tokens, at positions up to its own)."""
    feats, n_layers, n_pos = columns.features, columns.n_layers, columns.n_pos
    counts = torch.bincount(feats.layer * n_pos + feats.pos, minlength=n_layers * n_pos)
    per_pos = counts.reshape(n_layers, n_pos).cumsum(1)  # [l', p]: features of (l', <= p)
    below = torch.cat([torch.zeros(1, n_pos, dtype=torch.long), per_pos.cumsum(0)])  # [l, p]
    layer, pos = feats.layer, feats.pos
    return below[layer, pos] + (layer + 1) * (pos + 1)


def select_by_influence(
    store: CausalRows,
    target_rows: Tensor,
    budget: int,
    batch_size: int,
    target_list: list[Target],
    feature_rows: Callable[[Tensor], Tensor],
    progress: tqdm,
) -> Tensor:
    """Compute feature rows (``feature_rows(indices)`` -> ``[n, n_cols]``) in order of
    influence on the targets until ``budget``, storing them in ``store``.

    Before each batch, every feature's influence on the targets is recomputed from the rows
    known so far (``target_rows`` ``[n_tgt, n_cols]`` and the visited features') and the
    top unvisited features are computed next. Returns the visited feature indices in
    visiting order (the order of ``store``'s slots).
    """
    n_feat, dtype, device = store.n_feat, target_rows.dtype, target_rows.device
    weights = normalized_target_weights(target_list, dtype).to(device)
    target_totals = target_rows.abs().sum(1)
    totals = torch.zeros(budget, dtype=dtype, device=device)
    chosen = torch.zeros(0, dtype=torch.long, device=device)
    visited = torch.zeros(n_feat, dtype=torch.bool, device=device)
    while len(chosen) < budget:
        n_done = len(chosen)
        influence = influence_from_rows(
            store, target_rows, target_totals, totals[:n_done], chosen, weights
        )
        influence[visited] = -1.0
        take = min(batch_size, budget - n_done)
        idx = torch.argsort(influence, descending=True)[:take]
        visited[idx] = True
        dense = feature_rows(idx)
        totals[n_done : n_done + take] = dense.abs().sum(1)
        store.add(idx, dense)
        chosen = torch.cat([chosen, idx])
        progress.update(take)
    return chosen


def influence_from_rows(
    store: CausalRows,
    target_rows: Tensor,
    target_totals: Tensor,
    totals: Tensor,
    done: Tensor,
    weights: Tensor,
) -> Tensor:
    """Influence on the targets of every feature, from the rows computed so far.

    ``B`` is ``|row| / totals`` (each row normalised by its total over all columns, as in
    pruning); influence ``= x_1 + sum_k y_k @ B_done`` with ``x_1 = w B_targets`` and
    ``y_1 = x_1[done]``, ``y_{k+1} = y_k @ B_done[:, done]``: the series runs on the small
    visited-by-visited block, read off the stored causal groups, and each group adds its
    rows' weighted ``|values|`` into its feature columns (no dense row block is formed).
    ``totals[i]`` is visited row ``i``'s total (visiting order, ``done``).
    """
    n_feat = store.n_feat
    tiny = torch.finfo(target_rows.dtype).tiny
    x = weights @ (target_rows[:, :n_feat].abs() / target_totals[:, None].clamp_min(tiny))
    n_done = len(done)
    if n_done == 0:
        return x
    scale = 1.0 / totals.clamp_min(tiny)
    slot_of = torch.full((n_feat,), -1, dtype=torch.long, device=x.device)
    slot_of[done] = torch.arange(n_done, device=x.device)
    square = x.new_zeros(n_done, n_done)
    groups = list(store.items())
    for slots, cols, n_fc, values in groups:
        col_slot = slot_of[cols[:n_fc]]
        keep = (col_slot >= 0).nonzero(as_tuple=True)[0]
        if len(keep):
            block = values[:, keep].abs() * scale[slots, None]
            square[slots[:, None], col_slot[keep][None, :]] = block
    y = x[done]
    y_sum = torch.zeros_like(y)
    for _ in range(n_done):  # a DAG: the series ends after the longest path
        y_sum += y
        y = y @ square
        if not bool(y.any()):
            break
    weight = y_sum * scale
    for slots, cols, n_fc, values in groups:
        if n_fc:
            x.index_add_(0, cols[:n_fc], weight[slots] @ values[:, :n_fc].abs())
    return x
