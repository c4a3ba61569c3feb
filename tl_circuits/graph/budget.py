"""A feature budget: which features a budgeted build computes rows for (DESIGN.md §2).

With ``max_feature_nodes`` set, the build does not compute every active feature's row: it
computes the targets' rows, then repeatedly ranks the unvisited features by their influence
on the targets as far as the rows known so far tell (the same normalised ``|A|`` series as
pruning, :mod:`~tl_circuits.graph.pruning`) and computes the next batch of the most
influential ones, until the budget is spent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.graph.nodes import Target, normalized_target_weights


def select_by_influence(
    rows: Tensor,
    n_tgt: int,
    n_feat: int,
    budget: int,
    batch_size: int,
    target_list: list[Target],
    feature_rows: Callable[[Tensor], Tensor],
    progress: tqdm,
) -> Tensor:
    """Compute feature rows (``feature_rows(indices)`` -> ``[n, n_cols]``) in order of
    influence on the targets until ``budget``.

    Before each batch, every feature's influence on the targets is recomputed from the rows
    known so far (targets and visited features) and the top unvisited features are
    computed next. ``rows[:n_tgt]`` hold the target rows; visited features' rows are
    appended in visiting order. Returns the visited feature indices in that order.
    """
    weights = normalized_target_weights(target_list, rows.dtype).to(rows.device)
    totals = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    totals[:n_tgt] = rows[:n_tgt].abs().sum(1)
    chosen = torch.zeros(0, dtype=torch.long, device=rows.device)
    visited = torch.zeros(n_feat, dtype=torch.bool, device=rows.device)
    while len(chosen) < budget:
        n_done = len(chosen)
        influence = influence_from_rows(rows, totals, n_tgt, chosen, n_feat, weights)
        influence[visited] = -1.0
        take = min(batch_size, budget - n_done)
        idx = torch.argsort(influence, descending=True)[:take]
        visited[idx] = True
        new = slice(n_tgt + n_done, n_tgt + n_done + take)
        rows[new] = feature_rows(idx)
        totals[new] = rows[new].abs().sum(1)
        chosen = torch.cat([chosen, idx])
        progress.update(take)
    return chosen


def influence_from_rows(
    rows: Tensor,
    totals: Tensor,
    n_tgt: int,
    done: Tensor,
    n_feat: int,
    weights: Tensor,
    chunk: int = 128,
) -> Tensor:
    """Influence on the targets of every feature, from the rows computed so far.

    ``B`` is ``|row| / totals`` (each row normalised by its total over all columns, as in
    pruning); influence ``= x_1 + sum_k y_k @ B_done`` with ``x_1 = w B_targets`` and
    ``y_1 = x_1[done]``, ``y_{k+1} = y_k @ B_done[:, done]``: the series runs on the small
    visited-by-visited block, and the visited rows' feature columns are read once, in
    chunks, so no copy of the row block is made.
    """
    tiny = torch.finfo(rows.dtype).tiny
    x = weights @ (rows[:n_tgt, :n_feat].abs() / totals[:n_tgt, None].clamp_min(tiny))
    n_done = len(done)
    if n_done == 0:
        return x
    scale = 1.0 / totals[n_tgt : n_tgt + n_done].clamp_min(tiny)
    square = rows[n_tgt : n_tgt + n_done].index_select(1, done).abs() * scale[:, None]
    y = x[done]
    y_sum = torch.zeros_like(y)
    for _ in range(n_done):  # a DAG: the series ends after the longest path
        y_sum += y
        y = y @ square
        if not bool(y.any()):
            break
    weight = y_sum * scale
    for start in range(0, n_done, chunk):
        block = rows[n_tgt + start : n_tgt + min(start + chunk, n_done), :n_feat].abs()
        x = x + weight[start : start + chunk] @ block
    return x
