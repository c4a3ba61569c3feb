"""G3: influence, pruning and graph scores (DESIGN.md §2), checked against hand arithmetic.

The hand-built graph (float64, so every fraction below is exact up to the last bit):

    index  node              edges into it (A[t, s])
    0      F0  (L0, pos 0)   T0: 1, T1: 1
    1      F1  (L0, pos 1)   T1: 2
    2      F2  (L1, pos 1)   F0: 2, F1: -1 (negative), E: 1
    3      F3  (L1, pos 0)   T0: 1
    4      F4  (L1, pos 0)   T0: 1            (read by nothing: zero influence)
    5      E   (error L0@1)  -
    6      T0  (token 0)     -
    7      T1  (token 1)     -
    8      L0  (target, w=3/4)  F2: 2, F0: 1, F3: 0.5, E: 0.5
    9      L1  (target, w=1/4)  F1: 1, T1: -1

Two-hop and three-hop paths: T0 -> F0 -> F2 -> L0, T1 -> F1 -> F2 -> L0.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph import AttributionGraph, NodeTable, Target
from tl_circuits.graph.nodes import ERROR, FEATURE, TARGET, TOKEN, empty_nodes
from tl_circuits.graph.pruning import (
    GraphScores,
    edge_influence,
    graph_scores,
    node_influence,
    normalized_abs,
    prune_graph,
    subgraph,
)

F0, F1, F2, F3, F4, E, T0, T1, L0, L1 = range(10)
NAMES = ["F0", "F1", "F2", "F3", "F4", "E", "T0", "T1", "L0", "L1"]


def make_graph(
    kinds: list[int],
    edges: dict[tuple[int, int], float],
    weights: list[float],
    dtype: torch.dtype = torch.float64,
) -> AttributionGraph:
    """An AttributionGraph built by hand: ``edges[(t, s)] = A[t, s]``."""
    n = len(kinds)
    kind = torch.tensor(kinds, dtype=torch.long)
    layer = torch.where(kind == TARGET, 2, torch.where(kind == TOKEN, -1, 0))
    pos = torch.zeros(n, dtype=torch.long)
    feature = torch.where(kind == FEATURE, torch.arange(n), -1)
    nodes = NodeTable(kind, layer, pos, feature, torch.ones(n, dtype=dtype))
    adjacency = torch.zeros(n, n, dtype=dtype)
    for (t, s), value in edges.items():
        adjacency[t, s] = value
    targets = [
        Target(kind="direction", label=f"target {i}", pos=0, vector=torch.zeros(4), weight=w)
        for i, w in enumerate(weights)
    ]
    return AttributionGraph(
        nodes=nodes,
        edges=adjacency,
        row_values=torch.zeros(n, dtype=dtype),
        constants=torch.zeros(n, dtype=dtype),
        targets=targets,
        tokens=torch.tensor([5, 7]),
        token_strings=["a", "b"],
        excluded=empty_nodes(),
        info={"model": "hand-built"},
    )


HAND_EDGES = {
    (F0, T0): 1.0, (F0, T1): 1.0,
    (F1, T1): 2.0,
    (F2, F0): 2.0, (F2, F1): -1.0, (F2, E): 1.0,
    (F3, T0): 1.0,
    (F4, T0): 1.0,
    (L0, F2): 2.0, (L0, F0): 1.0, (L0, F3): 0.5, (L0, E): 0.5,
    (L1, F1): 1.0, (L1, T1): -1.0,
}  # fmt: skip


def hand_graph(dtype: torch.dtype = torch.float64) -> AttributionGraph:
    kinds = [FEATURE] * 5 + [ERROR] + [TOKEN] * 2 + [TARGET] * 2
    return make_graph(kinds, HAND_EDGES, [0.75, 0.25], dtype)


def edge_set(graph: AttributionGraph) -> set[tuple[str, str]]:
    """Nonzero edges as (target name, source name), names from the original graph."""
    original = graph.info["pruned"]["kept_node_index"]
    t, s = graph.adjacency.nonzero(as_tuple=True)
    return {
        (NAMES[original[i]], NAMES[original[j]])
        for i, j in zip(t.tolist(), s.tolist(), strict=True)
    }


def kept_names(graph: AttributionGraph) -> list[str]:
    return [NAMES[i] for i in graph.info["pruned"]["kept_node_index"]]


# ---- G3 by hand ------------------------------------------------------------------------------


def test_normalized_abs_by_hand():
    b = normalized_abs(hand_graph().adjacency)
    # row F2: |2|, |-1|, |1| over 4 -> 1/2, 1/4, 1/4; row L0: 2, 1, .5, .5 over 4
    assert b[F2, F0] == 0.5 and b[F2, F1] == 0.25 and b[F2, E] == 0.25
    assert b[L0, F2] == 0.5 and b[L0, F0] == 0.25 and b[L0, F3] == 0.125 and b[L0, E] == 0.125
    assert b[L1, F1] == 0.5 and b[L1, T1] == 0.5  # the negative edge counts by |A|
    assert b[F0, T0] == 0.5 and b[F1, T1] == 1.0
    # rows without inputs stay zero; every other row sums to 1
    assert torch.equal(b[[E, T0, T1]], torch.zeros(3, 10, dtype=b.dtype))
    rows = [F0, F1, F2, F3, F4, L0, L1]
    torch.testing.assert_close(b[rows].sum(1), torch.ones(7, dtype=b.dtype))


# Node influence I = w B + w B^2 + w B^3 (w B^4 = 0), w = (L0: 3/4, L1: 1/4); in 32nds:
#   wB:    F2 = 3/4*1/2 = 12, F0 = 3/4*1/4 = 6, F3 = 3/4*1/8 = 3, E = 3/4*1/8 = 3,
#          F1 = 1/4*1/2 = 4, T1 = 1/4*1/2 = 4
#   wB^2:  F2 (12) -> F0 += 6, F1 += 3, E += 3;  F0 (6) -> T0 += 3, T1 += 3;
#          F3 (3) -> T0 += 3;  F1 (4) -> T1 += 4
#          = F0 6, F1 3, E 3, T0 6, T1 7
#   wB^3:  F0 (6) -> T0 3, T1 3;  F1 (3) -> T1 3  = T0 3, T1 6
#   I:     F0 12, F1 7, F2 12, F3 3, F4 0, E 6, T0 9, T1 17, L0 0, L1 0
#   (the roots E + T0 + T1 = 32/32 = 1: all weight ends at the inputs)
HAND_INFLUENCE = [12, 7, 12, 3, 0, 6, 9, 17, 0, 0]


def test_node_influence_by_hand():
    g = hand_graph()
    influence = node_influence(g.adjacency, g.indices("target"), g.target_weights())
    expected = torch.tensor(HAND_INFLUENCE, dtype=torch.float64) / 32
    torch.testing.assert_close(influence, expected, rtol=0, atol=1e-15)
    # the one-hop part alone would be wrong: the two- and three-hop paths matter
    b = normalized_abs(g.adjacency)
    w = torch.zeros(10, dtype=torch.float64)
    w[[L0, L1]] = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert not torch.allclose(w @ b, expected)
    # sequences of ints are accepted as target indices
    torch.testing.assert_close(
        node_influence(g.adjacency, [L0, L1], torch.tensor([0.75, 0.25], dtype=torch.float64)),
        expected,
    )


# Edge influence (I_t + w_t) B[t, s]; I + w in 32nds: F0 12, F1 7, F2 12, F3 3, F4 0, L0 24, L1 8
#   L0<-F2 24*1/2 = 12, L0<-F0 24*1/4 = 6, L0<-F3 24*1/8 = 3, L0<-E 3,
#   L1<-F1 8*1/2 = 4,   L1<-T1 4,
#   F2<-F0 12*1/2 = 6,  F2<-F1 12*1/4 = 3, F2<-E 3,
#   F0<-T0 12*1/2 = 6,  F0<-T1 6,  F1<-T1 7*1 = 7,  F3<-T0 3*1 = 3,  F4<-T0 0*1 = 0
#   total 66 = sum of (I_t + w_t) over rows with inputs (12+7+12+3+0+24+8)
HAND_EDGE_INFLUENCE = {
    (L0, F2): 12, (L0, F0): 6, (L0, F3): 3, (L0, E): 3,
    (L1, F1): 4, (L1, T1): 4,
    (F2, F0): 6, (F2, F1): 3, (F2, E): 3,
    (F0, T0): 6, (F0, T1): 6, (F1, T1): 7, (F3, T0): 3,
}  # fmt: skip


def test_edge_influence_by_hand():
    g = hand_graph()
    scores = edge_influence(g.adjacency, g.indices("target"), g.target_weights())
    expected = torch.zeros(10, 10, dtype=torch.float64)
    for (t, s), value in HAND_EDGE_INFLUENCE.items():
        expected[t, s] = value / 32
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-15)
    assert scores[F4, T0] == 0  # a real edge into a node that influences nothing


# Default pruning (0.8, 0.98).
# Node step: feature and error influences (32nds) F0 12, F2 12, F1 7, E 6, F3 3, F4 0;
#   total 40; cumulative 12, 24, 31, 37, 40 -> fractions .3, .6, .775, .925, 1: 0.8 first
#   reached by E, so F0, F2, F1, E are kept and F3 (and F4, zero influence) dropped.
# Edge step on the adjacency without F3, F4. New B rows:
#   L0: F2 2, F0 1, E .5 over 3.5 -> 4/7, 2/7, 1/7 (other rows unchanged)
#   influence, in 56ths (w B, w B^2, w B^3):
#     wB:   F2 3/4*4/7 = 24, F0 3/4*2/7 = 12, E 3/4*1/7 = 6, F1 1/8 = 7, T1 7
#     wB^2: F2 (24) -> F0 12, F1 6, E 6;  F0 (12) -> T0 6, T1 6;  F1 (7) -> T1 7
#     wB^3: F0 (12) -> T0 6, T1 6;  F1 (6) -> T1 6
#     I:    F0 24, F1 13, F2 24, E 12, T0 12, T1 32   (E + T0 + T1 = 56)
#   edge influence (I_t + w_t) B[t, s], I + w: F0 24, F1 13, F2 24, L0 42, L1 14:
#     L0<-F2 42*4/7 = 24, L0<-F0 42*2/7 = 12, L0<-E 42*1/7 = 6, L1<-F1 7, L1<-T1 7,
#     F2<-F0 12, F2<-F1 6, F2<-E 6, F0<-T0 12, F0<-T1 12, F1<-T1 13;  total 117
#   sorted 24, 13, 12, 12, 12, 12, 7, 7, 6, 6, 6; cumulative 24, 37, 49, 61, 73, 85, 92,
#   99, 105, 111, 117.
#   0.98 * 117 = 114.66 -> needs all 11 edges.
#   0.8 * 117 = 93.6 -> first reached at 99 (score 7): the three edges of 6 are dropped
#   (L0<-E, F2<-F1, F2<-E); E is then left with no outgoing edge and is dropped.
PRUNED_EDGES = {
    ("L0", "F2"), ("L0", "F0"), ("L1", "F1"), ("L1", "T1"),
    ("F2", "F0"), ("F0", "T0"), ("F0", "T1"), ("F1", "T1"),
}  # fmt: skip


def test_prune_defaults_by_hand():
    g = hand_graph()
    p = g.prune()
    assert kept_names(p) == ["F0", "F1", "F2", "E", "T0", "T1", "L0", "L1"]
    assert edge_set(p) == PRUNED_EDGES | {("L0", "E"), ("F2", "F1"), ("F2", "E")}
    assert p.info["pruned"]["node_threshold"] == 0.8
    assert p.info["pruned"]["edge_threshold"] == 0.98
    assert p.info["model"] == "hand-built"
    # kept edges keep their original (signed) values; the subset is consistent
    idx = torch.tensor(p.info["pruned"]["kept_node_index"])
    torch.testing.assert_close(p.adjacency, g.adjacency[idx][:, idx])
    assert p.nodes.kind.tolist() == g.nodes.kind[idx].tolist()
    assert p.n_nodes == 8 and len(p.targets) == 2
    assert p.row_values.shape == p.constants.shape == (8,)
    assert g.n_nodes == 10 and torch.equal(g.adjacency[F3], hand_graph().adjacency[F3])


def test_prune_edges_by_hand():
    g = hand_graph()
    p = prune_graph(g, node_threshold=0.8, edge_threshold=0.8)
    assert kept_names(p) == ["F0", "F1", "F2", "T0", "T1", "L0", "L1"]
    assert edge_set(p) == PRUNED_EDGES
    # new indices: F0 0, F1 1, F2 2, T0 3, T1 4, L0 5, L1 6
    assert p.adjacency[2, 0] == 2.0  # F2 <- F0 kept with its value
    assert p.adjacency[6, 4] == -1.0  # L1 <- T1: the negative edge survives with its sign
    # same result in float32
    p32 = prune_graph(hand_graph(torch.float32), node_threshold=0.8, edge_threshold=0.8)
    assert kept_names(p32) == kept_names(p) and edge_set(p32) == PRUNED_EDGES


def test_prune_drops_feature_left_without_outgoing_edge():
    # node_threshold=1 keeps F3 (positive influence). Edge influences on the full graph
    # (32nds): sorted 12, 7, 6, 6, 6, 6, 4, 4, 3, 3, 3, 3, 3 -> cumulative 12, 19, 25, 31,
    # 37, 43, 47, 51, ... of 66; 0.75 * 66 = 49.5 first reached at 51 (score 4): every edge
    # of 3 goes (L0<-F3, L0<-E, F2<-F1, F2<-E, F3<-T0). F3 and E then have no outgoing
    # edge and are dropped; F1 keeps L1<-F1.
    p = prune_graph(hand_graph(), node_threshold=1.0, edge_threshold=0.75)
    assert kept_names(p) == ["F0", "F1", "F2", "T0", "T1", "L0", "L1"]
    assert edge_set(p) == PRUNED_EDGES


def test_prune_strands_iteratively():
    # Fa(0) -> Fb(1) -> both targets; T(2) -> Fa and, strongly, -> both targets.
    #   B: L0, L1: Fb 1/4, T 3/4;  Fb: Fa 1;  Fa: T 1;  w = 1/2, 1/2
    #   I: Fb 1/4, Fa 1/4, T 3/4 + 1/4 = 1
    #   edges: L0<-T 3/8, L1<-T 3/8, Fb<-Fa 1/4, Fa<-T 1/4, L0<-Fb 1/8, L1<-Fb 1/8 (sum 3/2)
    #   cumulative 3/8, 6/8, 1, 5/4 -> 0.8 * 3/2 = 1.2 first reached at 5/4 (score 1/4):
    #   both Fb -> target edges go, so Fb is stranded, then Fa (its only edge fed Fb).
    kinds = [FEATURE, FEATURE, TOKEN, TARGET, TARGET]
    edges = {(3, 1): 1.0, (3, 2): 3.0, (4, 1): 1.0, (4, 2): 3.0, (1, 0): 1.0, (0, 2): 1.0}
    g = make_graph(kinds, edges, [0.5, 0.5])
    torch.testing.assert_close(
        node_influence(g.adjacency, [3, 4], g.target_weights()),
        torch.tensor([0.25, 0.25, 1.0, 0, 0], dtype=torch.float64),
    )
    p = prune_graph(g, node_threshold=1.0, edge_threshold=0.8)
    assert p.info["pruned"]["kept_node_index"] == [2, 3, 4]
    assert p.adjacency.tolist() == [[0, 0, 0], [3.0, 0, 0], [3.0, 0, 0]]


# Scores of the full graph (I in 32nds from HAND_INFLUENCE):
#   replacement = (T0 + T1) / (T0 + T1 + E) = (9 + 17) / (9 + 17 + 6) = 26/32 = 13/16
#   completeness: error share of each row's input: F2 1/4, L0 1/8, others 0;
#     I + w (32nds): F0 12, F1 7, F2 12, F3 3, F4 0, E 6, T0 9, T1 17, L0 24, L1 8 = 98
#     error part: F2 12 * 1/4 = 3, L0 24 * 1/8 = 3 -> completeness = (98 - 6)/98 = 46/49
def test_scores_by_hand():
    scores = hand_graph().scores()
    assert isinstance(scores, GraphScores)
    assert math.isclose(scores.replacement, 13 / 16, rel_tol=1e-12)
    assert math.isclose(scores.completeness, 46 / 49, rel_tol=1e-12)
    # float32 graphs give the same numbers to float32 precision
    s32 = graph_scores(hand_graph(torch.float32))
    assert math.isclose(s32.replacement, 13 / 16, rel_tol=1e-6)
    assert math.isclose(s32.completeness, 46 / 49, rel_tol=1e-6)


# Subgraph on F0, F2, E (+ tokens, + targets added automatically); nodes F0 F2 E T0 T1 L0 L1.
#   B rows: F0: T0 1/2, T1 1/2;  F2: F0 2/3, E 1/3;  L0: F2 4/7, F0 2/7, E 1/7;  L1: T1 1
#   wB:   F2 3/4*4/7 = 3/7, F0 3/4*2/7 = 3/14, E 3/4*1/7 = 3/28, T1 1/4
#   wB^2: F2 (3/7) -> F0 2/7, E 1/7;  F0 (3/14) -> T0 3/28, T1 3/28
#   wB^3: F0 (2/7) -> T0 1/7, T1 1/7
#   I: F0 3/14 + 2/7 = 1/2, F2 3/7, E 3/28 + 1/7 = 1/4, T0 3/28 + 1/7 = 1/4,
#      T1 1/4 + 3/28 + 1/7 = 1/2                      (E + T0 + T1 = 1)
#   replacement = (1/4 + 1/2) / 1 = 3/4
#   I + w: F0 1/2, F2 3/7, E 1/4, T0 1/4, T1 1/2, L0 3/4, L1 1/4; sum = 5/2 + 3/7 = 41/14
#   error part: F2 3/7 * 1/3 = 1/7, L0 3/4 * 1/7 = 3/28; total 1/4
#   completeness = 1 - (1/4) / (41/14) = 1 - 7/82 = 75/82
def test_subgraph_and_its_scores_by_hand():
    g = hand_graph()
    sub = subgraph(g, [F2, F0, E, T0, T1, F0])  # any order, repeats allowed
    assert sub.nodes.kind.tolist() == [FEATURE, FEATURE, ERROR, TOKEN, TOKEN, TARGET, TARGET]
    assert sub.nodes.feature.tolist() == [F0, F2, -1, -1, -1, -1, -1]
    idx = [F0, F2, E, T0, T1, L0, L1]
    torch.testing.assert_close(sub.adjacency, g.adjacency[idx][:, idx])
    assert len(sub.targets) == 2 and sub.tokens.tolist() == [5, 7]
    influence = node_influence(sub.adjacency, sub.indices("target"), sub.target_weights())
    expected = torch.tensor([1 / 2, 3 / 7, 1 / 4, 1 / 4, 1 / 2, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(influence, expected, rtol=0, atol=1e-15)
    scores = sub.scores()
    assert math.isclose(scores.replacement, 3 / 4, rel_tol=1e-12)
    assert math.isclose(scores.completeness, 75 / 82, rel_tol=1e-12)
    # a boolean mask selects the same nodes
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[F0, F2, E, T0, T1]] = True
    torch.testing.assert_close(subgraph(g, mask).adjacency, sub.adjacency)


def test_scores_of_pruned_and_featureless_subgraphs():
    g = hand_graph()
    # pruned graph of test_prune_edges_by_hand has no error node: everything is explained
    assert prune_graph(g, 0.8, 0.8).scores() == GraphScores(replacement=1.0, completeness=1.0)
    # E and the targets: L0's only remaining input is E (B = 1), L1 has none left
    #   I: E = 3/4, nothing from tokens -> replacement 0
    #   I + w: E 3/4, L0 3/4, L1 1/4; non-error share: E 1 (no inputs), L0 0, L1 1
    #   completeness = (3/4 * 1 + 3/4 * 0 + 1/4 * 1) / (7/4) = 4/7
    s = subgraph(g, [E]).scores()
    assert s.replacement == 0.0
    assert math.isclose(s.completeness, 4 / 7, rel_tol=1e-12)
    # neither tokens nor errors reach the targets: the replacement score is undefined
    s = subgraph(g, [F2]).scores()
    assert math.isnan(s.replacement) and s.completeness == 1.0


# ---- thresholds --------------------------------------------------------------------------


def test_full_thresholds_keep_everything_with_influence():
    g = hand_graph()
    p = prune_graph(g, node_threshold=1.0, edge_threshold=1.0)
    # only F4 (zero influence) goes; every other node and every edge stays
    assert kept_names(p) == [n for n in NAMES if n != "F4"]
    idx = torch.tensor(p.info["pruned"]["kept_node_index"])
    torch.testing.assert_close(p.adjacency, g.adjacency[idx][:, idx])
    assert int((p.adjacency != 0).sum()) == len(HAND_EDGES) - 1  # all but F4 <- T0


def test_smaller_thresholds_drop_the_weakest():
    g = hand_graph()
    # features and the error are ranked together: F0 12, F2 12, F1 7, E 6, F3 3 (/32), total
    # 40; cumulative fractions 12/40 = .3, 24/40 = .6, 31/40 = .775, 37/40 = .925
    assert kept_names(prune_graph(g, 0.9, 1.0))[:3] == ["F0", "F1", "F2"]
    assert "F3" not in kept_names(prune_graph(g, 0.9, 1.0))
    feats_07 = [n for n in kept_names(prune_graph(g, 0.7, 1.0)) if n.startswith("F")]
    assert feats_07 == ["F0", "F1", "F2"]  # 31/40 >= 0.7 > 24/40: F1 needed, E and F3 not
    assert "E" not in kept_names(prune_graph(g, 0.7, 1.0))
    feats_055 = [n for n in kept_names(prune_graph(g, 0.55, 1.0)) if n.startswith("F")]
    assert feats_055 == ["F0", "F2"]  # 24/40 >= 0.55: the two tied at 12; F1 dropped
    feats_025 = [n for n in kept_names(prune_graph(g, 0.25, 1.0)) if n.startswith("F")]
    assert feats_025 == ["F0", "F2"]  # 0.25 is reached by one of them; its tie is kept too
    # fewer edges as the edge threshold falls
    counts = [
        int((prune_graph(g, 1.0, t).adjacency != 0).sum()) for t in (1.0, 0.9, 0.75, 0.5, 0.2)
    ]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    # the strongest edge (L0 <- F2, 12/66) alone reaches 0.1
    p = prune_graph(g, 1.0, 0.1)
    assert edge_set(p) == {("L0", "F2")}
    assert kept_names(p) == ["F2", "T0", "T1", "L0", "L1"]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.8"])
def test_invalid_thresholds_raise(bad):
    g = hand_graph()
    with pytest.raises(TLCircuitsError, match="node_threshold"):
        prune_graph(g, node_threshold=bad)
    with pytest.raises(TLCircuitsError, match="edge_threshold"):
        g.prune(edge_threshold=bad)


def test_bad_graphs_raise():
    g = hand_graph()
    cyclic = g.adjacency.clone()
    cyclic[F0, F2] = 1.0  # F0 <- F2 <- F0
    with pytest.raises(TLCircuitsError, match="cycle"):
        node_influence(cyclic, [L0, L1], g.target_weights())
    nan = g.adjacency.clone()
    nan[F0, T0] = float("nan")
    with pytest.raises(TLCircuitsError, match="NaN"):
        g.with_adjacency(nan).scores()
    with pytest.raises(TLCircuitsError, match="no target"):
        prune_graph(make_graph([FEATURE, TOKEN], {(0, 1): 1.0}, []), node_threshold=0.5)
    with pytest.raises(TLCircuitsError, match="out of range"):
        subgraph(g, [10])


# ---- random DAGs: propagation equals the brute-force matrix power series ----------------------


def random_dag(gen: torch.Generator, n: int, density: float) -> torch.Tensor:
    """A random DAG adjacency with mixed signs, its nodes in a random (non-topological) order."""
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = a * (torch.rand(n, n, generator=gen, dtype=torch.float64) < density)
    a = torch.tril(a, diagonal=-1)  # t reads only from s < t
    perm = torch.randperm(n, generator=gen)
    return a[perm][:, perm]


def brute_force(adjacency: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    b = adjacency.abs()
    rows = b.sum(1, keepdim=True)
    b = torch.where(rows > 0, b / torch.where(rows > 0, rows, 1.0), 0.0)
    power = torch.eye(len(b), dtype=b.dtype)
    total = torch.zeros_like(b)
    for _ in range(len(b)):
        power = power @ b
        if not bool(power.any()):
            break
        total += power
    return w @ total


def test_node_influence_matches_matrix_power_series():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        density = [0.1, 0.3, 0.8][trial % 3]
        a = random_dag(gen, n, density)
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        index = torch.randperm(n, generator=gen)[:k]
        weights = torch.rand(k, generator=gen, dtype=torch.float64)
        w = torch.zeros(n, dtype=torch.float64)
        w[index] = weights
        expected = brute_force(a, w)
        influence = node_influence(a, index, weights)
        torch.testing.assert_close(influence, expected, rtol=1e-10, atol=1e-12)
        b = normalized_abs(a)
        torch.testing.assert_close(
            edge_influence(a, index, weights), (expected + w)[:, None] * b, rtol=1e-10, atol=1e-12
        )
    # a long chain: the series needs n - 1 powers
    n = 50
    chain = torch.diag(torch.full((n - 1,), -2.0, dtype=torch.float64), diagonal=1)
    influence = node_influence(chain, [0], torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(
        influence, torch.tensor([0.0] + [1.0] * (n - 1), dtype=torch.float64)
    )


def test_prune_random_dag_graph_keeps_kinds_and_targets():
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        n_feat, n_err, n_tok, n_tgt = 12, 3, 4, 2
        n = n_feat + n_err + n_tok + n_tgt
        kinds = [FEATURE] * n_feat + [ERROR] * n_err + [TOKEN] * n_tok + [TARGET] * n_tgt
        a = torch.zeros(n, n, dtype=torch.float64)
        # features read features earlier in a random order, errors and tokens; targets read all
        order = torch.randperm(n_feat, generator=gen).tolist()
        for i, f in enumerate(order):
            for s in order[:i] + list(range(n_feat, n_feat + n_err + n_tok)):
                if torch.rand(1, generator=gen) < 0.4:
                    a[f, s] = float(torch.randn(1, generator=gen))
        a[n - n_tgt :, : n - n_tgt] = torch.randn(n_tgt, n - n_tgt, generator=gen)
        edges = {(int(t), int(s)): float(a[t, s]) for t, s in a.nonzero()}
        g = make_graph(kinds, edges, [0.6, 0.4])
        p = g.prune(0.8, 0.9)
        kept = p.info["pruned"]["kept_node_index"]
        assert kept == sorted(kept)
        assert p.nodes.kind.tolist() == sorted(p.nodes.kind.tolist())  # kinds contiguous
        assert p.nodes.count("target") == n_tgt and p.nodes.count("token") == n_tok
        # every kept feature/error has a kept outgoing edge
        out_degree = (p.adjacency != 0).sum(0)
        stranded = (p.nodes.kind <= ERROR) & (out_degree == 0)
        assert not bool(stranded.any())
        scores = p.scores()
        assert 0.0 <= scores.completeness <= 1.0 + 1e-12
        assert 0.0 <= scores.replacement <= 1.0 + 1e-12 or math.isnan(scores.replacement)


def test_speed_on_a_large_graph():
    # 2000 nodes, depth 30: influence is ~30 vector-matrix products (well under a second);
    # summing dense matrix powers (~30 n^3 products) would take far longer
    gen = torch.Generator().manual_seed(2)
    n, depth = 2000, 30
    level = torch.randint(0, depth, (n,), generator=gen)
    a = torch.randn(n, n, generator=gen) * (torch.rand(n, n, generator=gen) < 0.05)
    a = a * (level[:, None] > level[None, :])
    start = time.perf_counter()
    influence = node_influence(a, torch.arange(5), torch.full((5,), 0.2))
    assert time.perf_counter() - start < 10.0
    assert bool((influence >= 0).all())
