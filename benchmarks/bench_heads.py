"""Benchmark: head loadings of a default-pruned graph on the benchmark model.

Model and transcoders: those of ``bench_graph.py`` (random GPT-2-small-shaped model, random
JumpReLU transcoders, d_sae 8192, ~64 active features per layer and position, calibrated
at the traced length). A budgeted graph (default 64 tokens, 4,096 features) is built once
and saved under ``benchmarks/results/`` (git-ignored; later runs load it, ``--rebuild``
builds it again), then pruned with ``AttributionGraph.prune``'s default thresholds (what
``tl-circuits trace`` does) and ``HeadLoadings.compute`` runs on every kept edge.

Time and memory as in ``bench_graph.measure`` (wall seconds; peak RSS minus RSS before).
The build time recorded when the graph was built is reported beside it, for the ratio.
Results go to ``benchmarks/results/heads.json``.

Usage::

    python benchmarks/bench_heads.py                 # 64 tokens, budget 4096
    python benchmarks/bench_heads.py --tokens 32 --budget 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_graph import bench_transcoders, gpt2_small_random, machine_info, measure, random_prompt

from tl_circuits import HeadLoadings
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph.context import graph_context
from tl_circuits.transcoders.base import Transcoders

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def benchmark_graph(
    tokens: int, budget: int, seed: int = 0, rebuild: bool = False
) -> tuple[AttributionGraph, float]:
    """The benchmark model's budgeted graph on a ``tokens``-token random prompt, with its
    replacement context, and the seconds its build took (when it was built).

    Saved once under ``benchmarks/results/graph_{tokens}_{budget}_{seed}/`` with the
    build time beside it (``build.json``); later calls load it and re-attach a context
    rebuilt from the same (deterministic) model and transcoders."""
    model = gpt2_small_random(seed)
    tcs = bench_transcoders(model, tokens, seed)
    folder = RESULTS_DIR / f"graph_{tokens}_{budget}_{seed}"
    record = folder / "build.json"
    if record.is_file() and not rebuild:
        graph = AttributionGraph.load(folder / "graph")
        return _with_context(graph, model, tcs), json.loads(record.read_text())["seconds"]
    t0 = time.perf_counter()
    graph = AttributionGraph.build(model, tcs, random_prompt(tokens), max_feature_nodes=budget)
    seconds = time.perf_counter() - t0
    graph.save(folder / "graph")
    record.write_text(json.dumps({"seconds": seconds, "date": datetime.date.today().isoformat()}))
    return graph, seconds


def _with_context(graph: AttributionGraph, model, tcs: Transcoders) -> AttributionGraph:
    return dataclasses.replace(graph, context=graph_context(graph, model, tcs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="build the graph again")
    ap.add_argument("--profile", action="store_true", help="cProfile the computation")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "heads.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    graph, build_s = benchmark_graph(args.tokens, args.budget, args.seed, args.rebuild)
    pruned = graph.prune()
    n_edges = int(pruned.adjacency.count_nonzero())
    print(
        f"graph: {graph.n_nodes} nodes, built in {build_s:.1f} s; pruned: "
        f"{pruned.n_nodes} nodes, {n_edges} edges",
        flush=True,
    )
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    hl, step = measure(HeadLoadings.compute, pruned)
    if args.profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    assert hl.n_edges == n_edges
    step["edges"] = n_edges
    print(
        f"head loadings: {step['seconds']:.1f} s, {step['build_memory_bytes'] / 2**20:.0f} MiB "
        f"({step['seconds'] / build_s:.2f}x the build)",
        flush=True,
    )
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "tokens": args.tokens,
        "budget": args.budget,
        "graph_nodes": graph.n_nodes,
        "pruned_nodes": pruned.n_nodes,
        "graph_build_seconds": build_s,
        "head_loadings": step,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
