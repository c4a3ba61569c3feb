"""Benchmark: pruning + scores of a full 16-token graph on its causal blocks vs the dense matrix.

Same model and transcoders as ``bench_graph.py``. Prints wall time and memory (peak RSS
minus RSS before, as ``bench_graph.measure``) of ``graph.prune(); graph.scores()`` on the
build's ``CausalAdjacency`` and on the same graph with a dense adjacency, and checks the
two pruned graphs are identical. Usage: ``python benchmarks/bench_prune.py``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_graph as bg
import torch

from tl_circuits.graph import AttributionGraph

N_TOKENS = 16


def prune_and_score(graph: AttributionGraph) -> tuple[AttributionGraph, object]:
    return graph.prune(), graph.scores()


def main() -> None:
    model = bg.gpt2_small_random(0)
    tcs = bg.bench_transcoders(model, N_TOKENS, 0)
    prompt = bg.random_prompt(N_TOKENS, 0)
    graph = AttributionGraph.build(model, tcs, prompt, batch_size=256, show_progress=False)
    dense = graph.with_adjacency(graph.edges.to_dense())
    print(
        f"{graph.n_nodes} nodes; blocks {graph.edges.nbytes / 2**20:.0f} MiB, dense "
        f"{dense.edges.numel() * dense.edges.element_size() / 2**20:.0f} MiB"
    )
    results = {}
    for name, g in (("causal blocks", graph), ("dense matrix", dense)):
        results[name], m = bg.measure(prune_and_score, g)
        mib = m["build_memory_bytes"] / 2**20
        print(f"{name:14s} prune + scores {m['seconds']:7.2f} s {mib:7.0f} MiB")
    assert graph._dense is None  # the blocks path never made the dense view
    (p1, s1), (p2, s2) = results.values()
    print("identical pruned graphs:", torch.equal(p1.adjacency, p2.adjacency), s1, s2)


if __name__ == "__main__":
    main()
