"""``tl-circuits heads``: which attention heads carried a traced graph's edges."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from tl_circuits.cli.options import (
    add_source_options,
    check_output_dir,
    graph_source,
    load_graph_dir,
    strongest_edges,
)
from tl_circuits.cli.sources import SourceError, load_source

DESCRIPTION = """\
Head loadings (DESIGN.md §3) of a graph written by `tl-circuits trace`: for each of the
strongest edges, how much each attention head it crosses carried it
(A[t, s] = bypass[m] + sum_h loading[m, h] at every crossed layer m). The model and
transcoders are the ones the graph records (override with --model/--transcoders).
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "heads",
        help="head loadings of a traced graph's strongest edges",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("graph", type=Path, help="a `trace` output folder or a graph folder")
    p.add_argument("--edges", type=int, default=20, help="strongest edges (%(default)s)")
    p.add_argument("--top", type=int, default=3, help="heads shown per edge (%(default)s)")
    p.add_argument(
        "--cross-position-only",
        action="store_true",
        help="only edges whose source and target sit at different positions",
    )
    p.add_argument(
        "--save",
        action="store_true",
        help="write the loadings into the graph folder (head_loadings.safetensors)",
    )
    add_source_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tl_circuits.attention.heads.loadings import HeadLoadings

    if args.edges < 1 or args.top < 1:
        raise SourceError("--edges and --top must be positive")
    graph = load_graph_dir(args.graph)
    if args.save:
        check_output_dir(_graph_folder(args.graph), "--save: the graph folder")
    source = graph_source(graph.info, args)
    model, transcoders = load_source(source)
    adjacency = graph.adjacency
    if args.cross_position_only:
        pos = graph.nodes.pos
        adjacency = adjacency * (pos[:, None] != pos[None, :])
    edges = strongest_edges(adjacency, args.edges)
    if edges.shape[0] == 0:
        raise SourceError("the graph has no edges to split")
    loadings = HeadLoadings.compute(graph, edges, model=model, transcoders=transcoders)
    for i in range(loadings.n_edges):
        t, s = (int(x) for x in loadings.edges[i])
        value = float(loadings.edge_values[i])
        crossed = loadings.crossed[i].nonzero(as_tuple=True)[0].tolist()
        heads = ", ".join(f"L{m}H{h} {v:+.3f}" for m, h, v in loadings.top_heads(i, k=args.top))
        bypass = ", ".join(f"L{m} {float(loadings.bypass[i, m]):+.3f}" for m in crossed)
        print(f"{graph.node_label(s)} -> {graph.node_label(t)}: {value:+.3f}")
        print(f"    heads: {heads or '-'}")
        print(f"    bypass (residual path) at crossed layers: {bypass or '-'}")
    totals = loadings.head_totals()
    n_heads = totals.shape[1]
    order = torch.argsort(totals.flatten(), descending=True)[:5].tolist()
    print(
        "heads carrying the most (sum of |loading|): "
        + ", ".join(
            f"L{i // n_heads}H{i % n_heads} {float(totals.flatten()[i]):.3f}" for i in order
        )
    )
    if args.save:
        path = loadings.save(_graph_folder(args.graph))
        print(f"saved the loadings to {path}")
    return 0


def _graph_folder(path: Path) -> Path:
    return path / "pruned" if (path / "pruned").is_dir() else path
