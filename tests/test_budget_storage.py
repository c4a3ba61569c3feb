"""A budgeted build stores each visited feature row over its causal columns only
(:class:`~tl_circuits.graph.budget.CausalRows`): the same selected features and edges as
the former dense storage (kept here as the reference), the unbudgeted graph's edges on the
same nodes, and a memory estimate that bounds what is stored."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.graph import AttributionGraph
from tl_circuits.graph import build as build_mod
from tl_circuits.graph.budget import CausalRows
from tl_circuits.graph.nodes import Target, normalized_target_weights
from tl_circuits.testing import random_clt, random_model, random_transcoders

# ---- the reference: the dense [n_tgt + budget, n_cols] storage it replaces ---------------


def _ref_select_by_influence(
    rows: Tensor,
    n_tgt: int,
    n_feat: int,
    budget: int,
    batch_size: int,
    target_list: list[Target],
    feature_rows: Callable[[Tensor], Tensor],
    progress: tqdm,
) -> Tensor:
    weights = normalized_target_weights(target_list, rows.dtype).to(rows.device)
    totals = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    totals[:n_tgt] = rows[:n_tgt].abs().sum(1)
    chosen = torch.zeros(0, dtype=torch.long, device=rows.device)
    visited = torch.zeros(n_feat, dtype=torch.bool, device=rows.device)
    while len(chosen) < budget:
        n_done = len(chosen)
        influence = _ref_influence_from_rows(rows, totals, n_tgt, chosen, n_feat, weights)
        influence[visited] = -1.0
        take = min(batch_size, budget - n_done)
        idx = torch.sort(influence, descending=True, stable=True).indices[:take]
        visited[idx] = True
        new = slice(n_tgt + n_done, n_tgt + n_done + take)
        rows[new] = feature_rows(idx)
        totals[new] = rows[new].abs().sum(1)
        chosen = torch.cat([chosen, idx])
        progress.update(take)
    return chosen


def _ref_influence_from_rows(
    rows: Tensor,
    totals: Tensor,
    n_tgt: int,
    done: Tensor,
    n_feat: int,
    weights: Tensor,
    chunk: int = 128,
) -> Tensor:
    tiny = torch.finfo(rows.dtype).tiny
    x = weights @ (rows[:n_tgt, :n_feat].abs() / totals[:n_tgt, None].clamp_min(tiny))
    n_done = len(done)
    if n_done == 0:
        return x
    scale = 1.0 / totals[n_tgt : n_tgt + n_done].clamp_min(tiny)
    square = rows[n_tgt : n_tgt + n_done].index_select(1, done).abs() * scale[:, None]
    y = x[done]
    y_sum = torch.zeros_like(y)
    for _ in range(n_done):
        y_sum += y
        y = y @ square
        if not bool(y.any()):
            break
    weight = y_sum * scale
    for start in range(0, n_done, chunk):
        block = rows[n_tgt + start : n_tgt + min(start + chunk, n_done), :n_feat].abs()
        x = x + weight[start : start + chunk] @ block
    return x


def _one_pass_rows(passes) -> Callable[[Tensor], Tensor]:
    """The former ``feature_rows``: one reverse pass over the batch, rows in the given
    order (no split by reach)."""

    def rows(idx: Tensor) -> Tensor:
        passes._feature_pass(idx, 0)
        return passes.sink.rows(len(idx))

    return rows


def _reference_budgeted_build(
    plan, passes, batch_size: int, progress, spill_dir=None
) -> tuple[Tensor, Tensor, int]:
    """The former ``_budgeted_rows``: every visited row over every column, each batch one
    reverse pass."""
    ctx, n_tgt, n_cols = plan.ctx, plan.n_targets, plan.n_cols
    n_feat, budget = plan.columns.n_features, plan.budget
    dtype, device = ctx.compute_dtype, ctx.embeddings.device
    rows = torch.zeros(n_tgt + budget, n_cols, dtype=dtype, device=device)
    rows[:n_tgt] = passes.target_rows(plan.targets)
    progress.update(n_tgt)
    chosen = _ref_select_by_influence(
        rows, n_tgt, n_feat, budget, batch_size, plan.targets, _one_pass_rows(passes), progress
    )
    selected, perm = torch.sort(chosen)
    keep_cols = torch.cat([selected, torch.arange(n_feat, n_cols)])
    n_nodes = len(keep_cols)
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=dtype, device=device)
    kept = rows.index_select(1, keep_cols)
    del rows
    adjacency[:budget] = kept[n_tgt + perm]
    adjacency[n_nodes - n_tgt :] = kept[:n_tgt]
    return adjacency, selected, 0


# ---- cases ---------------------------------------------------------------------------------

CASES = [
    ("gpt2", "relu"),
    ("llama", "jumprelu_skip"),
    ("gemma2", "jumprelu"),
    ("pythia", "topk"),
    ("gpt2", "clt"),
    ("llama", "clt"),
]
BUDGETS = (8, 20, 50)


def _model_and_dictionary(family: str, kind: str):
    model = random_model(family, n_layers=3, d_model=32)
    tcs = random_clt(model) if kind == "clt" else random_transcoders(model, kind)
    return model, tcs


def _prompt(n: int = 12) -> Tensor:
    return torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(5))


def _build(model, tcs, budget: int | None, batch_size: int = 16) -> AttributionGraph:
    return AttributionGraph.build(
        model,
        tcs,
        _prompt(),
        max_feature_nodes=budget,
        batch_size=batch_size,
        show_progress=False,
    )


def _keys(graph: AttributionGraph) -> list[tuple[int, int, int, int]]:
    n = graph.nodes
    return [
        (int(k), int(la), int(p), int(f)) for k, la, p, f in zip(n.kind, n.layer, n.pos, n.feature)
    ]


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_causal_storage_matches_dense_reference_and_full_graph(
    family: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tcs = _model_and_dictionary(family, kind)
    full = _build(model, tcs, None)
    full_index = {k: i for i, k in enumerate(_keys(full))}
    full_adj = full.adjacency
    for budget in BUDGETS:
        for batch_size in (7, 16):
            new = _build(model, tcs, budget, batch_size)
            with monkeypatch.context() as m:
                m.setattr(build_mod, "_budgeted_rows", _reference_budgeted_build)
                ref = _build(model, tcs, budget, batch_size)
            assert _keys(new) == _keys(ref)
            assert torch.equal(new.nodes.feature, ref.nodes.feature)
            # passes split by reach: the same rows to rounding (1e-5 relative)
            torch.testing.assert_close(new.adjacency, ref.adjacency, rtol=1e-5, atol=1e-7)
            assert torch.equal(new.adjacency != 0, ref.adjacency != 0)
            idx = torch.tensor([full_index[k] for k in _keys(new)])
            torch.testing.assert_close(new.adjacency, full_adj[idx][:, idx], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "kind"), [("gpt2", "relu"), ("llama", "clt")])
def test_estimate_bounds_stored_bytes(
    family: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tcs = _model_and_dictionary(family, kind)
    stored: list[int] = []
    estimated: list[int] = []
    real_add, real_check = CausalRows.add, build_mod._check_memory

    def add(self, features, dense):
        real_add(self, features, dense)
        stored.append(self.nbytes)

    def check(plan, batch_size, limit, max_feature_nodes, spill_dir=None):
        worst = plan.worst_stored(plan.budget)
        estimated.append(worst * plan.ctx.compute_dtype.itemsize)
        need, lim = real_check(plan, batch_size, limit, max_feature_nodes, spill_dir)
        assert need >= estimated[-1]
        return need, lim

    monkeypatch.setattr(CausalRows, "add", add)
    monkeypatch.setattr(build_mod, "_check_memory", check)
    for budget in BUDGETS:
        stored.clear()
        graph = _build(model, tcs, budget)
        n_tgt = len(graph.targets)
        n_cols = graph.nodes.count("feature") + len(graph.excluded)
        n_cols += graph.nodes.count("error") + graph.nodes.count("token") + n_tgt
        target_bytes = n_tgt * n_cols * 4
        assert stored and estimated[-1] >= stored[-1] + target_bytes
        # a dense store would need the full width for every row
        assert stored[-1] < budget * n_cols * 4
