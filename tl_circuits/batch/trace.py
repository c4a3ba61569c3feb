"""What one trace writes, shared by ``tl-circuits trace`` and the batch workers.

A trace folder holds ``graph/`` (the full graph, lossless), ``pruned/`` (the pruned graph,
which records the full graph's id in ``info["full_graph_id"]``, and beside it
``head_loadings.safetensors`` for its strongest edges) and, when asked, ``graph.json`` (the
pruned graph in the Neuronpedia / circuit-tracer frontend format, with its head loadings).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.export.frontend import export_json
from tl_circuits.graph.files import graph_id
from tl_circuits.graph.graph import AttributionGraph


def strongest_edges(adjacency: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, 2]`` (target, source) of the ``k`` largest ``|A|`` entries of ``adjacency``
    whose target is a feature or target row (error/token rows have no inputs)."""
    nonzero = adjacency.nonzero()
    weights = adjacency[nonzero[:, 0], nonzero[:, 1]].abs()
    return nonzero[torch.argsort(weights, descending=True)[:k]]


def strongest_head_loadings(pruned: AttributionGraph, n_edges: int) -> HeadLoadings | None:
    """Head loadings of the ``n_edges`` strongest edges of ``pruned`` (None for 0 edges or
    a graph without edges)."""
    if n_edges <= 0:
        return None
    edges = strongest_edges(pruned.adjacency, n_edges)
    return HeadLoadings.compute(pruned, edges) if edges.shape[0] else None


def save_trace(
    out: Path,
    graph: AttributionGraph,
    pruned: AttributionGraph,
    loadings: HeadLoadings | None,
    *,
    write_json: bool = True,
) -> list[Path]:
    """Write ``graph/``, ``pruned/`` (with the loadings) and, if ``write_json``,
    ``graph.json`` into the folder ``out`` (module docstring); returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [graph.save(out / "graph")]
    # the pruned graph names the full graph it came from: a folder whose graph/ and pruned/
    # come from different (e.g. interrupted) runs is refused when read back
    pruned.info["full_graph_id"] = graph_id(graph)
    written.append(pruned.save(out / "pruned"))
    if loadings is not None:
        written.append(loadings.save(out / "pruned"))
    if write_json:
        export_json(pruned, out / "graph.json", head_loadings=loadings)
        written.append(out / "graph.json")
    return written
