"""``tl-circuits trace-many`` (many prompts on Ray) and ``tl-circuits recurrence``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tl_circuits.cli.options import add_source_options, check_output_dir

TRACE_MANY = """\
Trace every prompt of PROMPTS (JSON lines: {"id": "...", "prompt": "..." or [token ids],
"targets": [...]} or a bare JSON string, whose id is its line number) on Ray workers, each
loading the model and transcoders once, and write

  OUT/graphs/{id}/     each prompt's graph/ and pruned/ (lossless; with --json graph.json),
                       written atomically
  OUT/results.parquet  one row per prompt: status, error, sizes, scores, top target,
                       features and heads, seconds, peak memory

A failed prompt is recorded with its error; a worker that dies is replaced and its prompt
sent once more. Rerun with the same OUT to finish an interrupted batch: prompts already
complete and verified are skipped. Ray: a local instance on this machine's CPUs/GPUs, or a
cluster with --address. Needs the extra: pip install 'tl_circuits[distributed]'.
See docs/distributed.md.
"""

RECURRENCE = """\
Which features and heads recur across the pruned graphs of a trace-many folder: in how
many graphs each appears, its mean influence (features) or mean loading on the
cross-position edges it carries (heads), and the prompts. Prints the top ones and writes
DIR/recurrence_features.parquet, DIR/recurrence_heads.parquet and DIR/recurrence.png.
A count is not a shared circuit: see docs/distributed.md for what it does not show.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "trace-many",
        help="trace many prompts on Ray (faults survived, reruns resume)",
        description=TRACE_MANY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompts", type=Path, help="a JSON-lines file of prompts")
    p.add_argument("--out", type=Path, required=True, help="the batch folder")
    add_source_options(p)
    p.set_defaults(device=None)
    for action in p._actions:
        if action.dest == "device":
            action.help = "torch device (default: cuda when the Ray cluster has GPUs, else cpu)"
    ray_group = p.add_argument_group("Ray workers")
    ray_group.add_argument("--address", help="a Ray cluster (default: a local instance)")
    ray_group.add_argument(
        "--workers", type=int, help="default: one per GPU on CUDA, else one per CPU core"
    )
    ray_group.add_argument("--cpus-per-worker", type=float, default=1.0, help="(%(default)s)")
    ray_group.add_argument(
        "--gpus-per-worker", type=float, help="default 1 on CUDA; 0.5: two workers per GPU"
    )
    ray_group.add_argument(
        "--memory-per-worker", type=float, metavar="GiB", help="memory Ray reserves per worker"
    )
    p.add_argument("--max-features", type=int, help="feature budget of each graph")
    p.add_argument("--batch-size", type=int, default=64, help="(%(default)s)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="(%(default)s)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="(%(default)s)")
    p.add_argument("--head-edges", type=int, default=100, help="(%(default)s)")
    p.add_argument("--json", action="store_true", help="also write each pruned graph.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_trace_many)

    r = sub.add_parser(
        "recurrence",
        help="features and heads that recur across a trace-many folder's graphs",
        description=RECURRENCE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("dir", type=Path, help="a trace-many output folder")
    r.add_argument("--top", type=int, default=15, help="rows printed and plotted (%(default)s)")
    r.add_argument(
        "--min-head-share",
        type=float,
        default=0.25,
        help="a head carries an edge when |loading| >= this share of it (%(default)s)",
    )
    r.set_defaults(run=run_recurrence)


def run_trace_many(args: argparse.Namespace) -> int:
    from tl_circuits.batch.runner import trace_many

    out = check_output_dir(args.out, "--out")
    build: dict[str, Any] = {"batch_size": args.batch_size}
    if args.max_features is not None:
        build["max_feature_nodes"] = args.max_features
    memory = None if args.memory_per_worker is None else int(args.memory_per_worker * 2**30)
    table = trace_many(
        args.prompts,
        args.model,
        args.transcoders,
        out_dir=out,
        sae_id_template=args.sae_id_template,
        fold_ln=args.fold_ln,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        memory_per_worker=memory,
        address=args.address,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        head_edges=args.head_edges,
        write_json=args.json,
        show_progress=not args.no_progress,
        **build,
    )
    counts = table["status"].value_counts().to_dict()
    print(
        f"{counts.get('complete', 0)} complete, {counts.get('failed', 0)} failed of "
        f"{len(table)} prompts; wrote {out / 'results.parquet'}"
    )
    for row in table[table["status"] == "failed"].head(10).itertuples():
        print(f"  {row.id}: {row.error}")
    return 0


def run_recurrence(args: argparse.Namespace) -> int:
    from tl_circuits.batch.recurrence import recurrence

    rec = recurrence(args.dir, min_head_share=args.min_head_share)
    import pandas as pd  # present: recurrence needs it

    written = rec.save(args.dir, top=args.top)
    with pd.option_context("display.width", 120, "display.max_colwidth", 40):
        print(f"features in the pruned graphs of {rec.n_graphs} prompts:")
        print(rec.features.head(args.top).to_string(index=False))
        print("\nheads carrying cross-position edges:")
        print(rec.heads.head(args.top).to_string(index=False))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
