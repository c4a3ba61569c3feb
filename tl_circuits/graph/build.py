"""Building an attribution graph: nodes, targets and exact direct-effect edges.

Edges come from reverse-mode passes of :class:`~tl_circuits.replacement.frozen.FrozenLinearModel`
seeded at target rows: a feature row's seed is its encoder vector ``W_enc[:, f]`` on
``x_in(layer)`` at its position; a target's seed is its read-out vector on the final norm's
output. As the gradient ``G_l`` on each MLP output passes by, the edges from sources that
write there are read off: a feature ``(s, p, f)`` contributes ``a * W_dec^(s->l)[f] · G_l[p]``
summed over the layers it writes to; an error ``(l, p)`` contributes ``error_l[p] · G_l[p]``;
a token ``p`` contributes ``embedding[p] · G_embed[p]``.

The constants ``c_t`` (biases, ``b_dec``, ``b_V``/``b_O``, norm biases, ``b_U``) come from an
independent forward pass of the replacement model with every node set to zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psutil
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.causal_adjacency import CausalAdjacency, causal_groups
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import (
    ERROR,
    FEATURE,
    TARGET,
    TOKEN,
    NodeTable,
    Target,
    normalized_target_weights,
)
from tl_circuits.graph.targets import resolve_targets, target_values
from tl_circuits.model.prompt import Prompt
from tl_circuits.replacement.context import FeatureTable, ReplacementContext
from tl_circuits.replacement.frozen import BackwardWorkspace, SparseSeeds
from tl_circuits.transcoders.base import Transcoders


class FeatureEdgeSink:
    """Turns MLP-output gradients into edge values for one batch of rows, in place.

    Active features are sorted by (layer, pos, feature), so the columns of the features of
    source layer ``s`` at position ``p`` form one range ``[c0, c1)``. For each write layer
    ``l`` and each such range, the decoder rows ``W_dec^(s->l)[f]`` are gathered into a
    reused buffer and one GEMM ``G_l[:, p] @ W_dec[f].T`` accumulates into the columns; the
    activations scale the feature columns once per batch (:meth:`finish`). Rows are written
    into a ``[batch_size, n_cols]`` buffer allocated once.
    """

    def __init__(
        self, ctx: ReplacementContext, features: FeatureTable, n_cols: int, batch_size: int
    ) -> None:
        tcs = ctx.transcoders
        self.ctx = ctx
        self.n_cols = n_cols
        self.n_features = len(features)
        n_pos, dtype, device = ctx.n_pos, ctx.embeddings.dtype, ctx.embeddings.device
        self.feature_ids = features.feature
        self.activation = features.activation.to(dtype)
        key = features.layer * n_pos + features.pos  # non-decreasing: features are sorted
        counts = torch.bincount(key, minlength=ctx.n_layers * n_pos)
        ends = torch.cumsum(counts, 0)
        # groups[l]: (source layer, pos, c0, c1) of every feature group writing to layer l
        self.groups: dict[int, list[tuple[int, int, int, int]]] = {}
        for flat in counts.nonzero(as_tuple=True)[0].tolist():
            s, pos = divmod(flat, n_pos)
            c1 = int(ends[flat])
            c0 = c1 - int(counts[flat])
            for layer in tcs.target_layers(s):
                self.groups.setdefault(layer, []).append((s, pos, c0, c1))
        widest = int(counts.max()) if len(features) else 0
        d_model = ctx.model.cfg.d_model
        self.gathered = torch.empty(widest, d_model, dtype=dtype, device=device)
        self.error_cols = [self.n_features + la * n_pos for la in range(ctx.n_layers)]
        self.token_col = self.n_features + ctx.n_layers * n_pos
        self.buffer = torch.empty(batch_size, n_cols, dtype=dtype, device=device)
        self.edges = self.buffer[:0]

    def start(self, batch: int) -> None:
        self.edges = self.buffer[:batch]
        self.edges.zero_()

    def mlp_out(self, layer: int, grad: Tensor) -> None:
        n_pos = grad.shape[1]
        decoders = self.ctx.transcoders
        for s, pos, c0, c1 in self.groups.get(layer, []):
            if pos >= n_pos:  # the batch's rows end before pos: zero gradient there
                continue
            dec = self.gathered[: c1 - c0]
            torch.index_select(decoders.decoder(s, layer), 0, self.feature_ids[c0:c1], out=dec)
            self.edges[:, c0:c1].addmm_(grad[:, pos], dec.T)
        self._dot_per_position(grad, self.ctx.errors[layer], self.error_cols[layer])

    def embeddings(self, grad: Tensor) -> None:
        self._dot_per_position(grad, self.ctx.embeddings, self.token_col)

    def _dot_per_position(self, grad: Tensor, values: Tensor, col: int) -> None:
        """``edges[:, col + p] = grad[:, p] · values[p]`` for every position ``p`` of grad."""
        n_pos = grad.shape[1]
        dots = torch.bmm(grad.transpose(0, 1), values[:n_pos, :, None])  # [pos, B, 1]
        self.edges[:, col : col + n_pos].copy_(dots[..., 0].T)

    def finish(self) -> Tensor:
        """The batch's rows ``[batch, n_cols]`` (a view of the reused buffer)."""
        self.edges[:, : self.n_features].mul_(self.activation)
        return self.edges


def _layout(
    feature_layer: Tensor, feature_pos: Tensor, n_layers: int, n_pos: int, targets: list[Target]
) -> tuple[Tensor, Tensor, Tensor]:
    """Kind, layer and position of every node, in node order: the features (given), errors
    ``(layer, pos)`` layer-major, tokens, targets (layer ``n_layers``)."""
    long = dict(dtype=torch.long)
    n_feat, n_err, n_tgt = len(feature_layer), n_layers * n_pos, len(targets)
    kind = torch.cat(
        [
            torch.full((n_feat,), FEATURE, **long),
            torch.full((n_err,), ERROR, **long),
            torch.full((n_pos,), TOKEN, **long),
            torch.full((n_tgt,), TARGET, **long),
        ]
    )
    layer = torch.cat(
        [
            feature_layer,
            torch.arange(n_layers).repeat_interleave(n_pos),
            torch.full((n_pos,), -1, **long),
            torch.full((n_tgt,), n_layers, **long),
        ]
    )
    pos = torch.cat(
        [
            feature_pos,
            torch.arange(n_pos).repeat(n_layers),
            torch.arange(n_pos),
            torch.tensor([t.pos for t in targets], **long),
        ]
    )
    return kind, layer, pos


def _zero_node_constants(ctx: ReplacementContext) -> tuple[list[Tensor], Tensor]:
    """Pre-activations (per layer, ``[pos, d_sae]``) and final-norm output ``[pos, d_model]``
    of the frozen replacement model with every node zero (the constants ``c_t``)."""
    rec, _ = ctx.run_zero_nodes()
    assert rec.final_normalized is not None
    return [rec.pre_activations[la][0] for la in range(ctx.n_layers)], rec.final_normalized[0]


def estimate_memory_bytes(
    n_rows: int,
    n_cols: int,
    n_pos: int,
    d_model: int,
    batch: int,
    n_layers: int,
    element_size: int,
    budgeted: bool = False,
    stored_elements: int | None = None,
) -> int:
    """Bytes a build needs beyond the model.

    The stored edges (``stored_elements``, the causal blocks of a full build; default the
    dense ``n_rows x n_cols``), one batch's reused buffers (the backward
    workspace, five ``[pos, batch, d_model]``-sized tensors, and the ``[batch, n_cols]``
    edge rows) and, for a budgeted build, the influence ranking's temporaries and the final
    adjacency. Decoder rows are gathered per (layer, position) group into one small buffer
    and not counted.
    """
    rows = (n_rows * n_cols if stored_elements is None else stored_elements) * element_size
    working = batch * (5 * n_pos * d_model + n_cols) * element_size
    extra = 2 * n_rows * n_rows * element_size + 128 * n_cols * element_size if budgeted else 0
    return rows + working + extra


def build_graph(
    model: HookedTransformer,
    transcoders: Transcoders,
    prompt: Prompt,
    *,
    targets: Sequence[Any] | None = None,
    max_feature_nodes: int | None = None,
    target_pos: int = -1,
    desired_logit_prob: float = 0.95,
    max_n_logits: int = 10,
    batch_size: int = 64,
    show_progress: bool = True,
    memory_limit_bytes: int | None = None,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` (DESIGN.md §2).

    ``max_feature_nodes``: keep at most this many feature nodes, chosen by influence on the
    targets computed as rows arrive; the others are listed in ``graph.excluded``.
    ``batch_size``: rows per reverse pass. ``memory_limit_bytes``: refuse when the estimate
    exceeds it (default: the available system memory).
    """
    if max_feature_nodes is not None and max_feature_nodes <= 0:
        raise TLCircuitsError(f"max_feature_nodes must be positive, got {max_feature_nodes}")
    if batch_size <= 0:
        raise TLCircuitsError(f"batch_size must be positive, got {batch_size}")
    ctx = ReplacementContext(model, transcoders, prompt)
    target_list = resolve_targets(
        ctx,
        targets,
        pos=target_pos,
        desired_probability=desired_logit_prob,
        max_logits=max_n_logits,
    )
    active = ctx.active_features()
    n_feat, n_layers, n_pos = len(active), ctx.n_layers, ctx.n_pos
    n_tgt = len(target_list)
    n_cols = n_feat + n_layers * n_pos + n_pos + n_tgt
    budget = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)
    dtype, device = ctx.embeddings.dtype, ctx.embeddings.device
    groups = None
    if budget == n_feat:  # a full graph: edges go into causal blocks
        layout = _layout(active.layer, active.pos, n_layers, n_pos, target_list)
        groups = causal_groups(*layout)
    need = estimate_memory_bytes(
        budget + n_tgt,
        n_cols,
        n_pos,
        ctx.model.cfg.d_model,
        batch_size,
        n_layers,
        ctx.embeddings.element_size(),
        budgeted=budget < n_feat,
        stored_elements=None if groups is None else sum(len(r) * len(c) for r, c in groups),
    )
    limit = (
        memory_limit_bytes if memory_limit_bytes is not None else psutil.virtual_memory().available
    )
    if need > limit:
        raise TLCircuitsError(
            f"this graph needs about {need / 2**30:.2f} GiB ({budget} feature rows x {n_cols} "
            f"columns) but {limit / 2**30:.2f} GiB is available; lower max_feature_nodes "
            f"(now {max_feature_nodes}) or batch_size (now {batch_size})"
        )

    lin = ctx.linear
    # the constants' zero-node forward pass runs before the adjacency exists, so its
    # transients (the unembedding) never coincide with it
    zero_pres, zero_final = _zero_node_constants(ctx)
    sink = FeatureEdgeSink(ctx, active, n_cols, max(batch_size, n_tgt))
    workspace = BackwardWorkspace(lin, max(batch_size, n_tgt), n_pos, dtype, device)

    def run_batch(feature_rows: Tensor | None, target_rows: list[Target] | None) -> Tensor:
        """Rows of one batch ``[batch, n_cols]``: a view of the sink's reused buffer."""
        seeds: dict[int, SparseSeeds] = {}
        final_seed = None
        if feature_rows is not None:
            batch = len(feature_rows)
            layers, poss = active.layer[feature_rows], active.pos[feature_rows]
            n_pos_batch = int(poss.max()) + 1
            for layer in layers.unique().tolist():
                in_layer = (layers == layer).nonzero(as_tuple=True)[0]
                idx = feature_rows[in_layer]
                w_enc = transcoders.encoder(layer).W_enc[:, active.feature[idx]].T
                seeds[layer] = SparseSeeds(in_layer, active.pos[idx], w_enc)
        else:
            assert target_rows is not None
            batch = len(target_rows)
            n_pos_batch = max(t.pos for t in target_rows) + 1
            d_model = ctx.model.cfg.d_model
            final_seed = torch.zeros(batch, n_pos_batch, d_model, dtype=dtype, device=device)
            for i, t in enumerate(target_rows):
                final_seed[i, t.pos] = t.vector
        sink.start(batch)
        g_embed = lin.backward(
            seeds, final_seed, sink, batch, n_pos=n_pos_batch, workspace=workspace
        )
        sink.embeddings(g_embed)
        return sink.finish()

    progress = tqdm(
        total=n_tgt + budget,
        desc="attribution rows",
        unit="row",
        disable=not show_progress,
        postfix={"est. memory": f"{need / 2**30:.2f} of {limit / 2**30:.1f} GiB"},
    )
    with torch.no_grad():
        if budget == n_feat:
            # every feature is a node: columns are already in node order; rows go into
            # causal blocks (a feature row only has sources in earlier layers at positions
            # up to its own), about a quarter of the dense matrix
            assert groups is not None
            adjacency = CausalAdjacency.from_groups(n_cols, groups, dtype, device)
            target_rows = torch.arange(n_cols - n_tgt, n_cols)
            adjacency.set_rows(target_rows, run_batch(None, target_list))
            progress.update(n_tgt)
            order = torch.argsort(active.layer, descending=True, stable=True)
            for start in range(0, n_feat, batch_size):
                idx = order[start : start + batch_size]
                adjacency.set_rows(idx, run_batch(idx, None))
                progress.update(len(idx))
            sel = torch.arange(n_feat)
            n_nodes = n_cols
        else:
            rows = torch.zeros(n_tgt + budget, n_cols, dtype=dtype, device=device)
            rows[:n_tgt] = run_batch(None, target_list)
            progress.update(n_tgt)
            chosen = _select_by_influence(
                rows, n_tgt, n_feat, budget, batch_size, target_list, run_batch, progress
            )
            sel, perm = torch.sort(chosen)  # features in (layer, pos, feature) order
            keep_cols = torch.cat([sel, torch.arange(n_feat, n_cols)])
            n_nodes = len(keep_cols)
            adjacency = torch.zeros(n_nodes, n_nodes, dtype=dtype, device=device)
            kept = rows.index_select(1, keep_cols)  # [n_tgt + budget, n_nodes]: small
            del rows
            adjacency[:budget] = kept[n_tgt + perm]
            adjacency[n_nodes - n_tgt :] = kept[:n_tgt]
            del kept
    progress.close()

    constants = torch.zeros(n_nodes, dtype=dtype, device=device)
    row_values = torch.zeros(n_nodes, dtype=dtype, device=device)
    layers, poss, feats = active.layer[sel], active.pos[sel], active.feature[sel]
    for layer in range(n_layers):
        mask = (layers == layer).nonzero(as_tuple=True)[0]
        constants[mask] = zero_pres[layer][poss[mask], feats[mask]]
        row_values[mask] = ctx.pre_activations[layer][poss[mask], feats[mask]]
    constants[n_nodes - n_tgt :] = target_values(target_list, zero_final)
    row_values[n_nodes - n_tgt :] = target_values(target_list, ctx.final_normalized)

    nodes = _node_table(ctx, active, sel, target_list, row_values[n_nodes - n_tgt :])
    excluded_idx = torch.ones(n_feat, dtype=torch.bool)
    excluded_idx[sel] = False
    excluded = _feature_nodes(active, excluded_idx.nonzero(as_tuple=True)[0])
    cfg = ctx.model.cfg
    info = {
        "model_name": cfg.model_name,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "architecture": cfg.original_architecture,
        "transcoders": type(transcoders).__name__,
        "prompt": ctx.model.to_string(ctx.tokens) if ctx.model.tokenizer is not None else None,
        "max_feature_nodes": max_feature_nodes,
        "n_active_features": n_feat,
    }
    token_strings = (
        ctx.model.to_str_tokens(ctx.tokens)
        if ctx.model.tokenizer is not None
        else [str(t) for t in ctx.tokens.tolist()]
    )
    return AttributionGraph(
        nodes=nodes,
        edges=adjacency,
        row_values=row_values,
        constants=constants,
        targets=target_list,
        tokens=ctx.tokens.clone(),
        token_strings=list(token_strings),
        excluded=excluded,
        info=info,
        context=ctx,
    )


def _select_by_influence(
    rows: Tensor,
    n_tgt: int,
    n_feat: int,
    budget: int,
    batch_size: int,
    target_list: list[Target],
    run_batch,
    progress,
) -> Tensor:
    """Compute feature rows in order of influence on the targets until ``budget``.

    Before each batch, every feature's influence on the targets is recomputed from the rows
    known so far (targets and visited features) and the top unvisited features are
    computed next. ``rows[:n_tgt]`` hold the target rows; visited features' rows are
    appended in visiting order. Returns the visited feature indices in that order.
    """
    weights = normalized_target_weights(target_list, rows.dtype).to(rows.device)
    totals = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    totals[:n_tgt] = rows[:n_tgt].abs().sum(1)
    chosen = torch.zeros(0, dtype=torch.long, device=rows.device)
    visited = torch.zeros(n_feat, dtype=torch.bool, device=rows.device)
    while len(chosen) < budget:
        n_done = len(chosen)
        influence = _influence_from_rows(rows, totals, n_tgt, chosen, n_feat, weights)
        influence[visited] = -1.0
        take = min(batch_size, budget - n_done)
        idx = torch.argsort(influence, descending=True)[:take]
        visited[idx] = True
        new = slice(n_tgt + n_done, n_tgt + n_done + take)
        rows[new] = run_batch(idx, None)
        totals[new] = rows[new].abs().sum(1)
        chosen = torch.cat([chosen, idx])
        progress.update(take)
    return chosen


def _influence_from_rows(
    rows: Tensor,
    totals: Tensor,
    n_tgt: int,
    done: Tensor,
    n_feat: int,
    weights: Tensor,
    chunk: int = 128,
) -> Tensor:
    """Influence on the targets of every feature, from the rows computed so far.

    ``B`` is ``|row| / totals`` (each row normalised by its total over all columns, as in
    pruning); influence ``= x_1 + sum_k y_k @ B_done`` with ``x_1 = w B_targets`` and
    ``y_1 = x_1[done]``, ``y_{k+1} = y_k @ B_done[:, done]``: the series runs on the small
    visited-by-visited block, and the visited rows' feature columns are read once, in
    chunks, so no copy of the row block is made.
    """
    tiny = torch.finfo(rows.dtype).tiny
    x = weights @ (rows[:n_tgt, :n_feat].abs() / totals[:n_tgt, None].clamp_min(tiny))
    n_done = len(done)
    if n_done == 0:
        return x
    scale = 1.0 / totals[n_tgt : n_tgt + n_done].clamp_min(tiny)
    square = rows[n_tgt : n_tgt + n_done].index_select(1, done).abs() * scale[:, None]
    y = x[done]
    y_sum = torch.zeros_like(y)
    for _ in range(n_done):  # a DAG: the series ends after the longest path
        y_sum += y
        y = y @ square
        if not bool(y.any()):
            break
    weight = y_sum * scale
    for start in range(0, n_done, chunk):
        block = rows[n_tgt + start : n_tgt + min(start + chunk, n_done), :n_feat].abs()
        x = x + weight[start : start + chunk] @ block
    return x


def _feature_nodes(active: FeatureTable, idx: Tensor) -> NodeTable:
    n = len(idx)
    return NodeTable(
        kind=torch.full((n,), FEATURE, dtype=torch.long),
        layer=active.layer[idx],
        pos=active.pos[idx],
        feature=active.feature[idx],
        activation=active.activation[idx],
    )


def _node_table(
    ctx: ReplacementContext,
    active: FeatureTable,
    sel: Tensor,
    target_list: list[Target],
    target_vals: Tensor,
) -> NodeTable:
    n_layers, n_pos = ctx.n_layers, ctx.n_pos
    feats = _feature_nodes(active, sel)
    err_norm = torch.stack([ctx.errors[la].norm(dim=-1) for la in range(n_layers)]).reshape(-1)
    n_err = n_layers * n_pos
    long = dict(dtype=torch.long)
    kind, layer, pos = _layout(feats.layer, feats.pos, n_layers, n_pos, target_list)
    return NodeTable(
        kind=kind,
        layer=layer,
        pos=pos,
        feature=torch.cat(
            [
                feats.feature,
                torch.full((n_err + n_pos,), -1, **long),
                torch.tensor([t.token for t in target_list], **long),
            ]
        ),
        activation=torch.cat(
            [
                feats.activation,
                err_norm.to(feats.activation.dtype),
                ctx.embeddings.norm(dim=-1).to(feats.activation.dtype),
                target_vals.to(feats.activation.dtype),
            ]
        ),
    )
