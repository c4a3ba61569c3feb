"""``tl-circuits qk``: why a head attends where it does (QK attribution terms)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from tl_circuits.cli.options import add_source_options, graph_source, load_graph_dir
from tl_circuits.cli.sources import DEFAULT, SourceError, load_source, source_from_args

DESCRIPTION = """\
QK attribution (DESIGN.md §4): head (LAYER, HEAD)'s pre-softmax score at the query position
and each key position, split into query-component x key-component terms that sum to it.

Bases: 'graph' (the attribution graph's features, errors and tokens; from a traced GRAPH
folder, or built on the prompt) or 'components' (dictionary-free: embeddings, each earlier
head's output, each earlier MLP's output, biases; needs no transcoders).
Positions count from 0 (the <bos> token); negative positions count from the end.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "qk",
        help="QK attribution terms of a head at a query and key positions",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("graph", type=Path, nargs="?", help="a `trace` output folder (optional)")
    p.add_argument("--prompt", help="a prompt instead of a graph (default model: its example)")
    p.add_argument("--example", help="a named prompt of the default model (`info`)")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--head", type=int, required=True)
    p.add_argument("--query-pos", type=int, default=-1, help="(default: the last position)")
    p.add_argument(
        "--key-pos",
        type=int,
        action="append",
        help="key position (repeatable; default: every key the query attends to)",
    )
    p.add_argument("--basis", choices=("graph", "components"), default="graph")
    p.add_argument("--top", type=int, default=8, help="terms shown per key (%(default)s)")
    p.add_argument(
        "--competition",
        action="store_true",
        help="rank the softmax-competition terms (score at the key minus the attention-"
        "weighted mean score over the keys)",
    )
    add_source_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tl_circuits.attention.qk.attribution import QKAttribution

    if args.top < 1:
        raise SourceError("--top must be positive")
    if args.graph is not None:
        if args.prompt is not None or args.example is not None:
            raise SourceError("give a graph folder or a prompt, not both")
        graph = load_graph_dir(args.graph)
        source = graph_source(graph.info, args)
        model, transcoders = load_source(source)
        prompt: Any = graph.tokens
    else:
        from tl_circuits.cli.trace import resolve_prompt

        source = source_from_args(args)
        prompt = resolve_prompt(
            argparse.Namespace(prompt=args.prompt, example=args.example), source.model
        )
        if args.basis == "components" and source.model != DEFAULT and source.transcoders is None:
            from tl_circuits.transcoders.loading import load_model

            model = load_model(
                source.model, fold_ln=source.fold_ln, device=source.device, dtype=source.dtype
            )
            transcoders = None
        else:
            model, transcoders = load_source(source)
        graph = None

    from tl_circuits.model.prompt import to_tokens

    n_pos = int(to_tokens(model, prompt).shape[0])  # a bad prompt fails here, clearly
    query = _position(args.query_pos, n_pos, "--query-pos")
    keys = [_position(k, n_pos, "--key-pos") for k in args.key_pos] if args.key_pos else None
    # check what is cheap to check before any graph is built
    late = [k for k in keys or [] if k > query]
    if late:
        raise SourceError(
            f"key position {late[0]} is after query position {query}: the causal mask hides it"
        )
    cfg = model.cfg
    if not 0 <= args.layer < cfg.n_layers:
        raise SourceError(f"--layer {args.layer} out of range [0, {cfg.n_layers})")
    if not 0 <= args.head < cfg.n_heads:
        raise SourceError(f"--head {args.head} out of range [0, {cfg.n_heads})")
    where = dict(layer=args.layer, head=args.head, query_pos=query, key_pos=keys)
    if args.basis == "components":
        qk = QKAttribution.from_components(model, prompt, **where)
    else:
        if graph is None:
            from tl_circuits.graph import AttributionGraph

            graph = AttributionGraph.build(model, transcoders, prompt)
        else:
            from tl_circuits.graph.context import graph_context

            graph.context = graph_context(graph, model, transcoders)
        qk = QKAttribution.compute(graph, **where)
    _print(qk, model, prompt, args)
    return 0


def _position(value: int, n_pos: int, flag: str) -> int:
    if not -n_pos <= value < n_pos:
        raise SourceError(f"{flag} {value} is outside the prompt ({n_pos} tokens)")
    return value % n_pos


def _print(qk: Any, model: Any, prompt: Any, args: argparse.Namespace) -> None:
    tokens = model.to_tokens(prompt)[0] if isinstance(prompt, str) else prompt
    strings = model.to_str_tokens(tokens) if model.tokenizer is not None else tokens.tolist()
    capped = " (pre-soft-cap)" if qk.soft_capped else ""
    print(
        f"head L{qk.layer}H{qk.head}, query @{qk.query_pos} {strings[qk.query_pos]!r}, "
        f"basis {qk.basis}: scores{capped} and attention per key"
    )
    order = torch.argsort(qk.pattern, descending=True).tolist()
    for i in order:
        k = int(qk.key_pos[i])
        print(
            f"  key @{k:<3} {str(strings[k])!r:<14} score {float(qk.scores[i]):+8.3f}  "
            f"attention {float(qk.pattern[i]):.3f}"
        )
    shown = order[: 3 if args.key_pos is None else len(order)]
    for i in shown:
        k = int(qk.key_pos[i])
        what = "competition terms" if args.competition else "terms"
        print(f"top {what} at key @{k} {str(strings[k])!r}:")
        for term in qk.top_terms(i, args.top, competition=args.competition):
            print(
                f"  {term.value:+8.3f}  query {qk.label(term.query)}  x  key {qk.label(term.key)}"
            )
