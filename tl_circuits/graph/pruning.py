"""Influence, pruning and graph scores (DESIGN.md §2, invariant G3; methods paper).

Definitions (``A = graph.adjacency``, rows are targets, columns sources):

- ``B = normalized_abs(A)``: ``|A|`` with each row divided by its sum, so ``B[t, s]`` is the
  fraction of node ``t``'s (absolute) input that comes directly from ``s``. Rows with no
  input (error, token and target-free rows) stay 0.
- node influence ``I = w @ (B + B^2 + B^3 + ...)``, with ``w`` zero except the target
  weights on the target nodes: the share of the (weighted) targets' input that reaches
  them from each node along paths of every length.
- edge influence ``E[t, s] = (I[t] + w[t]) * B[t, s]``: the share that flows through the
  edge ``s -> t``.

How the series is summed: an attribution graph is a DAG, so ``B`` is nilpotent and the
series is finite. :func:`node_influence` propagates ``x_1 = w @ B``, ``x_{k+1} = x_k @ B``
and sums the ``x_k`` until ``x_k`` is exactly zero. On a DAG ``x_k`` holds the
contributions of paths of length ``k``; once no such path exists every term of every
entry is a product with an exact 0, so the loop stops exactly after (longest path + 1)
vector-matrix products -- a few dozen for a transformer, each ``O(n_nodes^2)``, and no
``n_nodes x n_nodes`` product or inverse is formed. The result is the exact series (up to
floating-point rounding of the sums). If ``x_k`` is still nonzero after ``n_nodes`` steps
the adjacency has a cycle and a :class:`~tl_circuits.errors.TLCircuitsError` is raised.

Cumulative-threshold rule (nodes and edges alike): sort the positive scores in descending
order and find the smallest prefix whose sum reaches ``threshold`` times the total (within
floating-point rounding); keep every item scoring at least the last score of that prefix
(ties with it are kept, so the result does not depend on sort order). Items with zero
score are never kept, so a threshold of 1.0 keeps exactly the items with nonzero score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Real

import torch
from torch import Tensor

from tl_circuits.errors import NonFiniteError, TLCircuitsError
from tl_circuits.graph.causal_adjacency import RowGroup, dense_submatrix, row_groups
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import ERROR, FEATURE, TARGET
from tl_circuits.typing import Float, Int, typechecked

__all__ = [
    "GraphScores",
    "edge_influence",
    "graph_scores",
    "node_influence",
    "normalized_abs",
    "prune_graph",
    "subgraph",
]


# ---- influence ----------------------------------------------------------------------------


@typechecked
def normalized_abs(adjacency: Float[Tensor, "n_nodes n_nodes"]) -> Float[Tensor, "n_nodes n_nodes"]:
    """``|A|`` with each row divided by its sum; rows summing to 0 stay 0.

    Each row is first scaled by its largest entry, so rows of huge values do not overflow.
    """
    return _normalize_rows(adjacency)


def _normalize_rows(values: Tensor) -> Tensor:
    """:func:`normalized_abs` of a block holding every nonzero entry of its rows."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError("the adjacency matrix has NaN or infinite entries")
    b = values.abs()
    row_max = b.amax(dim=1, keepdim=True) if b.shape[1] else b.sum(dim=1, keepdim=True)
    nonzero = row_max > 0
    b = b / torch.where(nonzero, row_max, torch.ones_like(row_max))
    row_sum = b.sum(dim=1, keepdim=True)
    return b / torch.where(nonzero, row_sum, torch.ones_like(row_sum))


def _weight_vector(
    n_nodes: int, target_index: Tensor | Sequence[int], target_weights: Tensor, like: Tensor
) -> Tensor:
    index = torch.as_tensor(target_index, dtype=torch.long, device=like.device).reshape(-1)
    weights = target_weights.to(device=like.device, dtype=like.dtype).reshape(-1)
    if index.shape != weights.shape:
        raise TLCircuitsError(
            f"{index.numel()} target indices but {weights.numel()} target weights"
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_nodes):
        raise TLCircuitsError(f"target index out of range for a graph of {n_nodes} nodes")
    if index.unique().numel() != index.numel():
        raise TLCircuitsError("target indices repeat")
    if not bool(torch.isfinite(weights).all()):
        raise NonFiniteError("the target weights have NaN or infinite entries")
    w = torch.zeros(n_nodes, dtype=like.dtype, device=like.device)
    w[index] = weights
    return w


def _normalized(groups: list[RowGroup]) -> list[RowGroup]:
    """``B`` (:func:`normalized_abs`) group by group: a group holds all of its rows' edges."""
    return [RowGroup(g.rows, g.cols, _normalize_rows(g.values)) for g in groups]


def _times(x: Tensor, b: list[RowGroup]) -> Tensor:
    """``x @ B`` for ``B`` held as row groups."""
    out = torch.zeros_like(x)
    for g in b:
        out.index_add_(0, g.cols, x[g.rows] @ g.values)
    return out


def _propagate(b: list[RowGroup], w: Tensor) -> Tensor:
    """``w @ (B + B^2 + ...)`` for a nilpotent ``B`` (a DAG, held as row groups), see the
    module docstring."""
    n = w.shape[0]
    x = _times(w, b)
    total = x.clone()
    for _ in range(n):
        if not bool(x.any()):
            return total
        x = _times(x, b)
        total += x
    raise TLCircuitsError(
        "the adjacency matrix has a cycle (influence did not vanish after n_nodes steps); "
        "an attribution graph must be acyclic"
    )


@typechecked
def node_influence(
    adjacency: Float[Tensor, "n_nodes n_nodes"],
    target_index: Int[Tensor, " n_targets"] | Sequence[int],
    target_weights: Float[Tensor, " n_targets"],
) -> Float[Tensor, " n_nodes"]:
    """Influence of every node on the weighted targets: ``w @ (B + B^2 + ...)``.

    ``B = normalized_abs(adjacency)``; ``w`` is zero except ``target_weights`` at
    ``target_index``. Exact for a DAG (finite propagation, see the module docstring); raises
    :class:`~tl_circuits.errors.TLCircuitsError` on a cycle.
    """
    b = _normalized(row_groups(adjacency))
    w = _weight_vector(adjacency.shape[0], target_index, target_weights, adjacency)
    return _propagate(b, w)


@typechecked
def edge_influence(
    adjacency: Float[Tensor, "n_nodes n_nodes"],
    target_index: Int[Tensor, " n_targets"] | Sequence[int],
    target_weights: Float[Tensor, " n_targets"],
) -> Float[Tensor, "n_nodes n_nodes"]:
    """Influence of every edge: ``E[t, s] = (I[t] + w[t]) * B[t, s]`` (rows are targets).

    ``I`` is :func:`node_influence`, ``w`` the target-weight vector over nodes.
    """
    b = _normalized(row_groups(adjacency))
    w = _weight_vector(adjacency.shape[0], target_index, target_weights, adjacency)
    return (_propagate(b, w) + w)[:, None] * b[0].values


# ---- subgraphs and pruning ----------------------------------------------------------------


def _as_index(graph: AttributionGraph, node_index: Tensor | Sequence[int]) -> Tensor:
    n = graph.n_nodes
    index = torch.as_tensor(node_index)
    if index.dtype == torch.bool:
        if index.shape != (n,):
            raise TLCircuitsError(
                f"a boolean node mask must have shape ({n},), got {tuple(index.shape)}"
            )
        index = index.nonzero(as_tuple=True)[0]
    if index.numel() == 0:
        index = index.reshape(0).long()
    if index.dtype.is_floating_point or index.dtype.is_complex:
        raise TLCircuitsError(f"node indices must be integers, got {index.dtype}")
    index = index.reshape(-1).long().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise TLCircuitsError(f"node index out of range for a graph of {n} nodes")
    return index


def subgraph(graph: AttributionGraph, node_index: Tensor | Sequence[int]) -> AttributionGraph:
    """The graph restricted to the nodes ``node_index`` (plus every target node).

    ``node_index`` is a sequence/tensor of node indices (repeats allowed) or a boolean mask
    over nodes. Kept nodes stay in their original order (so kinds stay contiguous); the
    adjacency is the kept submatrix, ``row_values``/``constants`` are subset, ``targets``,
    the prompt, ``excluded``, ``info`` (copied) and ``context`` are carried over. Edges to
    and from dropped nodes disappear, so ``adjacency.sum(1) + constants == row_values`` (G1)
    no longer holds on rows that lost inputs.
    """
    index = _as_index(graph, node_index)
    keep = torch.zeros(graph.n_nodes, dtype=torch.bool)
    keep[index] = True
    keep |= graph.nodes.kind.cpu() == TARGET
    kept = keep.nonzero(as_tuple=True)[0]
    return replace(
        graph,
        nodes=graph.nodes.select(kept.to(graph.nodes.kind.device)),
        edges=dense_submatrix(row_groups(graph.edges), graph.n_nodes, kept),
        row_values=graph.row_values[kept.to(graph.row_values.device)],
        constants=graph.constants[kept.to(graph.constants.device)],
        targets=list(graph.targets),
        token_strings=list(graph.token_strings),
        info=dict(graph.info),
    )


def _check_threshold(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TLCircuitsError(f"{name} must be a number in (0, 1], got {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise TLCircuitsError(f"{name} must be in (0, 1], got {value!r}")
    return value


def _cumulative_mask(scores: Tensor, threshold: float) -> Tensor:
    """Mask of the items kept by the cumulative-threshold rule (module docstring)."""
    cutoff = _cumulative_cutoff(scores[scores > 0], threshold)
    return (scores > 0) & (scores.double() >= cutoff)


def _cumulative_cutoff(positive: Tensor, threshold: float) -> float:
    """The smallest score kept by the cumulative rule among the ``positive`` scores (every
    positive one with ``threshold`` 1; ``inf`` when there is none)."""
    if positive.numel() == 0:
        return math.inf
    if threshold >= 1.0:
        return 0.0
    values = torch.sort(positive.double(), descending=True).values
    cumulative = torch.cumsum(values, dim=0)
    # "reaching" the threshold up to rounding of the (graph-dtype) scores
    rtol = 16 * torch.finfo(positive.dtype).eps
    goal = threshold * float(cumulative[-1]) * (1.0 - rtol)
    k = int(torch.searchsorted(cumulative, torch.tensor([goal], dtype=cumulative.dtype)).item())
    return float(values[min(k, values.numel() - 1)])


def _target_weights(graph: AttributionGraph) -> tuple[Tensor, Tensor]:
    target_index = graph.indices("target")
    if target_index.numel() == 0:
        raise TLCircuitsError("the graph has no target nodes")
    if len(graph.targets) != target_index.numel():
        raise TLCircuitsError(
            f"the graph has {target_index.numel()} target nodes but {len(graph.targets)} "
            "Target records"
        )
    weights = graph.target_weights()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise TLCircuitsError("target weights must be non-negative with a positive sum")
    dev = graph.row_values.device
    return target_index.to(dev), weights.to(dev)


def prune_graph(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> AttributionGraph:
    """Keep the nodes and edges that carry most of the influence on the targets (G3).

    Steps (``w`` = the targets' weights, :meth:`AttributionGraph.target_weights`):

    1. Node influence on the full graph (:func:`node_influence`). **Feature and error**
       nodes are ranked together (as circuit-tracer does) and kept by the cumulative rule
       (module docstring) to ``node_threshold`` of their total influence; those with zero
       influence are always dropped. **Token** and **target** nodes are not subject to the
       node threshold.
    2. The adjacency restricted to the surviving nodes (rows/columns of dropped features
       zeroed); ``B``, node and edge influences are recomputed on it, and edges are kept by
       the cumulative rule to ``edge_threshold`` of the total edge influence (edges of zero
       influence are always dropped).
    3. Repeatedly, until nothing changes: a **feature or error** node none of whose kept
       outgoing edges reaches a kept node is dropped, and its edges with it (dropping a
       node can strand the nodes that fed only it). Features are not required to keep an
       incoming edge.
    4. **Target** nodes are always kept; **token** nodes are always kept, even with no
       kept edge (they show the prompt).

    Returns a new graph on the kept nodes (via :func:`subgraph`) whose adjacency is the
    kept submatrix with pruned edges set to 0; ``info["pruned"]`` records the thresholds
    and ``kept_node_index`` (indices into ``graph``'s nodes).
    """
    node_threshold = _check_threshold("node_threshold", node_threshold)
    edge_threshold = _check_threshold("edge_threshold", edge_threshold)
    target_index, weights = _target_weights(graph)
    # the edges as row groups: a full build's causal blocks are never made dense here
    groups = row_groups(graph.edges)
    n = graph.n_nodes
    dev = graph.row_values.device
    kind = graph.nodes.kind.to(dev)
    can_strand = (kind == FEATURE) | (kind == ERROR)
    w = _weight_vector(n, target_index, weights, graph.row_values)

    # 1. node threshold over features and errors
    influence = _propagate(_normalized(groups), w)
    node_mask = torch.ones(n, dtype=torch.bool, device=dev)
    node_mask[can_strand] = _cumulative_mask(influence[can_strand], node_threshold)

    # 2. edge threshold, influences recomputed on the node-pruned adjacency
    def both(g: RowGroup) -> Tensor:
        return node_mask[g.rows][:, None] & node_mask[g.cols][None, :]

    b = _normalized([RowGroup(g.rows, g.cols, torch.where(both(g), g.values, 0)) for g in groups])
    reach = _propagate(b, w) + w
    scores = [reach[g.rows][:, None] * g.values for g in b]
    del b
    cutoff = _cumulative_cutoff(torch.cat([s[s > 0] for s in scores]), edge_threshold)
    edge_masks = [(s > 0) & (s.double() >= cutoff) & both(g) for s, g in zip(scores, groups)]
    del scores

    # 3. drop features and errors left without an outgoing edge to a kept node
    while True:
        has_out = torch.zeros(n, dtype=torch.bool, device=dev)
        for g, m in zip(groups, edge_masks):
            has_out[g.cols] |= m.any(dim=0)  # column s: some kept edge s -> t
        stranded = node_mask & can_strand & ~has_out
        if not bool(stranded.any()):
            break
        node_mask &= ~stranded
        for g, m in zip(groups, edge_masks):
            m &= both(g)

    kept = node_mask.nonzero(as_tuple=True)[0]
    out = subgraph(graph, kept.cpu())
    out = replace(out, edges=dense_submatrix(groups, n, kept, edge_masks))
    out.info["pruned"] = {
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "kept_node_index": [int(i) for i in kept.tolist()],
    }
    return out


# ---- scores -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphScores:
    """Replacement and completeness scores of a graph (methods paper).

    - ``replacement``: of the end-to-end influence on the targets that starts at a token or
      error node, the fraction that starts at a token node (NaN if neither reaches them).
    - ``completeness``: the influence-weighted average over nodes of the fraction of each
      node's normalised input that comes from non-error nodes.
    """

    replacement: float
    completeness: float


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """Replacement and completeness scores, as defined in the methods paper / circuit-tracer.

    With ``B = normalized_abs(adjacency)``, ``I`` the node influence and ``w`` the target
    weights over nodes:

    - ``replacement = sum_{tokens} I / (sum_{tokens} I + sum_{errors} I)``
    - ``completeness = sum_t (1 - sum_{s error} B[t, s]) (I_t + w_t) / sum_t (I_t + w_t)``,
      summed over all nodes ``t``; nodes without inputs (tokens, errors, and in a subgraph
      any node whose inputs were dropped) have no error input and count as complete.

    Works for any graph (full, pruned, or a :func:`subgraph`): the scores are those of the
    graph as given, so in a subgraph the inputs of dropped nodes simply vanish (they are
    not counted as error).
    """
    target_index, weights = _target_weights(graph)
    b = _normalized(row_groups(graph.edges))
    w = _weight_vector(graph.n_nodes, target_index, weights, graph.row_values)
    influence = _propagate(b, w)
    dev = w.device
    errors = graph.indices("error").to(dev)
    tokens = graph.indices("token").to(dev)
    token_influence = float(influence[tokens].double().sum())
    error_influence = float(influence[errors].double().sum())
    denominator = token_influence + error_influence
    replacement = token_influence / denominator if denominator > 0 else float("nan")
    is_error = torch.zeros(graph.n_nodes, dtype=torch.bool, device=dev)
    is_error[errors] = True
    error_input = torch.zeros(graph.n_nodes, dtype=torch.float64, device=dev)
    for g in b:  # each row's normalised input from error nodes
        error_input[g.rows] += g.values[:, is_error[g.cols]].double().sum(dim=1)
    non_error = 1.0 - error_input
    reach = (influence + w).double()
    completeness = float((non_error * reach).sum() / reach.sum())
    return GraphScores(replacement=replacement, completeness=completeness)
