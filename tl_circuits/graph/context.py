"""Re-attach a replacement context to a graph (one loaded from disk keeps none).

Head loadings, QK attributions and interventions need the graph's
:class:`~tl_circuits.replacement.context.ReplacementContext` (cached activations, frozen patterns
and scales). A graph built in this process carries it; a graph loaded with
:meth:`AttributionGraph.load` does not, and :func:`graph_context` rebuilds it from the
model and transcoders the graph was built with, after checking that they are the same
ones (shape fields in ``graph.info`` and a fingerprint: the graph's token, error and
feature node values must be what the rebuilt context computes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.nodes import ERROR, FEATURE, TOKEN

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_circuits.graph.graph import AttributionGraph
    from tl_circuits.replacement.context import ReplacementContext
    from tl_circuits.transcoders.base import Transcoders


class GraphContextError(TLCircuitsError):
    """A graph has no replacement context, or the model/transcoders passed are not the
    ones it was built with."""


def graph_context(
    graph: AttributionGraph,
    model: HookedTransformer | None = None,
    transcoders: Transcoders | None = None,
    error: type[TLCircuitsError] = GraphContextError,
) -> ReplacementContext:
    """The graph's replacement context: its own if it has one (``model``/``transcoders``,
    if given, must be the very objects it was built with), else one rebuilt on the graph's
    prompt from ``model`` and ``transcoders`` and checked against the graph. Errors are
    raised as ``error`` (callers pass their own :class:`TLCircuitsError` subclass)."""
    ctx = graph.context
    if ctx is not None:
        if model is not None and model is not ctx.model:
            raise error(
                "the graph was built on a different model than the one passed; pass the "
                "graph's own model (or none)"
            )
        if transcoders is not None and transcoders is not ctx.transcoders:
            raise error("the graph was built with different transcoders than the ones passed")
        return ctx
    if model is None or transcoders is None:
        raise error(
            "this graph has no replacement context (graphs loaded from disk do not keep "
            "one); rebuild it with AttributionGraph.build, or pass the model and "
            "transcoders it was built with (model=..., transcoders=...)"
        )
    from tl_circuits.replacement.context import ReplacementContext

    info, cfg = graph.info, model.cfg
    for key, have in (
        ("n_layers", cfg.n_layers),
        ("n_heads", cfg.n_heads),
        ("d_model", cfg.d_model),
        ("d_vocab", cfg.d_vocab),
        ("model_name", cfg.model_name),
    ):
        if key in info and info[key] != have:
            raise error(
                f"the graph was built on a different model ({key}={info[key]!r}, the model "
                f"passed has {have!r})"
            )
    if "transcoders" in info and info["transcoders"] != type(transcoders).__name__:
        raise error(
            f"the graph was built with {info['transcoders']}, got {type(transcoders).__name__}"
        )
    ctx = ReplacementContext(model, transcoders, graph.tokens.to(model.cfg.device))
    # fingerprint: the graph's token, error and feature node values must be this model's
    nodes = graph.nodes
    kind, pos = nodes.kind.cpu(), nodes.pos.cpu()
    recorded = nodes.activation.cpu().double()
    redo = torch.zeros_like(recorded)
    tok = (kind == TOKEN).nonzero(as_tuple=True)[0]
    redo[tok] = ctx.embeddings.norm(dim=-1).cpu().double()[pos[tok]]
    for layer in range(ctx.n_layers):
        err = ((kind == ERROR) & (nodes.layer.cpu() == layer)).nonzero(as_tuple=True)[0]
        redo[err] = ctx.errors[layer].norm(dim=-1).cpu().double()[pos[err]]
        fs = ((kind == FEATURE) & (nodes.layer.cpu() == layer)).nonzero(as_tuple=True)[0]
        acts = ctx.activations[layer].cpu().double()
        redo[fs] = acts[pos[fs], nodes.feature.cpu()[fs]]
    check = torch.cat([tok, (kind == ERROR).nonzero(as_tuple=True)[0]])
    check = torch.cat([check, (kind == FEATURE).nonzero(as_tuple=True)[0]])
    scale = recorded[check].abs().max().clamp_min(1e-30) if len(check) else 1.0
    if len(check) and not bool(((redo[check] - recorded[check]).abs() <= 1e-4 * scale).all()):
        raise error(
            "the graph was built on a different model or different transcoders than the ones "
            "passed: its token, error and feature values do not match them"
        )
    return ctx
