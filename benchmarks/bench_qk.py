"""Benchmark: QK attributions for all heads of one layer on the benchmark model.

Model and transcoders: those of ``bench_graph.py`` (random GPT-2-small-shaped model, random
JumpReLU transcoders, d_sae 8192, ~64 active features per layer and position, calibrated
at the traced length). A budgeted graph (default 4,096 features) is built on a 64-token
prompt (not timed here: see ``bench_graph.py``; built once and saved under
``benchmarks/results/`` by ``bench_heads.benchmark_graph``, loaded by later runs);
then, at ``--layer`` (default the last, where the most nodes write below):

- ``graph forward``: ``QKBasis.from_graph(..., method="forward")``: every node propagated
  to ``resid_pre(layer)`` once (``forward table``), then every head at the last query
  position and every key (0..63), with its top-10 terms per key and the sparse top-10 +
  remainder form (``all heads``);
- ``graph reverse``: ``method="reverse"``: reverse passes seeded at one head's query / key
  map, for one key (``2 x d_head`` seeds) and for every key (``65 x d_head`` seeds);
- ``graph auto``: the default ``method="auto"`` answering the all-heads question (reverse
  passes until they would cost more than the forward table, then the table);
- the same all-heads question in the dictionary-free components basis (no graph needed).

Time and memory per step as in ``bench_graph.measure`` (wall seconds; peak RSS minus RSS
before). Results go to ``benchmarks/results/qk.json``.

Usage::

    python benchmarks/bench_qk.py                   # 64 tokens, budget 4096, last layer
    python benchmarks/bench_qk.py --tokens 32 --budget 1024 --layer 6
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_graph import machine_info, measure
from bench_heads import benchmark_graph

from tl_circuits import QKAttribution, QKBasis

RESULTS = Path(__file__).resolve().parent / "results" / "qk.json"


def all_heads(basis: QKBasis, query: int) -> int:
    """Attributions of every head at ``query`` (all keys), with the per-key views; returns
    the number of terms represented."""
    n_terms = 0
    for head in range(basis.model.cfg.n_heads):
        qk = QKAttribution.from_basis(basis, head=head, query_pos=query)
        for key in range(len(qk.key_pos)):
            qk.top_terms(key, 10)
        qk.sparse_terms(10)
        n_terms += len(qk.key_pos) * len(qk.q_components) * len(qk.k_components)
    return n_terms


STEPS = (
    "forward_table",
    "forward_all_heads",
    "reverse_one_key",
    "reverse_all_keys",
    "auto_all_heads",
    "components",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--layer", type=int, default=-1, help="default: the last layer")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="build the graph again")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--only",
        default=",".join(STEPS),
        help=f"comma-separated steps to run, of {','.join(STEPS)} (default: all)",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if only - set(STEPS):
        ap.error(f"unknown steps {sorted(only - set(STEPS))}; choose from {','.join(STEPS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    graph, build_s = benchmark_graph(args.tokens, args.budget, args.seed, args.rebuild)
    assert graph.context is not None
    model, tokens = graph.context.model, graph.tokens
    layer = args.layer % model.cfg.n_layers
    print(
        f"graph ({len(graph.nodes)} nodes, built in {build_s:.1f}s) ready in "
        f"{time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    query = args.tokens - 1
    steps = {}
    if only & {"forward_table", "forward_all_heads"}:
        forward = QKBasis.from_graph(graph, layer, method="forward")
        some_row = forward.live_rows([query])[:1]
        _, steps["graph_forward_table"] = measure(forward.contributions, some_row, [query])
        steps["graph_forward_table"]["components"] = len(forward.live_rows([query]))
        if "forward_all_heads" in only:
            n_terms, steps["graph_forward_all_heads"] = measure(all_heads, forward, query)
            steps["graph_forward_all_heads"]["terms"] = n_terms
        del forward
    for name, keys in (("one_key", [query - 1]), ("all_keys", None)):
        if f"reverse_{name}" not in only:
            continue
        reverse = QKBasis.from_graph(graph, layer, method="reverse")
        _, steps[f"graph_reverse_{name}"] = measure(
            QKAttribution.from_basis, reverse, head=0, query_pos=query, key_pos=keys
        )
        assert reverse.reverse is not None
        steps[f"graph_reverse_{name}"]["seeds"] = reverse.reverse.seeds_run
        del reverse
    if "auto_all_heads" in only:
        auto = QKBasis.from_graph(graph, layer)
        n_terms, steps["graph_auto_all_heads"] = measure(all_heads, auto, query)
        assert auto.reverse is not None
        steps["graph_auto_all_heads"]["seeds"] = auto.reverse.seeds_run
        steps["graph_auto_all_heads"]["forward_table"] = auto.reverse.forward_built()
        del auto
    if "components" in only:
        comp, steps["components_basis"] = measure(QKBasis.from_components, model, tokens, layer)
        n_terms, steps["components_all_heads"] = measure(all_heads, comp, query)
        steps["components_all_heads"]["terms"] = n_terms
        steps["components_basis"]["components"] = len(comp.table)
    for name, step in steps.items():
        print(
            f"{name:26s} {step['seconds']:8.2f} s  {step['build_memory_bytes'] / 2**20:8.0f} MiB"
            + (f"  ({step['seeds']} seeds)" if "seeds" in step else ""),
            flush=True,
        )
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "tokens": args.tokens,
        "budget": args.budget,
        "layer": layer,
        "heads": model.cfg.n_heads,
        "graph_nodes": len(graph.nodes),
        "graph_build_seconds": build_s,
        "steps": steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
