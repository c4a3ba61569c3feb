"""What recurs across the graphs of a batch: features and heads, counted over prompts.

For each prompt traced to completion, from its pruned graph and the head loadings of that
graph's strongest edges (:func:`summarize`):

- a **feature** ``(layer, feature)`` *appears* in a graph when it is a node of the pruned
  graph (at any position); its **influence** there is its node influence on the targets
  within the pruned graph (``node_influence`` of the pruned adjacency, DESIGN.md G3),
  summed over its positions;
- a **head** ``(layer, head)`` *carries* a cross-position edge ``s -> t`` (source and target
  at different positions, among the edges with head loadings) when the edge crosses its
  layer and ``|loading| >= min_head_share * |A[t, s]|`` (default 0.25); it *appears* in a
  graph when it carries at least one of its cross-position edges.

:func:`recurrence` then counts, per feature and per head, the graphs it appears in and
their prompts, and averages: a feature's influence over those graphs; a head's loading
(signed, in the edge's units) and its share ``loading / A[t, s]`` over the edges it
carries.

What this shows and what it does not: a count says that the *same dictionary feature* or
the *same head* is part of many prompts' pruned circuits. It does not show that they play
the same role in each (a feature may be an input in one graph and near the output in
another), that the circuits are the same (the edges between recurring nodes are not
compared), nor that the feature or head is needed (influence is attribution, not an
intervention); counts depend on the pruning thresholds and on how alike the prompts are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.frontend import slug_problem
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.pruning import node_influence

Feature = tuple[int, int]  # (layer, feature)
Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class GraphSummary:
    """What one pruned graph contributes (module docstring).

    - ``features``: ``(layer, feature) -> influence`` (summed over its positions)
    - ``heads``: ``(layer, head) -> [(loading, edge value), ...]`` over the cross-position
      edges the head carries
    """

    features: dict[Feature, float]
    heads: dict[Head, list[tuple[float, float]]]


def summarize(
    pruned: AttributionGraph, loadings: HeadLoadings | None, *, min_head_share: float = 0.25
) -> GraphSummary:
    """The :class:`GraphSummary` of ``pruned`` with the head loadings of its edges."""
    features: dict[Feature, float] = defaultdict(float)
    nodes = pruned.nodes
    idx = pruned.indices("feature")
    if len(idx):
        influence = node_influence(
            pruned.adjacency, pruned.indices("target"), pruned.target_weights()
        )
        for i in idx.tolist():
            key = (int(nodes.layer[i]), int(nodes.feature[i]))
            features[key] += float(influence[i])
    heads: dict[Head, list[tuple[float, float]]] = defaultdict(list)
    if loadings is not None:
        _carried_edges(pruned, loadings, min_head_share, heads)
    return GraphSummary(dict(features), dict(heads))


def _carried_edges(
    pruned: AttributionGraph,
    loadings: HeadLoadings,
    min_share: float,
    heads: dict[Head, list[tuple[float, float]]],
) -> None:
    pos = pruned.nodes.pos
    for e, (t, s) in enumerate(loadings.edges.tolist()):
        value = float(loadings.edge_values[e])
        if int(pos[t]) == int(pos[s]) or value == 0.0:
            continue
        share = loadings.loadings[e].abs() >= min_share * abs(value)  # [n_layers, n_heads]
        share &= loadings.crossed[e][:, None]
        for m, h in share.nonzero().tolist():
            heads[(m, h)].append((float(loadings.loadings[e, m, h]), value))


@dataclass(frozen=True)
class Recurrence:
    """Features and heads across ``n_graphs`` graphs, most recurring first.

    - ``features``: a DataFrame with ``layer, feature, n_graphs, fraction`` (of the graphs),
      ``mean_influence``, ``prompts`` (ids)
    - ``heads``: ``layer, head, n_graphs, fraction, n_edges`` (cross-position edges it
      carries), ``mean_loading``, ``mean_share``, ``prompts``
    """

    features: Any
    heads: Any
    n_graphs: int

    def save(self, out: str | Path, top: int = 20) -> list[Path]:
        """``recurrence_features.parquet``, ``recurrence_heads.parquet`` and a plot of the
        ``top`` of each, ``recurrence.png``, into the folder ``out``."""
        from tl_circuits.batch.results import write_parquet

        out = Path(out)
        paths = [out / "recurrence_features.parquet", out / "recurrence_heads.parquet"]
        write_parquet(self.features, paths[0])
        write_parquet(self.heads, paths[1])
        return [*paths, self.plot(out / "recurrence.png", top=top)]

    def plot(self, path: str | Path, top: int = 20) -> Path:
        """Bar charts of the ``top`` features and heads by the graphs they appear in."""
        from tl_circuits.batch.plot import plot_recurrence

        return plot_recurrence(self, Path(path), top)


def recurrence_of(summaries: Mapping[str, GraphSummary]) -> Recurrence:
    """Aggregate the summaries of graphs by prompt id (module docstring)."""
    from tl_circuits.batch.results import import_pandas

    pd = import_pandas()
    feature_graphs: dict[Feature, list[tuple[str, float]]] = defaultdict(list)
    head_graphs: dict[Head, list[str]] = defaultdict(list)
    head_edges: dict[Head, list[tuple[float, float]]] = defaultdict(list)
    for prompt_id, summary in summaries.items():
        for key, influence in summary.features.items():
            feature_graphs[key].append((prompt_id, influence))
        for key, carried in summary.heads.items():
            if carried:
                head_graphs[key].append(prompt_id)
                head_edges[key].extend(carried)
    n = len(summaries)
    features = pd.DataFrame(
        [
            {
                "layer": layer,
                "feature": feature,
                "n_graphs": len(seen),
                "fraction": len(seen) / n,
                "mean_influence": sum(v for _, v in seen) / len(seen),
                "prompts": [p for p, _ in seen],
            }
            for (layer, feature), seen in feature_graphs.items()
        ],
        columns=["layer", "feature", "n_graphs", "fraction", "mean_influence", "prompts"],
    )
    heads = pd.DataFrame(
        [_head_row(key, head_graphs[key], head_edges[key], n) for key in head_graphs],
        columns=[
            "layer",
            "head",
            "n_graphs",
            "fraction",
            "n_edges",
            "mean_loading",
            "mean_share",
            "prompts",
        ],
    )
    features = features.sort_values(
        ["n_graphs", "mean_influence", "layer", "feature"], ascending=[False, False, True, True]
    ).reset_index(drop=True)
    heads = heads.sort_values(
        ["n_graphs", "n_edges", "layer", "head"], ascending=[False, False, True, True]
    ).reset_index(drop=True)
    return Recurrence(features=features, heads=heads, n_graphs=n)


def _head_row(
    key: Head, prompts: list[str], carried: list[tuple[float, float]], n: int
) -> dict[str, Any]:
    layer, head = key
    return {
        "layer": layer,
        "head": head,
        "n_graphs": len(prompts),
        "fraction": len(prompts) / n,
        "n_edges": len(carried),
        "mean_loading": sum(v for v, _ in carried) / len(carried),
        "mean_share": sum(v / e for v, e in carried) / len(carried),
        "prompts": prompts,
    }


def recurrence(results_dir: str | Path, *, min_head_share: float = 0.25) -> Recurrence:
    """Features and heads that recur across the complete prompts of a ``trace_many``
    output folder (module docstring): reads ``results.parquet`` and each complete
    prompt's ``graphs/{id}/pruned`` (checked on load) and its head loadings."""
    from tl_circuits.batch.results import read_results

    results_dir = Path(results_dir)
    table = read_results(results_dir)
    ids = [str(i) for i in table.loc[table["status"] == "complete", "id"]]
    if not ids:
        raise TLCircuitsError(f"{results_dir}: no complete prompts in results.parquet")
    summaries = {}
    for prompt_id in ids:
        problem = slug_problem(prompt_id)
        if problem is not None:  # the table is data: its ids never become raw paths
            raise TLCircuitsError(f"{results_dir}/results.parquet: bad id {prompt_id!r}: {problem}")
        folder = results_dir / "graphs" / prompt_id / "pruned"
        pruned = AttributionGraph.load(folder)
        has_loadings = (folder / "head_loadings.safetensors").is_file()
        loadings = HeadLoadings.load(folder, graph=pruned) if has_loadings else None
        summaries[prompt_id] = summarize(pruned, loadings, min_head_share=min_head_share)
    return recurrence_of(summaries)


__all__ = ["GraphSummary", "Recurrence", "recurrence", "recurrence_of", "summarize"]
