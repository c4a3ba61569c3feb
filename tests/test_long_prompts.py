"""Long prompts (issue 16): budgeted rows spilled to disk, passes split by reach, and the
graph's causal storage.

- With ``spill_dir`` the visited rows live in a scratch file: the graph is bit for bit the
  in-memory one (nodes, edges, values) on several families, PLT and CLT; the scratch folder
  is gone after the build, after an error and after ``KeyboardInterrupt``; folders left by
  dead processes are removed; a bad or too small spill directory is refused.
- ``split_by_reach`` covers each row once in contiguous runs, never costs more than one
  pass; rows computed by split passes equal rows computed one at a time.
- The memory refusal offers ``spill_dir`` when that would fit; the estimate with a spill
  leaves the stored rows out.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph import build as build_mod
from tl_circuits.graph.build import PASS_OVERHEAD_ROWS, split_by_reach
from tl_circuits.graph.causal_adjacency import CausalAdjacency
from tl_circuits.storage import SpillFile
from tl_circuits.testing import random_clt, random_model, random_transcoders

CASES = [("gpt2", "relu"), ("llama", "jumprelu_skip"), ("gemma2", "jumprelu"), ("llama", "clt")]


def _setup(family: str, kind: str):
    model = random_model(family, n_layers=3, d_model=32)
    tcs = random_clt(model) if kind == "clt" else random_transcoders(model, kind)
    return model, tcs


def _prompt(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(5))


def _build(model, tcs, budget: int | None = 20, **kw) -> AttributionGraph:
    kw.setdefault("batch_size", 7)
    return AttributionGraph.build(
        model, tcs, _prompt(), max_feature_nodes=budget, show_progress=False, **kw
    )


def _spills(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".tl_circuits-spill")]


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_spilled_build_is_bit_identical_and_cleaned_up(
    family: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tcs = _setup(family, kind)
    written: list[int] = []
    real_append = SpillFile.append

    def append(self, values):
        written.append(values.numel())
        return real_append(self, values)

    monkeypatch.setattr(SpillFile, "append", append)
    for budget in (8, 20, 50):
        in_memory = _build(model, tcs, budget)
        written.clear()
        spilled = _build(model, tcs, budget, spill_dir=tmp_path)
        assert sum(written) > 0  # the rows really went through the file
        assert _spills(tmp_path) == []
        assert isinstance(spilled.edges, CausalAdjacency)
        for name in ("kind", "layer", "pos", "feature", "activation"):
            assert torch.equal(getattr(spilled.nodes, name), getattr(in_memory.nodes, name))
        assert torch.equal(spilled.adjacency, in_memory.adjacency)
        assert torch.equal(spilled.row_values, in_memory.row_values)
        assert torch.equal(spilled.constants, in_memory.constants)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_spill_folder_removed_on_error_and_interrupt(
    error: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tcs = _setup("gpt2", "relu")
    real = build_mod._RowPasses.feature_rows
    seen: list[list[str]] = []

    def failing(self, rows):
        seen.append(_spills(tmp_path))  # the scratch folder exists while rows arrive
        if len(seen) == 2:
            raise error
        return real(self, rows)

    monkeypatch.setattr(build_mod._RowPasses, "feature_rows", failing)
    with pytest.raises(type(error)):
        _build(model, tcs, 20, spill_dir=tmp_path)
    assert len(seen) == 2 and len(seen[0]) == 1
    assert _spills(tmp_path) == [] and os.listdir(tmp_path) == []


def test_dead_processes_spill_folders_are_removed(tmp_path: Path) -> None:
    model, tcs = _setup("gpt2", "relu")
    live = SpillFile(tmp_path, torch.float32)  # this process's: kept
    host = live.directory.name.split(".")[2]
    dead_pid = 2**22 + 12345  # above pid_max: no such process
    dead = tmp_path / f".tl_circuits-spill.{host}.{dead_pid}.abc123"
    dead.mkdir()
    (dead / "rows.bin").write_bytes(b"\0" * 64)
    other = tmp_path / "mine.txt"
    other.write_text("not a spill")
    _build(model, tcs, 8, spill_dir=tmp_path)
    assert not dead.exists()
    assert live.directory.exists() and other.exists()
    live.close()
    assert not live.directory.exists()


def test_spill_file_round_trip_and_truncation(tmp_path: Path) -> None:
    with SpillFile(tmp_path, torch.float32) as spill:
        a, b = torch.randn(3, 5), torch.randn(2, 7)
        oa, ob = spill.append(a), spill.append(b)
        assert torch.equal(spill.read(ob, (2, 7)), b) and torch.equal(spill.read(oa, (3, 5)), a)
        assert torch.equal(spill.read(oa + 5 * 4, (2, 5)), a[1:])
        os.truncate(spill.directory / "rows.bin", ob + 4)
        with pytest.raises(TLCircuitsError, match="ended early"):
            spill.read(ob, (2, 7))
        folder = spill.directory
        assert stat_mode(folder) == 0o700
    assert not folder.exists()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_bad_spill_directories_are_refused(tmp_path: Path, monkeypatch) -> None:
    model, tcs = _setup("gpt2", "relu")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in (tmp_path / "missing", a_file):
        with pytest.raises(TLCircuitsError, match=r"spill_dir .* is not a directory"):
            _build(model, tcs, 20, spill_dir=bad)

    class Usage:
        free = 1000

    monkeypatch.setattr(build_mod.shutil, "disk_usage", lambda path: Usage())
    too_small = r"may need up to .* in spill_dir .* \(1,000 bytes\) free"
    with pytest.raises(TLCircuitsError, match=too_small):
        _build(model, tcs, 20, spill_dir=tmp_path)
    # a full graph stores no visited rows: the spill directory is not used nor checked
    full = _build(model, tcs, None, spill_dir=tmp_path)
    assert _spills(tmp_path) == [] and full.nodes.count("feature") > 0


def test_memory_refusal_offers_the_spill_and_the_estimate_leaves_rows_out(tmp_path: Path) -> None:
    model, tcs = _setup("llama", "jumprelu_skip")
    ctx = build_mod.ReplacementContext(model, tcs, _prompt())
    targets = build_mod.resolve_targets(ctx, None, pos=-1, desired_probability=0.95, max_logits=10)
    plan = build_mod._Plan.of(ctx, targets, 50)
    in_memory = build_mod._estimate(plan, plan.budget, 7, True, False)
    spilled = build_mod._estimate(plan, plan.budget, 7, True, True)
    rows = (plan.worst_stored(plan.budget) - plan.n_targets * plan.n_cols) * 4
    assert in_memory - spilled == rows > 0
    limit = (in_memory + spilled) // 2
    with pytest.raises(TLCircuitsError, match=r"pass spill_dir=DIR to keep the visited rows"):
        _build(model, tcs, 50, batch_size=7, memory_limit_bytes=limit)
    graph = _build(model, tcs, 50, batch_size=7, memory_limit_bytes=limit, spill_dir=tmp_path)
    assert graph.nodes.count("feature") == 50


def _cost(layers, poss, runs, order, n_layers, n_pos) -> int:
    total = 0
    for start, stop in runs:
        run = order[start:stop]
        total += len(run) * int(layers[run].max() + 1) * int(poss[run].max() + 1)
        total += PASS_OVERHEAD_ROWS * n_layers * n_pos
    return total


@pytest.mark.parametrize("seed", range(5))
def test_split_by_reach_covers_each_row_once_and_never_costs_more(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_layers, n_pos, n = 12, 300, int(torch.randint(1, 200, (1,), generator=g))
    layers = torch.randint(0, n_layers, (n,), generator=g)
    poss = torch.randint(0, n_pos, (n,), generator=g)
    if seed == 0:  # the shape budgets produce: many early rows, many at the last position
        poss[: n // 2] = 0
        poss[n // 2 :] = n_pos - 1
    order, runs = split_by_reach(layers, poss, n_layers, n_pos)
    assert sorted(order.tolist()) == list(range(n))
    assert runs[0][0] == 0 and runs[-1][1] == n
    assert all(a < b for a, b in runs)
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(runs))
    one = [(0, n)]
    assert _cost(layers, poss, runs, order, n_layers, n_pos) <= _cost(
        layers, poss, one, order, n_layers, n_pos
    )
    if seed == 0:
        assert len(runs) >= 2


@pytest.mark.parametrize(("family", "kind"), [("gpt2", "relu"), ("llama", "clt")])
def test_split_passes_give_the_rows_of_single_passes(family: str, kind: str) -> None:
    model, tcs = _setup(family, kind)
    ctx = build_mod.ReplacementContext(model, tcs, _prompt())
    targets = build_mod.resolve_targets(ctx, None, pos=-1, desired_probability=0.95, max_logits=10)
    plan = build_mod._Plan.of(ctx, targets, 40)
    passes = build_mod._RowPasses(plan, 64)
    feats = plan.columns.features
    # rows from both ends of the prompt and of the layers, in a scrambled order
    early = ((feats.pos == 0) & (feats.layer == 0)).nonzero()[:, 0][:5]
    late = (feats.pos == int(feats.pos.max())).nonzero()[:, 0][-20:]
    rows = torch.cat([late[:10], early, late[10:]])
    assert len(split_by_reach(feats.layer[rows], feats.pos[rows], ctx.n_layers, ctx.n_pos)[1]) > 1
    got_rows, got = passes.feature_rows(rows)
    got = got.clone()
    assert sorted(got_rows.tolist()) == sorted(rows.tolist())
    for i, r in enumerate(got_rows.tolist()):
        _, one = passes.feature_rows(torch.tensor([r]))
        torch.testing.assert_close(got[i], one[0], rtol=1e-5, atol=1e-7)


def test_spill_names_match_the_documented_pattern(tmp_path: Path) -> None:
    with SpillFile(tmp_path, torch.float32) as spill:
        name = spill.directory.name
        assert re.fullmatch(rf"\.tl_circuits-spill\.[0-9a-f]{{8}}\.{os.getpid()}\..+", name)
    assert shutil.disk_usage(tmp_path).free > 0


def test_top_unvisited_breaks_ties_by_index_and_counts_them() -> None:
    from tl_circuits.graph.budget import top_unvisited

    influence = torch.tensor([3.0, 1.0, 5.0, 1.0, 1.0, 0.0])
    visited = torch.tensor([False, False, True, False, False, False])
    idx, tied = top_unvisited(influence, visited, 2)
    assert idx.tolist() == [0, 1] and tied == 1  # 1 picked among the three 1.0s
    idx, tied = top_unvisited(influence, visited, 4)
    assert idx.tolist() == [0, 1, 3, 4] and tied == 0  # the cut falls between 1.0 and 0.0
    idx, tied = top_unvisited(influence, visited, 5)
    assert sorted(idx.tolist()) == [0, 1, 3, 4, 5] and tied == 0  # everything left: no cut


def test_selection_ties_are_recorded_when_the_budget_reaches_zero_influence() -> None:
    model, tcs = _setup("gpt2", "relu")
    graph = _build(model, tcs, 20)
    n_active = graph.info["n_active_features"]
    near_all = _build(model, tcs, n_active - 3)
    assert graph.info["selection_ties"] == 0
    # features that reach no target (influence exactly 0) fill the end of the budget
    assert near_all.info["selection_ties"] > 0
    again = _build(model, tcs, n_active - 3)
    assert torch.equal(again.nodes.feature, near_all.nodes.feature)  # deterministic


@pytest.mark.parametrize("n_pos", [300, 513, 700, 1030])
def test_blocked_causal_pattern_product_equals_the_full_one(n_pos: int) -> None:
    from tl_circuits.replacement.frozen import causal_mix_

    g = torch.Generator().manual_seed(n_pos)
    pattern = torch.rand(3, n_pos, n_pos, generator=g).tril()  # [heads, q, k], causal
    pattern /= pattern.sum(-1, keepdim=True)
    gz = torch.randn(3, n_pos, 10, generator=g)
    out = torch.full((3, n_pos, 10), float("nan"))
    causal_mix_(pattern.transpose(1, 2), gz, out)
    torch.testing.assert_close(out, torch.bmm(pattern.transpose(1, 2), gz), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "kind"), [("gpt2", "relu"), ("llama", "clt")])
def test_ranking_with_or_without_kept_candidates_is_the_same(
    family: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The visited-by-visited block gets an earlier row's entries in a new column either
    from the previous read (the column was a candidate) or from one more read of the stored
    rows: the same numbers, so the same graph, bit for bit."""
    from tl_circuits.graph import budget

    model, tcs = _setup(family, kind)
    extra: list[int] = []
    real_add = budget._Ranking.add_batch

    def add_batch(self, *args):
        real_add(self, *args)
        extra.append(self.extra_reads)

    monkeypatch.setattr(budget._Ranking, "add_batch", add_batch)
    with_candidates = _build(model, tcs, 40)
    reads_with = extra[-1]
    monkeypatch.setattr(budget, "CANDIDATES_PER_TAKE", 0)  # no candidates: always read again
    extra.clear()
    without = _build(model, tcs, 40)
    assert extra[-1] == len(extra) - 1 > reads_with  # every batch after the first read again
    assert torch.equal(with_candidates.nodes.feature, without.nodes.feature)
    assert torch.equal(with_candidates.adjacency, without.adjacency)
