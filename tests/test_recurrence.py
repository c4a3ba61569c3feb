"""What recurs across graphs: counts and means worked out by hand, the head-share rule on
hand-set loadings, and ``recurrence(DIR)`` reading a results folder (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.batch.recurrence import GraphSummary, recurrence, recurrence_of, summarize
from tl_circuits.batch.sources import ModelSource, load_source
from tl_circuits.batch.trace import save_trace, strongest_head_loadings
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.graph import AttributionGraph

pd = pytest.importorskip("pandas", reason="the distributed extra is not installed")
pytest.importorskip("pyarrow", reason="the distributed extra is not installed")


def three_summaries() -> dict[str, GraphSummary]:
    return {
        "g1": GraphSummary(
            features={(0, 1): 0.5, (1, 2): 0.25},
            heads={(1, 1): [(0.8, 1.0)], (0, 2): [(0.3, 1.0)]},
        ),
        "g2": GraphSummary(
            features={(0, 1): 0.3, (0, 5): 0.1},
            heads={(1, 1): [(0.5, 1.0), (-0.4, -2.0)]},
        ),
        "g3": GraphSummary(features={(0, 1): 0.1, (1, 2): 0.05}, heads={}),
    }


def test_counts_and_means_by_hand() -> None:
    rec = recurrence_of(three_summaries())
    assert rec.n_graphs == 3
    f = rec.features
    assert list(zip(f["layer"], f["feature"])) == [(0, 1), (1, 2), (0, 5)]
    assert f["n_graphs"].tolist() == [3, 2, 1]
    assert f["fraction"].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert f["mean_influence"].tolist() == pytest.approx([0.3, 0.15, 0.1])
    assert [list(p) for p in f["prompts"]] == [["g1", "g2", "g3"], ["g1", "g3"], ["g2"]]
    h = rec.heads
    assert list(zip(h["layer"], h["head"])) == [(1, 1), (0, 2)]
    assert h["n_graphs"].tolist() == [2, 1]
    assert h["n_edges"].tolist() == [3, 1]
    # L1H1: loadings 0.8, 0.5, -0.4 on edges 1, 1, -2: mean 0.3; shares 0.8, 0.5, 0.2
    assert h["mean_loading"].tolist() == pytest.approx([0.3, 0.3])
    assert h["mean_share"].tolist() == pytest.approx([0.5, 0.3])
    assert [list(p) for p in h["prompts"]] == [["g1", "g2"], ["g1"]]


@pytest.fixture(scope="module")
def induction():
    from tl_circuits.default import DEFAULT_PROMPTS

    model, tcs = load_source(ModelSource())
    graph = AttributionGraph.build(
        model, tcs, DEFAULT_PROMPTS["induction"].text, show_progress=False
    )
    return model, tcs, graph, graph.prune()


def test_head_share_rule_on_hand_set_loadings(induction) -> None:
    """A head carries a cross-position edge when the edge crosses its layer and
    |loading| >= min_head_share * |edge|; same-position edges never count."""
    *_, pruned = induction
    pos = pruned.nodes.pos
    nz = pruned.adjacency.nonzero().tolist()
    cross = next((t, s) for t, s in nz if int(pos[t]) != int(pos[s]))
    same = next((t, s) for t, s in nz if int(pos[t]) == int(pos[s]))
    n_layers, n_heads = 2, 4
    loadings = torch.zeros(2, n_layers, n_heads)
    loadings[0, 1, 0], loadings[0, 1, 1], loadings[0, 1, 2] = 1.0, 0.375, -0.625  # edge 2
    loadings[0, 0, 3] = 5.0  # layer 0 is not crossed: never counted
    loadings[1, 1, 0] = 9.0  # the same-position edge: never counted
    hl = HeadLoadings(
        edges=torch.tensor([cross, same]),
        edge_values=torch.tensor([2.0, 1.0]),
        loadings=loadings,
        bypass=torch.zeros(2, n_layers),
        crossed=torch.tensor([[False, True], [True, True]]),
    )
    summary = summarize(pruned, hl, min_head_share=0.25)
    assert summary.heads == {(1, 0): [(1.0, 2.0)], (1, 2): [(-0.625, 2.0)]}
    assert summarize(pruned, hl, min_head_share=0.1).heads.keys() == {(1, 0), (1, 1), (1, 2)}
    features = pruned.indices("feature").tolist()
    keys = {(int(pruned.nodes.layer[i]), int(pruned.nodes.feature[i])) for i in features}
    assert summary.features.keys() == keys
    assert summarize(pruned, None).heads == {}


def test_recurrence_reads_a_results_folder(induction, tmp_path: Path) -> None:
    """Three traces written as trace_many writes them (one listed as failed): the same
    tables as the summaries of the graphs in memory."""
    from tl_circuits.batch.results import COLUMNS, RESULTS_FILE, write_parquet
    from tl_circuits.default import DEFAULT_PROMPTS

    model, tcs, *_ = induction
    summaries, rows = {}, []
    for name, p in DEFAULT_PROMPTS.items():
        graph = AttributionGraph.build(model, tcs, p.text, show_progress=False)
        pruned = graph.prune()
        loadings = strongest_head_loadings(pruned, 100)
        save_trace(tmp_path / "graphs" / name, graph, pruned, loadings, write_json=False)
        summaries[name] = summarize(pruned, loadings)
        rows.append({**dict.fromkeys(COLUMNS), "id": name, "status": "complete"})
    rows.append({**dict.fromkeys(COLUMNS), "id": "bad", "status": "failed"})
    write_parquet(pd.DataFrame(rows, columns=list(COLUMNS)), tmp_path / RESULTS_FILE)
    rec, expected = recurrence(tmp_path), recurrence_of(summaries)
    assert rec.n_graphs == 3
    pd.testing.assert_frame_equal(rec.features, expected.features)
    pd.testing.assert_frame_equal(rec.heads, expected.heads)
    written = rec.save(tmp_path, top=5)
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    # the table is data: an id that is not a safe folder name is refused, never joined
    rows[0]["id"] = "../graphs/fact"
    write_parquet(pd.DataFrame(rows, columns=list(COLUMNS)), tmp_path / RESULTS_FILE)
    with pytest.raises(TLCircuitsError, match="bad id"):
        recurrence(tmp_path)
