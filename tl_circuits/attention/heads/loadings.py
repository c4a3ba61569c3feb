"""Head loadings (DESIGN.md §3): which attention heads carried each edge of a graph.

The frozen replacement model is linear, so an edge ``s -> t`` splits exactly at every
attention layer ``m`` its signal crosses::

    A[t, s] = bypass[m] + sum_h loading[m, h]

**Source side.** Source ``s`` writes ``v_w`` at its position into ``mlp_out(w)`` for each
of its write layers ``w`` (a feature: ``a * W_dec^(l_s->w)[f]`` for ``w`` in
``target_layers(l_s)``, several for a cross-layer transcoder; an error: ``error_l[p]`` at
``w = l``; a token: ``embedding[p]`` into the residual entering block 0, "``w = -1``").
:meth:`FrozenLinearModel.forward_residuals` propagates it through the *direct-effect* model
(frozen attention and norms, the transcoders' skip path; features cut), giving ``x_m``,
its part of ``resid_pre(m)``.

**Target side.** :meth:`FrozenLinearModel.backward_residuals` gives, for the target row,
the gradient ``g_m`` on the output of layer ``m``'s attention (``resid_mid(m)`` in a
sequential block, ``resid_post(m)`` in a parallel one) and ``G_w`` on each ``mlp_out(w)``.

**Split at layer m.** Writes with ``w < m`` reach layer ``m`` as ``x_m``; writes with
``w >= m`` enter after layer ``m``'s attention and go around it. So, exactly,

- ``loading[m, h] = sum_pos g_m · Attn_{m,h}(x_m)`` (post-attention norm included);
- ``bypass[m] = sum_pos g_m · x_m`` (sequential) or
  ``sum_pos g_m · (x_m + W_skip mlp_in(x_m))`` (parallel: the layer-``m`` skip MLP reads
  ``resid_pre(m)`` beside the attention) ``+ sum_{w >= m} v_w · G_w``.

``bypass`` is computed from these terms, not as ``edge - sum loading``; that the two agree
with the graph's adjacency entry (computed independently by the graph build's reverse
pass) is invariant H1.

**Crossed layers.** For a source whose first write is at ``w0`` (feature: its layer;
error: its layer; token: ``-1``) and a target reading at layer ``l_t`` (a feature reads
``x_in(l_t)``; graph targets read after the last block, ``l_t = n_layers``):

- sequential blocks (GPT-2, Llama, Qwen3, Gemma-2 incl. sandwich norms):
  ``w0 < m <= l_t`` (``m <= n_layers - 1`` for targets): ``x_in(l_t)`` reads
  ``resid_mid(l_t)``, after layer ``l_t``'s attention;
- parallel blocks (Pythia): ``w0 < m < l_t``: ``x_in(l_t)`` reads ``resid_pre(l_t)``,
  beside layer ``l_t``'s attention, not after it. An edge between adjacent layers crosses
  no attention layer at all; for graph targets every ``m > w0`` is crossed.

Outside the crossed layers ``loadings`` and ``bypass`` are 0.

**Cross-layer transcoders.** With ``split_write_layers=True`` each edge is also split by
the write layer of the source (``write_layers = [-1, 0, ..., n_layers - 1]``, ``-1`` the
token embedding): ``loadings_by_write[e, j, m, h]``, ``bypass_by_write[e, j, m]`` and
``values_by_write[e, j]`` sum over ``j`` to ``loadings``, ``bypass`` and ``edge_values``;
for each write ``j`` and crossed layer ``m``, ``bypass_by_write + loadings_by_write.sum(-1)
== values_by_write`` (a write at or after ``m`` is all bypass at ``m``).

GQA models report query heads (``W_V`` expanded to query heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
import torch
from torch import Tensor

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.context import graph_context
from tl_circuits.graph.nodes import ERROR, FEATURE, KINDS, TARGET, TOKEN
from tl_circuits.replacement.frozen import FrozenLinearModel
from tl_circuits.typing import Bool, Float, Int, typechecked

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_circuits.graph.graph import AttributionGraph
    from tl_circuits.replacement.context import ReplacementContext
    from tl_circuits.transcoders.base import Transcoders


class HeadLoadingError(TLCircuitsError):
    """Head loadings cannot be computed for these inputs (no context, bad edges, ...)."""


def crossed_layers(n_layers: int, parallel: bool, first_write: int, read_layer: int) -> list[int]:
    """Attention layers crossed by an edge (module docstring): the source's first write
    is at ``first_write`` (-1 for tokens), the target reads at ``read_layer``
    (``n_layers`` for graph targets)."""
    if read_layer >= n_layers:
        top = n_layers - 1
    else:
        top = read_layer - 1 if parallel else read_layer
    return list(range(first_write + 1, top + 1))


@typechecked
@dataclass(frozen=True)
class HeadLoadings:
    """Per-head split of graph edges (DESIGN.md §3; maths in the module docstring).

    - ``edges``: ``(target, source)`` node indices into the graph's nodes
    - ``edge_values``: the graph's adjacency entries ``A[target, source]``
    - ``loadings[e, m, h]``: part of edge ``e`` through head ``h`` of layer ``m``
    - ``bypass[e, m]``: part of edge ``e`` around layer ``m``'s attention
    - ``crossed[e, m]``: layer ``m``'s attention lies between source and target; where
      False, ``loadings`` and ``bypass`` are 0
    - with ``split_write_layers``: ``write_layers`` (``[-1, 0, ..., n_layers - 1]``) and
      ``loadings_by_write``, ``bypass_by_write``, ``values_by_write`` split by the layer
      the source writes at (they sum over that axis to the unsplit fields)
    """

    edges: Int[Tensor, "n_edges 2"]
    edge_values: Float[Tensor, " n_edges"]
    loadings: Float[Tensor, "n_edges n_layers n_heads"]
    bypass: Float[Tensor, "n_edges n_layers"]
    crossed: Bool[Tensor, "n_edges n_layers"]
    write_layers: Int[Tensor, " n_writes"] | None = None
    loadings_by_write: Float[Tensor, "n_edges n_writes n_layers n_heads"] | None = None
    bypass_by_write: Float[Tensor, "n_edges n_writes n_layers"] | None = None
    values_by_write: Float[Tensor, "n_edges n_writes"] | None = None

    @classmethod
    def compute(
        cls,
        graph: AttributionGraph,
        edges: Tensor | Sequence[Sequence[int]] | None = None,
        *,
        split_write_layers: bool = False,
        model: HookedTransformer | None = None,
        transcoders: Transcoders | None = None,
        target_batch: int | None = None,
        source_batch: int | None = None,
        edge_chunk: int = 4096,
        memory_bytes: int | None = None,
    ) -> HeadLoadings:
        """Head loadings of ``edges`` of ``graph``.

        ``edges``: None (every nonzero entry of ``graph.adjacency``; for a pruned graph its
        kept edges) or ``(target, source)`` node-index pairs (list or ``[n, 2]`` tensor),
        each a nonzero adjacency entry. ``split_write_layers``: also split each edge by the
        layer its source writes at (cross-layer transcoders; fields ``*_by_write``).
        ``model``/``transcoders``: needed only for a graph without its replacement context
        (one loaded from disk): the context is rebuilt on the graph's prompt.

        Cost: one reverse pass per distinct target row and one forward pass per distinct
        source per batch of targets, then one contraction per (edge, crossed layer).
        ``memory_bytes`` (default: 4 GiB or half the available memory, whichever is less)
        bounds the recorded gradients and forward contributions held at once (it sets the
        batch sizes unless ``target_batch`` / ``source_batch`` cap them);
        ``edge_chunk``: edges per gathered contraction.
        """
        for name, value in (
            ("target_batch", target_batch),
            ("source_batch", source_batch),
            ("edge_chunk", edge_chunk),
            ("memory_bytes", memory_bytes),
        ):
            if value is None and name != "edge_chunk":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise HeadLoadingError(f"{name} must be a positive integer, got {value!r}")
        if memory_bytes is None:
            memory_bytes = min(4 * 2**30, psutil.virtual_memory().available // 2)
        ctx = graph_context(graph, model, transcoders, error=HeadLoadingError)
        edge_index = _edge_list(graph, edges)
        with torch.no_grad():
            return _compute(
                graph,
                ctx,
                edge_index,
                split_write_layers,
                target_batch,
                source_batch,
                edge_chunk,
                memory_bytes,
            )

    # ---- views ---------------------------------------------------------------------------

    @property
    def n_edges(self) -> int:
        return int(self.edges.shape[0])

    def edge_index(self, target: int, source: int) -> int:
        """Row of edge ``(target, source)`` in these loadings."""
        hit = ((self.edges[:, 0] == target) & (self.edges[:, 1] == source)).nonzero()
        if hit.numel() == 0:
            raise HeadLoadingError(f"edge ({target}, {source}) is not among these loadings")
        return int(hit[0, 0])

    def top_heads(self, edge_i: int, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` (layer, head, loading) of edge row ``edge_i`` largest in magnitude."""
        if not -self.n_edges <= edge_i < self.n_edges:
            raise HeadLoadingError(f"edge row {edge_i} out of range for {self.n_edges} edges")
        lo = self.loadings[edge_i]
        flat = lo.abs().flatten()
        top = torch.argsort(flat, descending=True)[: min(k, flat.numel())]
        n_heads = lo.shape[1]
        return [
            (int(i) // n_heads, int(i) % n_heads, float(lo.flatten()[i]))
            for i in top.tolist()
            if bool(self.crossed[edge_i, int(i) // n_heads])
        ]

    def edges_for_head(self, layer: int, head: int, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` edges (target, source, loading) head ``(layer, head)`` carries most
        (largest ``|loading|``)."""
        _, n_layers, n_heads = self.loadings.shape
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise HeadLoadingError(
                f"head ({layer}, {head}) out of range: {n_layers} layers x {n_heads} heads"
            )
        col = self.loadings[:, layer, head]
        top = torch.argsort(col.abs(), descending=True)[: min(k, self.n_edges)]
        return [
            (int(self.edges[i, 0]), int(self.edges[i, 1]), float(col[i]))
            for i in top.tolist()
            if float(col[i]) != 0.0
        ]

    def head_totals(self) -> Float[Tensor, "n_layers n_heads"]:
        """Sum over edges of ``|loading|`` per head: which heads matter for this prompt."""
        return self.loadings.abs().sum(0)

    # ---- inputs ---------------------------------------------------------------------------------


def _edge_list(graph: AttributionGraph, edges: Tensor | Sequence[Sequence[int]] | None) -> Tensor:
    adjacency = graph.adjacency
    n = graph.n_nodes
    kind = graph.nodes.kind.to(adjacency.device)
    if edges is None:
        out = (adjacency != 0).nonzero()
        return out.cpu()
    if isinstance(edges, Tensor):
        index = edges
    else:
        try:
            index = torch.as_tensor([[int(a), int(b)] for a, b in edges], dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise HeadLoadingError(
                f"edges must be (target, source) node-index pairs, got {edges!r}"
            ) from exc
        if index.numel() == 0:
            index = index.reshape(0, 2)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise HeadLoadingError(f"edge indices must be integers, got {index.dtype}")
    if index.dim() != 2 or index.shape[1] != 2:
        raise HeadLoadingError(
            f"edges must have shape [n_edges, 2] (target, source), got {tuple(index.shape)}"
        )
    index = index.long().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        bad = index[((index < 0) | (index >= n)).any(1)][0].tolist()
        raise HeadLoadingError(f"edge {tuple(bad)} has a node index out of range ({n} nodes)")
    if index.numel():
        tgt_kind = kind.cpu()[index[:, 0]]
        wrong = (tgt_kind != FEATURE) & (tgt_kind != TARGET)
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0, 0])
            t, s = index[i].tolist()
            raise HeadLoadingError(
                f"edge ({t}, {s}): node {t} is a {KINDS[int(tgt_kind[i])]} node, which has no "
                "incoming edges (targets of edges are feature or target nodes)"
            )
        values = adjacency[index[:, 0].to(adjacency.device), index[:, 1].to(adjacency.device)]
        zero = (values == 0).cpu()
        if bool(zero.any()):
            t, s = index[int(zero.nonzero()[0, 0])].tolist()
            raise HeadLoadingError(
                f"({t}, {s}) is not an edge of the graph: adjacency[{t}, {s}] is 0 (pruned, "
                f"or {graph.node_label(s)!r} has no direct effect on {graph.node_label(t)!r})"
            )
    return index


# ---- computation ----------------------------------------------------------------------------


@dataclass
class _TargetSide:
    """Per-layer target gradients of one batch of target rows, ready for contraction."""

    gv: list[Tensor]  # [heads, T, pos * d_head]: attention adjoint up to W_V
    gb: list[Tensor]  # [T, pos * d_model]: bypass gradient
    post: list[Tensor]  # [T, pos, d_model]: gradient on mlp_out(w) (write values)
    embed: Tensor  # [T, pos, d_model]: gradient on the embeddings


def _target_side(
    lin: FrozenLinearModel, ctx: ReplacementContext, graph: AttributionGraph, rows: list[int]
) -> _TargetSide:
    """Reverse pass of the target rows ``rows`` (node indices) with every residual
    gradient a loading needs (``bypass`` gradient: module docstring)."""
    nodes = graph.nodes
    dtype, device = ctx.embeddings.dtype, ctx.embeddings.device
    batch, n_pos, d_model = len(rows), ctx.n_pos, lin.d_model
    first_target = int(graph.indices("target")[0]) if graph.nodes.count("target") else 0
    seeds: dict[int, Tensor] = {}
    final_seed = None
    for i, t in enumerate(rows):
        if int(nodes.kind[t]) == TARGET:
            target = graph.targets[t - first_target]
            if final_seed is None:
                final_seed = torch.zeros(batch, n_pos, d_model, dtype=dtype, device=device)
            final_seed[i, target.pos] = target.vector.to(device, dtype)
        else:
            layer, pos = int(nodes.layer[t]), int(nodes.pos[t])
            if layer not in seeds:
                seeds[layer] = torch.zeros(batch, n_pos, d_model, dtype=dtype, device=device)
            w_enc = ctx.transcoders.encoder(layer).W_enc[:, int(nodes.feature[t])]
            seeds[layer][i, pos] = w_enc.to(device, dtype)
    grads = lin.backward_residuals(seeds, final_seed, batch)
    gv, gb = [], []
    for block, g in zip(lin.blocks, grads.attn_out, strict=True):
        gz = torch.einsum("bqd,hed->bqhe", block.post_attn.adjoint(g), block.W_O)
        v = torch.einsum("hqk,bqhe->hbke", block.pattern, gz)
        gv.append(v.reshape(v.shape[0], batch, -1))
        if block.parallel and block.W_skip is not None:
            g = g + block.mlp_in.adjoint(g @ block.W_skip)
        gb.append(g.reshape(batch, -1))
    return _TargetSide(gv, gb, grads.post, grads.embed)


@dataclass
class _Writes:
    """What each distinct source writes: for write index ``j`` (write layer ``j - 1``),
    ``rows[j]`` (sources that write there, indices into the distinct sources) and
    ``vectors[j]`` ``[len(rows[j]), d_model]``; ``slot[j]``: source -> row or -1."""

    rows: list[Tensor]
    vectors: list[Tensor]
    slot: Tensor  # [n_writes, n_sources]
    first: Tensor  # [n_sources]: first write layer


def _source_writes(ctx: ReplacementContext, graph: AttributionGraph, sources: Tensor) -> _Writes:
    nodes = graph.nodes
    kind = nodes.kind.cpu()[sources]
    layer = nodes.layer.cpu()[sources]
    pos = nodes.pos.cpu()[sources]
    feat = nodes.feature.cpu()[sources]
    act = nodes.activation[sources.to(nodes.activation.device)]
    n_layers, n_src = ctx.n_layers, len(sources)
    dtype, device = ctx.embeddings.dtype, ctx.embeddings.device
    tcs, d_model = ctx.transcoders, int(ctx.model.cfg.d_model)
    rows: list[list[Tensor]] = [[] for _ in range(n_layers + 1)]
    vecs: list[list[Tensor]] = [[] for _ in range(n_layers + 1)]
    bad = (kind != FEATURE) & (kind != ERROR) & (kind != TOKEN)
    if bool(bad.any()):
        raise HeadLoadingError(f"a {KINDS[int(kind[bad][0])]} node cannot be the source of an edge")
    tok = (kind == TOKEN).nonzero(as_tuple=True)[0]
    if len(tok):
        rows[0].append(tok)
        vecs[0].append(ctx.embeddings[pos[tok].to(device)])
    for la in range(n_layers):
        err = ((kind == ERROR) & (layer == la)).nonzero(as_tuple=True)[0]
        if len(err):
            rows[la + 1].append(err)
            vecs[la + 1].append(ctx.errors[la][pos[err].to(device)])
        fs = ((kind == FEATURE) & (layer == la)).nonzero(as_tuple=True)[0]
        if len(fs):
            a = act[fs.to(act.device)].to(device, dtype)[:, None]
            for w in tcs.target_layers(la):
                rows[w + 1].append(fs)
                vecs[w + 1].append(a * tcs.decoder(la, w)[feat[fs].to(device)].to(dtype))
    slot = torch.full((n_layers + 1, n_src), -1, dtype=torch.long)
    out_rows, out_vecs = [], []
    for j in range(n_layers + 1):
        r = torch.cat(rows[j]) if rows[j] else torch.zeros(0, dtype=torch.long)
        v = torch.cat(vecs[j]) if vecs[j] else torch.zeros(0, d_model, dtype=dtype, device=device)
        slot[j, r] = torch.arange(len(r))
        out_rows.append(r)
        out_vecs.append(v)
    first = torch.where(kind == TOKEN, -1, layer)
    return _Writes(out_rows, out_vecs, slot, first)


def _batch_for(budget_bytes: int, per_item_bytes: int, cap: int | None) -> int:
    n = max(1, budget_bytes // max(1, per_item_bytes))
    return n if cap is None else min(n, cap)


def _compute(
    graph: AttributionGraph,
    ctx: ReplacementContext,
    edges: Tensor,
    split: bool,
    target_batch: int | None,
    source_batch: int | None,
    edge_chunk: int,
    memory_bytes: int,
) -> HeadLoadings:
    lin = ctx.linear
    n_layers, n_pos, d_model = lin.n_layers, ctx.n_pos, lin.d_model
    n_heads = lin.blocks[0].W_O.shape[0]
    dtype, device = ctx.embeddings.dtype, ctx.embeddings.device
    elt = ctx.embeddings.element_size()
    nodes = graph.nodes
    kind = nodes.kind.cpu()
    layer_of = nodes.layer.cpu()
    pos_of = nodes.pos.cpu()
    n_edges, n_writes = len(edges), n_layers + 1

    # crossed layers per edge (module docstring)
    t_nodes, s_nodes = edges[:, 0], edges[:, 1]
    first = torch.where(kind[s_nodes] == TOKEN, -1, layer_of[s_nodes])
    read = torch.where(kind[t_nodes] == TARGET, n_layers, layer_of[t_nodes])
    top = torch.where(read >= n_layers, n_layers - 1, read - 1 if lin.parallel else read)
    m_idx = torch.arange(n_layers)
    crossed = (m_idx[None] > first[:, None]) & (m_idx[None] <= top[:, None])

    loadings = torch.zeros(n_edges, n_layers, n_heads, dtype=dtype, device=device)
    attn_bypass = torch.zeros(n_edges, n_layers, dtype=dtype, device=device)
    values_w = torch.zeros(n_edges, n_writes, dtype=dtype, device=device)
    lo_w = by_w = None
    if split:
        lo_w = torch.zeros(n_edges, n_writes, n_layers, n_heads, dtype=dtype, device=device)
        by_w = torch.zeros(n_edges, n_writes, n_layers, dtype=dtype, device=device)

    # distinct sources and their writes; units = sources (or (source, write) if split)
    sources, e_src = torch.unique(s_nodes, return_inverse=True)
    writes = _source_writes(ctx, graph, sources)
    has = writes.slot >= 0  # [n_writes, n_sources]
    if split:
        u_j, u_src = has.nonzero(as_tuple=True)  # write index, source
    else:
        u_src = torch.arange(len(sources))
        u_j = torch.full_like(u_src, -1)  # all writes
    # order units by the layer their signal starts at, so a forward chunk starts late
    u_start = torch.where(u_j >= 0, u_j, writes.first[u_src] + 1)
    order = torch.argsort(u_start, stable=True)
    u_j, u_src, u_start = u_j[order], u_src[order], u_start[order]
    # pairs (edge, unit)
    if split:
        unit_of = torch.full(has.shape, -1, dtype=torch.long)  # [write, source] -> unit
        unit_of[u_j, u_src] = torch.arange(len(u_src))
        per = has[:, e_src].T  # [n_edges, n_writes]
        p_e, p_j = per.nonzero(as_tuple=True)
        p_u = unit_of[p_j, e_src[p_e]]
    else:
        p_e = torch.arange(n_edges)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order))
        p_u = inv[e_src]
        p_j = torch.full_like(p_e, -1)
    # a unit's contribution reaches layer m only if it started before m
    p_start = u_start[p_u]

    # targets ordered by reading layer (a batch of low targets stops its pass early)
    targets = torch.unique(t_nodes)
    targets = targets[torch.argsort(read_of(kind, layer_of, targets, n_layers), stable=True)]
    per_target = (4 * n_layers + 2) * n_pos * d_model * elt  # peak, during the pass
    per_unit = (n_layers + 2) * n_pos * d_model * elt
    # most of the memory to the target side: each target batch forwards its sources again
    t_batch = _batch_for(memory_bytes * 3 // 4, per_target, target_batch)
    u_batch = _batch_for(memory_bytes // 8, per_unit, source_batch)
    e_target_pos = torch.empty(n_edges, dtype=torch.long)
    for t0 in range(0, len(targets), t_batch):
        rows = targets[t0 : t0 + t_batch]
        side = _target_side(lin, ctx, graph, rows.tolist())
        local = torch.full((graph.n_nodes,), -1, dtype=torch.long)
        local[rows] = torch.arange(len(rows))
        in_chunk = local[t_nodes] >= 0
        e_target_pos[in_chunk] = local[t_nodes[in_chunk]]
        # value of each write: v_w · G_w at the source's position
        for j in range(n_writes):
            e = (in_chunk & has[j, e_src]).nonzero(as_tuple=True)[0]
            if len(e) == 0:
                continue
            v = writes.vectors[j][writes.slot[j, e_src[e]].to(device)]
            g = side.embed if j == 0 else side.post[j - 1]
            gsel = g[e_target_pos[e].to(device), pos_of[s_nodes[e]].to(device)]
            values_w[e.to(device), j] = (v * gsel).sum(-1)
        side.post, side.embed = [], side.embed[:0]
        pairs = in_chunk[p_e].nonzero(as_tuple=True)[0]
        if len(pairs) == 0:
            continue
        units = torch.unique(p_u[pairs])
        for u0 in range(0, len(units), u_batch):
            chunk = units[u0 : u0 + u_batch]
            nb = len(chunk)
            start = int(u_start[chunk].min())
            fwd_writes: dict[int, Tensor] = {}
            embed = None
            for j in range(n_writes):
                sel = (has[j, u_src[chunk]] & ((u_j[chunk] == j) | (u_j[chunk] < 0))).nonzero(
                    as_tuple=True
                )[0]
                if len(sel) == 0:
                    continue
                src = u_src[chunk[sel]]
                buf = torch.zeros(nb, n_pos, d_model, dtype=dtype, device=device)
                buf[sel.to(device), pos_of[sources[src]].to(device)] = writes.vectors[j][
                    writes.slot[j, src].to(device)
                ]
                if j == 0:
                    embed = buf
                else:
                    fwd_writes[j - 1] = buf
            pair_top = top[p_e[pairs]]  # last crossed layer of each pair in this chunk
            stop = int(pair_top.max()) if len(pair_top) else n_layers - 1
            resid = lin.forward_residuals(fwd_writes, embed, start=max(start, 0), stop=stop)
            u_local = torch.full((len(u_src),), -1, dtype=torch.long)
            u_local[chunk] = torch.arange(nb)
            block_pairs = pairs[u_local[p_u[pairs]] >= 0]
            for m in range(max(start, 0), stop + 1):
                block = lin.blocks[m]
                bp = block_pairs[crossed[p_e[block_pairs], m] & (p_start[block_pairs] <= m)]
                if len(bp) == 0:
                    continue
                x = resid[m]
                vx = torch.einsum("bkm,hme->hbke", block.ln1.forward_linear(x), block.W_V)
                vx = vx.reshape(n_heads, nb, -1)
                xf = x.reshape(nb, -1)
                ti_all = e_target_pos[p_e[bp]]
                ui_all = u_local[p_u[bp]]
                n_t = int(side.gb[m].shape[0])
                dense = 4 * len(bp) >= n_t * nb
                if dense:
                    lo_all = torch.bmm(side.gv[m], vx.transpose(1, 2))  # [H, T, U]
                    by_all = side.gb[m] @ xf.T  # [T, U]
                for c0 in range(0, len(bp), edge_chunk):
                    ti = ti_all[c0 : c0 + edge_chunk].to(device)
                    ui = ui_all[c0 : c0 + edge_chunk].to(device)
                    if dense:
                        lo = lo_all[:, ti, ui].T
                        by = by_all[ti, ui]
                    else:
                        lo = (side.gv[m][:, ti] * vx[:, ui]).sum(-1).T  # [n, H]
                        by = (side.gb[m][ti] * xf[ui]).sum(-1)
                    e_glob = p_e[bp[c0 : c0 + edge_chunk]].to(device)
                    loadings[:, m].index_add_(0, e_glob, lo)
                    attn_bypass[:, m].index_add_(0, e_glob, by)
                    if split:
                        assert lo_w is not None and by_w is not None
                        j = p_j[bp[c0 : c0 + edge_chunk]].to(device)
                        lo_w[e_glob, j, m] += lo
                        by_w[e_glob, j, m] += by
            del resid

    # writes at or after layer m go around its attention
    mask = crossed.to(device)
    later = values_w[:, 1:].flip(1).cumsum(1).flip(1)  # [n, n_layers]: sum over w >= m
    loadings = loadings * mask[:, :, None]
    bypass = torch.where(mask, attn_bypass + later, torch.zeros_like(attn_bypass))
    adjacency = graph.adjacency
    edge_values = adjacency[t_nodes.to(adjacency.device), s_nodes.to(adjacency.device)]
    extra: dict[str, Any] = {}
    if split:
        assert lo_w is not None and by_w is not None
        w_layer = torch.arange(-1, n_layers, device=device)
        after = w_layer[None, :, None] >= torch.arange(n_layers, device=device)[None, None, :]
        later_w = values_w[:, :, None] * after  # [n, writes, layers]
        extra = dict(
            write_layers=torch.arange(-1, n_layers),
            loadings_by_write=lo_w * mask[:, None, :, None],
            bypass_by_write=torch.where(mask[:, None, :], by_w + later_w, torch.zeros_like(by_w)),
            values_by_write=values_w,
        )
    return HeadLoadings(
        edges=edges.clone(),
        edge_values=edge_values.to(device, dtype),
        loadings=loadings,
        bypass=bypass,
        crossed=mask,
        **extra,
    )


def read_of(kind: Tensor, layer: Tensor, index: Tensor, n_layers: int) -> Tensor:
    """Reading layer of target rows ``index`` (``n_layers`` for graph targets)."""
    return torch.where(kind[index] == TARGET, n_layers, layer[index])
