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

n = 16
model = bg.gpt2_small_random(0)
tcs = bg.random_transcoders(
    model, "jumprelu", d_sae=8192, active_fraction=64 / 8192, seed=0, calibration_positions=n
)
g = AttributionGraph.build(model, tcs, bg.random_prompt(n, 0), batch_size=256, show_progress=False)
print("nodes", g.n_nodes, "blocks MiB", g.edges.nbytes / 2**20)


def prune_and_score(graph):
    p = graph.prune()
    s = graph.scores()
    return p, s


(p1, s1), m1 = bg.measure(prune_and_score, g)
print(
    "blocks: prune+scores",
    round(m1["seconds"], 2),
    "s",
    round(m1["build_memory_bytes"] / 2**20),
    "MiB",
    g._dense is None,
)
d = g.with_adjacency(g.edges.to_dense())
(p2, s2), m2 = bg.measure(prune_and_score, d)
print(
    "dense:  prune+scores",
    round(m2["seconds"], 2),
    "s",
    round(m2["build_memory_bytes"] / 2**20),
    "MiB (dense matrix",
    round(d.edges.numel() * 4 / 2**20),
    "MiB, held before)",
)
print("same pruned graph:", torch.equal(p1.adjacency, p2.adjacency), s1, s2)
