"""``tl-circuits trace``: a prompt's attribution graph, pruned graph, JSON and picture."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from tl_circuits.batch.trace import save_trace, strongest_head_loadings
from tl_circuits.cli.options import add_source_options, check_output_dir
from tl_circuits.cli.sources import DEFAULT, SourceError, load_source, source_from_args

DESCRIPTION = """\
Trace a prompt: build its attribution graph (DESIGN.md §2) on the replacement model, prune
it, compute which attention heads carried its strongest edges, and write

  OUT/graph/     the full graph, lossless (safetensors + JSON; AttributionGraph.load)
  OUT/pruned/    the pruned graph and its head loadings (head_loadings.safetensors)
  OUT/graph.json the pruned graph in the Neuronpedia / circuit-tracer frontend format
  OUT/graph.svg, OUT/graph.png  a picture: layers as rows, positions as columns
  OUT/viewer.json  the interactive viewer's document: the graph JSON plus head loadings of
                 the strongest edges, QK terms of their heads, attention patterns and (for
                 the default model) feature cards
  OUT/viewer.html  the interactive viewer as one self-contained file (no network); or
                 browse several traces with `tl-circuits serve OUT`

With no --model it runs on the embedded default model (no network needed) and, with no
prompt, on its induction prompt (see `tl-circuits info`).
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="build, prune and draw a prompt's attribution graph",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", help="the prompt (default model: see --example)")
    p.add_argument(
        "--example",
        default=None,
        help="a named prompt of the default model (`tl-circuits info` lists them); "
        "default: 'induction'",
    )
    add_source_options(p)
    p.add_argument("--out", type=Path, default=Path("tl_circuits_out"), help="(%(default)s)")
    p.add_argument(
        "--max-features",
        type=int,
        default=None,
        help="feature budget: keep the most influential features (default: all active)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=None,
        metavar="TOKEN",
        help="explain this token's logit (repeatable; default: the top logits to p=0.95). "
        "TOKEN is a token string, also when it is all digits: --target 5 is the token '5' "
        "(refused if the tokenizer does not know it); use --target-id for a token id",
    )
    p.add_argument(
        "--target-id",
        dest="target",
        action="append",
        type=int,
        metavar="ID",
        help="explain the logit of the token with this vocabulary id (repeatable; may be mixed "
        "with --target)",
    )
    p.add_argument(
        "--logit-diff",
        nargs=2,
        metavar=("A", "B"),
        help="explain logit(A) - logit(B) of two different token strings",
    )
    p.add_argument("--node-threshold", type=float, default=0.8, help="(%(default)s)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="(%(default)s)")
    p.add_argument(
        "--head-edges",
        type=int,
        default=100,
        help="head loadings for the N strongest edges of the pruned graph (0: none; "
        "default %(default)s)",
    )
    p.add_argument(
        "--spill-dir",
        type=Path,
        default=None,
        help="with --max-features: keep the visited rows (the bulk of a long prompt's "
        "memory) in a scratch folder inside this directory instead of in memory; removed "
        "when the build ends (the graph is the same)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="rows per reverse pass (%(default)s)"
    )
    p.add_argument("--no-picture", action="store_true", help="skip the SVG/PNG picture")
    p.set_defaults(run=run)


def resolve_prompt(args: argparse.Namespace, model_name: str) -> str:
    """The prompt text: the positional prompt, or a named example of the default model."""
    if args.prompt is not None and args.example is not None:
        raise SourceError("give a prompt or --example, not both")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise SourceError("the prompt is empty")
        return args.prompt
    if model_name != DEFAULT:
        raise SourceError(f"model {model_name!r}: give a prompt")
    from tl_circuits.default import DEFAULT_PROMPTS

    name = args.example or "induction"
    if name not in DEFAULT_PROMPTS:
        raise SourceError(f"unknown --example {name!r}; choose from {sorted(DEFAULT_PROMPTS)}")
    return DEFAULT_PROMPTS[name].text


def run(args: argparse.Namespace) -> int:
    from tl_circuits.export.picture import save_graph_picture
    from tl_circuits.graph import AttributionGraph

    for name in ("max_features", "head_edges", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "head_edges" else 1):
            raise SourceError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.spill_dir is not None and not args.spill_dir.is_dir():
        raise SourceError(f"--spill-dir {args.spill_dir} is not a directory")
    source = source_from_args(args)
    prompt = resolve_prompt(args, source.model)
    if args.logit_diff and args.logit_diff[0] == args.logit_diff[1]:
        raise SourceError(
            f"--logit-diff {args.logit_diff[0]!r} {args.logit_diff[1]!r}: the difference of a "
            "logit with itself is always 0; give two different tokens"
        )
    out: Path = check_output_dir(args.out, "--out")
    print(f"loading {source.describe()} ...")
    model, transcoders = load_source(source)
    targets: list[Any] | None = list(args.target) if args.target else None
    if args.logit_diff:
        targets = [*(targets or []), tuple(args.logit_diff)]
    graph = AttributionGraph.build(
        model,
        transcoders,
        prompt,
        targets=targets,
        max_feature_nodes=args.max_features,
        batch_size=args.batch_size,
        spill_dir=args.spill_dir,
    )
    graph.info["source"] = source.to_json()
    _print_graph(graph)

    pruned = graph.prune(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    loadings = strongest_head_loadings(pruned, args.head_edges)
    _print_pruned(pruned, loadings)

    written = save_trace(out, graph, pruned, loadings)
    written += _write_viewer(pruned, loadings, source, out)
    if not args.no_picture:
        written += save_graph_picture(pruned, out / "graph", head_loadings=loadings)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _write_viewer(pruned: Any, loadings: Any, source: Any, out: Path) -> list[Path]:
    """``OUT/viewer.json`` and ``OUT/viewer.html`` (the latter only when the package has
    the viewer page), both written atomically."""
    import json

    from tl_circuits.errors import TLCircuitsError
    from tl_circuits.storage import write_text
    from tl_circuits.viewer.data import viewer_document
    from tl_circuits.viewer.html import self_contained_html

    cards = None
    if source.model == DEFAULT:
        from tl_circuits.default.cards import load_default_feature_cards

        cards = load_default_feature_cards(source.transcoders or "per_layer")
    doc = viewer_document(pruned, loadings, feature_cards=cards)
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    write_text(out / "viewer.json", text + "\n")
    written = [out / "viewer.json"]
    try:
        page = self_contained_html(doc)
    except TLCircuitsError as exc:  # the page's assets are not installed
        print(f"not writing {out / 'viewer.html'}: {exc}")
        return written
    write_text(out / "viewer.html", page)
    return [*written, out / "viewer.html"]


def _print_graph(graph: Any) -> None:
    counts = {k: graph.nodes.count(k) for k in ("feature", "error", "token", "target")}
    print(f"prompt: {' | '.join(graph.token_strings)}")
    print("targets: " + "; ".join(graph.node_label(int(i)) for i in graph.indices("target")))
    scores = graph.scores()
    excluded = len(graph.excluded)
    print(
        f"graph: {counts['feature']} features"
        + (f" (+{excluded} left out by the budget)" if excluded else "")
        + f", {counts['error']} errors, {counts['token']} tokens, {counts['target']} targets; "
        f"replacement score {scores.replacement:.3f}, completeness {scores.completeness:.3f}"
    )


def _print_pruned(pruned: Any, loadings: Any) -> None:
    scores = pruned.scores()
    n_edges = int((pruned.adjacency != 0).sum())
    print(
        f"pruned: {pruned.n_nodes} nodes, {n_edges} edges; replacement score "
        f"{scores.replacement:.3f}, completeness {scores.completeness:.3f}"
    )
    target = int(pruned.indices("target")[0])
    row = pruned.adjacency[target]
    print(f"strongest inputs to {pruned.node_label(target)}:")
    for s in torch.argsort(row.abs(), descending=True)[:5].tolist():
        if float(row[s]) != 0.0:
            print(f"  {float(row[s]):+9.3f}  {pruned.node_label(s)}")
    if loadings is None:
        return
    pos = pruned.nodes.pos
    cross = [i for i, (t, s) in enumerate(loadings.edges.tolist()) if int(pos[t]) != int(pos[s])]
    cross.sort(key=lambda i: -abs(float(loadings.edge_values[i])))
    if cross:
        print("heads carrying the strongest cross-position edges:")
    for i in cross[:5]:
        t, s = loadings.edges[i].tolist()
        heads = ", ".join(f"L{m}H{h} {v:+.3f}" for m, h, v in loadings.top_heads(i, k=2))
        print(
            f"  {pruned.node_label(s)} -> {pruned.node_label(t)} "
            f"({float(loadings.edge_values[i]):+.3f}): {heads}"
        )
