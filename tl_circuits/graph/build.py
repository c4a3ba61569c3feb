"""Building an attribution graph: nodes, targets and exact direct-effect edges.

Edges come from reverse-mode passes of
:class:`~tl_circuits.replacement.frozen.FrozenLinearModel` seeded at target rows: a feature
row's seed is its encoder vector ``W_enc[:, f]`` on ``x_in(layer)`` at its position; a
target's seed is its read-out vector on the final norm's output. As the gradient ``G_l`` on
each MLP output passes by, the edges from sources that write there are read off
(:class:`~tl_circuits.replacement.sources.ColumnSink`): a feature ``(s, p, f)`` contributes
``a * W_dec^(s->l)[f] · G_l[p]`` summed over the layers it writes to; an error ``(l, p)``
contributes ``error_l[p] · G_l[p]``; a token ``p`` contributes ``embedding[p] · G_embed[p]``.

The constants ``c_t`` (biases, ``b_dec``, ``b_V``/``b_O``, norm biases, ``b_U``) come from an
independent forward pass of the replacement model with every node set to zero.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.budget import (
    READ_ELEMENTS,
    ROW_CHUNK,
    STORE_ROWS,
    CausalRows,
    causal_sizes,
    select_by_influence,
)
from tl_circuits.graph.causal_adjacency import CausalAdjacency, causal_groups
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import (
    FEATURE,
    TARGET,
    NodeTable,
    Target,
)
from tl_circuits.graph.targets import resolve_targets, target_values
from tl_circuits.model.devices import available_memory_bytes
from tl_circuits.model.prompt import Prompt
from tl_circuits.replacement.context import FeatureTable, ReplacementContext
from tl_circuits.replacement.frozen import BackwardWorkspace, Seeds, SparseSeeds
from tl_circuits.replacement.sources import GATHER_ELEMENTS, ColumnSink, SourceColumns
from tl_circuits.storage import SpillFile
from tl_circuits.transcoders.base import Transcoders


def _zero_node_constants(ctx: ReplacementContext, features: FeatureTable) -> tuple[Tensor, Tensor]:
    """The constants ``c_t`` (DESIGN.md §2, G1): what the frozen replacement model with every
    node zero gives each active feature's pre-activation (``[n_features]``, in ``features``'
    order) and the final norm's output (``[pos, d_model]``). Only the active features'
    entries are kept: the dense ``[pos, d_sae]`` per layer would be 0.6 GB at 1,600 tokens
    on the benchmark model, held through the whole build."""
    rec, _ = ctx.run_zero_nodes()
    assert rec.final_normalized is not None
    pres = torch.empty(len(features), dtype=ctx.compute_dtype, device=ctx.embeddings.device)
    for layer in range(ctx.n_layers):
        at = (features.layer == layer).nonzero(as_tuple=True)[0]
        dense = rec.pre_activations[layer][0]
        pres[at] = ctx.in_compute(dense[features.pos[at], features.feature[at]])
    return pres, rec.final_normalized[0]


#: bytes of index bookkeeping per column of a budgeted build (:func:`estimate_memory_bytes`)
BOOKKEEPING_BYTES = 64


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
    n_nodes: int | None = None,
    final_elements: int | None = None,
) -> int:
    """Bytes a build needs beyond the model and the replacement context.

    The stored edges held in memory (``stored_elements``: the causal blocks of a full
    build, or a budgeted build's target rows and visited feature rows, or only the target
    rows when the feature rows are spilled to disk; default the dense ``n_rows x
    n_cols``), one batch's reused buffers (the backward workspace, five ``[pos, batch,
    d_model]``-sized tensors, and the ``[batch, n_cols]`` edge rows) and, for a budgeted
    build, the influence ranking's temporaries (the visited-by-visited block, whose series
    is vectors; a few rows of a batch while it is stored; a chunk of stored rows read and
    its ``|.|``; the sink's decoder gather) and the graph's edges (``final_elements``,
    default a dense ``n_nodes x n_nodes`` with ``n_nodes`` default ``n_rows``). Decoder rows
    are gathered per (layer, position) range into one small buffer and not counted.
    """
    rows = (n_rows * n_cols if stored_elements is None else stored_elements) * element_size
    working = batch * (5 * n_pos * d_model + n_cols) * element_size
    extra = 0
    if budgeted:
        nodes = n_rows if n_nodes is None else n_nodes
        final = nodes * nodes if final_elements is None else final_elements
        # storing a batch (STORE_ROWS rows at a time); reading stored rows (a chunk and its
        # |.|); the sink's padded decoder gather and its product
        read = min(ROW_CHUNK * n_cols, READ_ELEMENTS)
        gather = min(GATHER_ELEMENTS, n_cols * d_model)
        temps = 2 * STORE_ROWS * n_cols + 2 * read + 2 * gather
        extra = (n_rows * n_rows + final + temps) * element_size
        # per-column bookkeeping: the feature table, the sink's padded decoder indices, the
        # worst-case sort (int64 tensors, about 8 per column)
        extra += BOOKKEEPING_BYTES * n_cols
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
    spill_dir: str | Path | None = None,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` (DESIGN.md §2).

    ``max_feature_nodes``: keep at most this many feature nodes, chosen by influence on the
    targets computed as rows arrive; the others are listed in ``graph.excluded``.
    ``batch_size``: rows per reverse pass. ``memory_limit_bytes``: refuse when the estimate
    exceeds it (default: the free memory of the model's device, host RAM or CUDA).
    ``spill_dir``: under a budget, keep the visited feature rows (what the influence
    ranking reads; the bulk of a long prompt's memory) in a scratch file in a new private
    folder of this directory instead of in memory; the folder is removed when the build
    ends, fails or is interrupted. The graph is the same, bit for bit.

    Phases: plan (replacement context, targets, columns) -> check memory -> constants
    (zero-node pass) -> rows (reverse passes; all features, or chosen by influence under a
    budget) -> row values -> assemble.
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
    plan = _Plan.of(ctx, target_list, max_feature_nodes)
    spill = None if spill_dir is None else Path(spill_dir)
    need, limit = _check_memory(plan, batch_size, memory_limit_bytes, max_feature_nodes, spill)
    # the constants' zero-node forward pass runs before the adjacency exists, so its
    # transients (the unembedding) never coincide with it
    zero_pres, zero_final = _zero_node_constants(ctx, plan.columns.features)
    passes = _RowPasses(plan, batch_size)
    progress = tqdm(
        total=plan.n_targets + plan.budget,
        desc="attribution rows",
        unit="row",
        disable=not show_progress,
        postfix={"est. memory": f"{need / 2**30:.2f} of {limit / 2**30:.1f} GiB"},
    )
    with torch.no_grad():
        if plan.full:
            edges, selected = _all_feature_rows(plan, passes, batch_size, progress)
            tied = 0
        else:
            edges, selected, tied = _budgeted_rows(plan, passes, batch_size, progress, spill)
    progress.close()
    row_values, constants = _row_values(plan, selected, zero_pres, zero_final)
    graph = _assemble(plan, selected, edges, row_values, constants, max_feature_nodes)
    graph.info["selection_ties"] = tied
    return graph


@dataclass
class _Plan:
    """What a build computes: its context, targets, source columns and feature budget.

    Columns of the rows: the source columns (:class:`SourceColumns`) then the targets'.
    ``groups``: the causal row groups of a full graph (None under a budget)."""

    ctx: ReplacementContext
    targets: list[Target]
    columns: SourceColumns
    budget: int
    groups: list[tuple[Tensor, Tensor]] | None
    _largest_first: list[int] | None = None  # cumulative causal sizes, largest first

    @classmethod
    def of(cls, ctx: ReplacementContext, targets: list[Target], max_features: int | None) -> _Plan:
        columns = SourceColumns.of(ctx)
        n_feat = columns.n_features
        budget = n_feat if max_features is None else min(max_features, n_feat)
        groups = None
        if budget == n_feat:  # a full graph: edges go into causal blocks
            groups = causal_groups(*_node_layout(columns, None, targets))
        return cls(ctx, targets, columns, budget, groups)

    @property
    def full(self) -> bool:
        return self.groups is not None

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def n_cols(self) -> int:
        return self.columns.n_cols + self.n_targets

    def worst_stored(self, budget: int) -> int:
        """An upper bound on the elements a budgeted build stores: the target rows over
        every column and the ``budget`` feature rows with the largest causal column sets
        (which rows get visited is not known in advance)."""
        if self._largest_first is None:
            largest = torch.sort(causal_sizes(self.columns), descending=True).values
            self._largest_first = torch.cat([largest.new_zeros(1), largest.cumsum(0)]).tolist()
        cum = self._largest_first
        return self.n_targets * self.n_cols + cum[min(max(budget, 0), len(cum) - 1)]


def _node_layout(
    columns: SourceColumns, features: Tensor | None, targets: list[Target]
) -> tuple[Tensor, Tensor, Tensor]:
    """Kind, layer and position of every node: the source columns (with only the
    ``features`` rows among the features; default all), then the targets (layer
    ``n_layers``, read after the last block)."""
    kind, layer, pos = columns.layout(features)
    n_tgt = len(targets)
    return (
        torch.cat([kind, torch.full((n_tgt,), TARGET, dtype=torch.long)]),
        torch.cat([layer, torch.full((n_tgt,), columns.n_layers, dtype=torch.long)]),
        torch.cat([pos, torch.tensor([t.pos for t in targets], dtype=torch.long)]),
    )


def _check_memory(
    plan: _Plan,
    batch_size: int,
    memory_limit_bytes: int | None,
    max_feature_nodes: int | None,
    spill_dir: Path | None = None,
) -> tuple[int, int]:
    """``(estimated bytes, limit)``; raises when the estimate exceeds the limit: the
    caller's ``memory_limit_bytes`` (a positive finite number) or, when None, the free
    memory of the model's device (host RAM, or the CUDA device's own). The refusal says
    which limit it was and names only the knobs that would make the graph fit. With
    ``spill_dir`` the visited feature rows go to disk: they are checked against the free
    space there instead."""
    ctx = plan.ctx
    if memory_limit_bytes is not None:
        limit_ok = isinstance(memory_limit_bytes, (int, float)) and not isinstance(
            memory_limit_bytes, bool
        )
        if not limit_ok or not math.isfinite(memory_limit_bytes) or memory_limit_bytes <= 0:
            raise TLCircuitsError(
                f"memory_limit_bytes must be a positive finite number of bytes (or None for the "
                f"free memory of the device), got {memory_limit_bytes!r}"
            )
    spilled = spill_dir is not None and not plan.full
    if spilled:
        _check_spill_space(plan, spill_dir)

    def estimate(budget: int, batch: int, budgeted: bool, spill: bool = spilled) -> int:
        return _estimate(plan, budget, batch, budgeted, spill)

    need = estimate(plan.budget, batch_size, not plan.full)
    device = ctx.embeddings.device
    limit = (
        int(memory_limit_bytes)
        if memory_limit_bytes is not None
        else available_memory_bytes(device)
    )
    if need <= limit:
        return need, limit
    if memory_limit_bytes is not None:
        against = f"the limit you set (memory_limit_bytes={memory_limit_bytes!r}) is"
        knobs = [f"raise memory_limit_bytes (or pass None to use the free memory of {device})"]
    else:
        against = f"the free memory of {device} is"
        knobs = ["free memory on the device, run on a device with more memory"]
    if batch_size > 1 and estimate(plan.budget, 1, not plan.full) <= limit:
        knobs.append(f"lower batch_size (now {batch_size})")
    if not spilled and estimate(plan.budget, batch_size, True, True) <= limit:
        disk = _gib(plan.worst_stored(plan.budget) * ctx.compute_dtype.itemsize)
        knobs.append(f"pass spill_dir=DIR to keep the visited rows on disk (up to {disk} there)")
    # the largest feature budget that fits (the estimate grows with the budget)
    lo, hi = 0, plan.budget - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(mid, batch_size, True) <= limit:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 1:
        now = "all features" if max_feature_nodes is None else max_feature_nodes
        knobs.append(f"set max_feature_nodes to at most about {lo} (now {now})")
    raise TLCircuitsError(
        f"this graph needs about {_gib(need)} ({plan.budget} feature rows x {plan.n_cols} "
        f"columns, batch_size {batch_size}) but {against} {_gib(limit)}; " + "; or ".join(knobs)
    )


def _estimate(plan: _Plan, budget: int, batch: int, budgeted: bool, spilled: bool) -> int:
    """:func:`estimate_memory_bytes` of ``plan`` with ``budget`` feature rows (a full
    build: its causal blocks; a budgeted one: the worst case of what it stores, in memory
    or, ``spilled``, only the target rows in memory)."""
    ctx, n_tgt = plan.ctx, plan.n_targets
    n_other = plan.n_cols - plan.columns.n_features - n_tgt  # errors, tokens
    if budgeted:
        stored = n_tgt * plan.n_cols if spilled else plan.worst_stored(budget)
    else:
        assert plan.groups is not None
        stored = sum(len(r) * len(c) for r, c in plan.groups)
    n_nodes = budget + n_other + n_tgt
    return estimate_memory_bytes(
        budget + n_tgt,
        plan.n_cols,
        ctx.n_pos,
        ctx.model.cfg.d_model,
        batch,
        ctx.n_layers,
        ctx.compute_dtype.itemsize,
        budgeted=budgeted,
        stored_elements=stored,
        n_nodes=n_nodes,
        # the graph's causal blocks: each feature row over at most every kept source
        final_elements=budget * (budget + n_other) + n_tgt * n_nodes,
    )


def _check_spill_space(plan: _Plan, spill_dir: Path) -> None:
    """Refuse a spill directory that is not a directory or lacks the free space for the
    worst case of the visited rows."""
    if not spill_dir.is_dir():
        raise TLCircuitsError(f"spill_dir {spill_dir} is not a directory")
    rows = plan.worst_stored(plan.budget) - plan.n_targets * plan.n_cols
    need = rows * plan.ctx.compute_dtype.itemsize
    free = shutil.disk_usage(spill_dir).free
    if need > free:
        raise TLCircuitsError(
            f"the visited rows may need up to {_gib(need)} in spill_dir {spill_dir} but it "
            f"has {_gib(free)} free; choose a directory with more space or lower "
            f"max_feature_nodes (now {plan.budget})"
        )


def _gib(n_bytes: float) -> str:
    """``n_bytes`` in GiB, with the exact byte count when that rounds to 0.00 GiB."""
    gib = n_bytes / 2**30
    return f"{gib:.2f} GiB" if gib >= 0.01 else f"{gib:.2g} GiB ({int(n_bytes):,} bytes)"


class _RowPasses:
    """Rows of the adjacency by reverse passes of the frozen linear model: a feature row is
    seeded with its encoder vector ``W_enc[:, f]`` on ``x_in(layer)`` at its position, a
    target row with its read-out vector on the final norm's output. Each batch returns
    ``[batch, n_cols]``, a view of one reused buffer."""

    def __init__(self, plan: _Plan, batch_size: int) -> None:
        ctx = plan.ctx
        self.ctx, self.features = ctx, plan.columns.features
        width = max(batch_size, plan.n_targets)
        self.sink = ColumnSink(ctx, plan.columns, plan.n_cols, width)
        dtype, device = ctx.compute_dtype, ctx.embeddings.device
        self.workspace = BackwardWorkspace(ctx.linear, width, ctx.n_pos, dtype, device)

    def feature_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(rows in pass order, their rows [n, n_cols])`` of the active features ``rows``
        (indices into the feature table). A row at (layer ``l``, position ``p``) needs only
        layers ``<= l`` and positions ``<= p``, so the batch is reordered by that reach and
        run as the passes :func:`split_by_reach` plans, each stopping where its rows do."""
        features = self.features
        order, runs = split_by_reach(
            features.layer[rows], features.pos[rows], self.ctx.n_layers, self.ctx.n_pos
        )
        rows = rows[order]
        for start, stop in runs:
            self._feature_pass(rows[start:stop], start)
        return rows, self.sink.rows(len(rows))

    def _feature_pass(self, rows: Tensor, offset: int) -> None:
        """One reverse pass for ``rows``, written at slots ``offset ..`` of the sink."""
        features, tcs = self.features, self.ctx.transcoders
        layers, poss = features.layer[rows], features.pos[rows]
        seeds: dict[int, SparseSeeds] = {}
        for layer in layers.unique().tolist():
            in_layer = (layers == layer).nonzero(as_tuple=True)[0]
            idx = rows[in_layer]
            w_enc = self.ctx.in_compute(tcs.encoder(layer).W_enc[:, features.feature[idx]].T)
            seeds[layer] = SparseSeeds(in_layer, features.pos[idx], w_enc)
        self._run(seeds, None, len(rows), int(poss.max()) + 1, offset=offset)

    def target_rows(self, targets: list[Target]) -> Tensor:
        """Rows of ``targets``."""
        ctx = self.ctx
        n_pos = max(t.pos for t in targets) + 1
        dtype, device = ctx.compute_dtype, ctx.embeddings.device
        seed = torch.zeros(len(targets), n_pos, ctx.model.cfg.d_model, dtype=dtype, device=device)
        for i, t in enumerate(targets):
            seed[i, t.pos] = t.vector
        return self._run({}, seed, len(targets), n_pos)

    def _run(
        self,
        seeds: dict[int, SparseSeeds],
        final_seed: Tensor | None,
        batch: int,
        n_pos: int,
        offset: int = 0,
    ) -> Tensor:
        self.sink.start(batch, offset)
        g_embed = self.ctx.linear.backward(
            Seeds(x_in=seeds, final=final_seed),
            self.sink,
            batch,
            n_pos=n_pos,
            workspace=self.workspace,
        )
        self.sink.embeddings(g_embed)
        return self.sink.finish()


#: a reverse pass's fixed cost, in rows reaching every layer and position (the sink's
#: per-range reads and the per-layer launches do not shrink with the batch)
PASS_OVERHEAD_ROWS = 4


def split_by_reach(
    layers: Tensor, poss: Tensor, n_layers: int, n_pos: int
) -> tuple[Tensor, list[tuple[int, int]]]:
    """How to run a batch of feature rows (at ``layers``, ``poss``) as reverse passes:
    ``(order, runs)``, the rows reordered and cut into runs ``[start, stop)`` of it.

    A pass over rows whose deepest layer is ``L`` and last position ``P`` costs about
    ``rows x (L + 1) x (P + 1)`` (its GEMMs run over ``L + 1`` blocks and ``P + 1``
    positions) plus :data:`PASS_OVERHEAD_ROWS` rows reaching everything. The rows are
    ordered by reach ``(l + 1)(p + 1)`` and cut into the contiguous runs that minimise the
    total (a dynamic programme over the sorted rows, ``O(batch^2)``).
    """
    n = len(layers)
    order = torch.argsort((layers + 1) * (poss + 1), stable=True)
    depth, last = (layers[order] + 1).tolist(), (poss[order] + 1).tolist()
    overhead = PASS_OVERHEAD_ROWS * n_layers * n_pos
    best = [0.0] + [math.inf] * n  # best[j]: cheapest way to run the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        max_d = max_p = 0
        for i in range(j, 0, -1):  # the last run is sorted rows i-1 .. j-1
            max_d, max_p = max(max_d, depth[i - 1]), max(max_p, last[i - 1])
            cost = best[i - 1] + (j - i + 1) * max_d * max_p + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    runs: list[tuple[int, int]] = []
    j = n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return order, runs[::-1]


def _all_feature_rows(
    plan: _Plan, passes: _RowPasses, batch_size: int, progress: tqdm
) -> tuple[CausalAdjacency, Tensor]:
    """Every feature's row and the targets' into causal blocks (a feature row only has
    sources in earlier layers at positions up to its own: about a quarter of the dense
    matrix). Columns are already in node order. Returns the edges and the selected
    features (all)."""
    ctx, n_cols, n_tgt = plan.ctx, plan.n_cols, plan.n_targets
    assert plan.groups is not None
    dtype, device = ctx.compute_dtype, ctx.embeddings.device
    adjacency = CausalAdjacency.from_groups(n_cols, plan.groups, dtype, device)
    adjacency.set_rows(torch.arange(n_cols - n_tgt, n_cols), passes.target_rows(plan.targets))
    progress.update(n_tgt)
    n_feat = plan.columns.n_features
    order = torch.argsort(plan.columns.features.layer, descending=True, stable=True)
    for start in range(0, n_feat, batch_size):
        rows, values = passes.feature_rows(order[start : start + batch_size])
        adjacency.set_rows(rows, values)
        progress.update(len(rows))
    return adjacency, torch.arange(n_feat)


def _budgeted_rows(
    plan: _Plan, passes: _RowPasses, batch_size: int, progress: tqdm, spill_dir: Path | None
) -> tuple[CausalAdjacency, Tensor, int]:
    """The targets' rows, then ``budget`` feature rows chosen by influence as rows arrive
    (:func:`~tl_circuits.graph.budget.select_by_influence`), each feature row stored over
    its causal columns only (:class:`~tl_circuits.graph.budget.CausalRows`; in a spill file
    under ``spill_dir`` when given, removed when the build ends or fails); returns the
    causal adjacency over the chosen features, errors, tokens and targets, the chosen
    features (ascending) and how many were chosen among exact ties at a batch's cut."""
    ctx, n_tgt = plan.ctx, plan.n_targets
    dtype, device = ctx.compute_dtype, ctx.embeddings.device
    target_rows = passes.target_rows(plan.targets).clone()
    progress.update(n_tgt)
    with contextlib.ExitStack() as stack:
        spill = None if spill_dir is None else stack.enter_context(SpillFile(spill_dir, dtype))
        store = CausalRows(plan.columns, dtype, device, spill)
        selection = select_by_influence(
            store, target_rows, plan.budget, batch_size, plan.targets, passes.feature_rows, progress
        )
        if spill is not None:
            progress.set_postfix_str(f"spilled {spill.bytes_written / 2**30:.2f} GiB")
        chosen = selection.chosen
        edges = _kept_edges(plan, store, chosen, target_rows)
        return edges, torch.sort(chosen).values, selection.tied_at_cut


def _kept_edges(
    plan: _Plan, store: CausalRows, chosen: Tensor, target_rows: Tensor
) -> CausalAdjacency:
    """The graph's edges from the stored rows: the chosen features' rows over the chosen
    features, errors and tokens that are causal for them, and the targets' rows, as causal
    blocks (:class:`~tl_circuits.graph.causal_adjacency.CausalAdjacency`)."""
    ctx, n_tgt, n_cols = plan.ctx, plan.n_targets, plan.n_cols
    n_feat, budget = plan.columns.n_features, plan.budget
    dtype, device = ctx.compute_dtype, ctx.embeddings.device
    selected, perm = torch.sort(chosen)  # features in (layer, pos, feature) order
    n_nodes = budget + n_cols - n_feat
    groups = causal_groups(*_node_layout(plan.columns, selected.cpu(), plan.targets))
    adjacency = CausalAdjacency.from_groups(n_nodes, groups, dtype, device)
    # column c -> its node: the selected features in order, then errors, tokens, targets
    node_of = torch.full((n_cols,), -1, dtype=torch.long, device=device)
    node_of[selected] = torch.arange(budget, device=device)
    node_of[n_feat:] = torch.arange(budget, n_nodes, device=device)
    row_of = torch.empty(budget, dtype=torch.long, device=device)  # visiting slot -> node
    row_of[perm] = torch.arange(budget, device=device)
    for slots, cols, _, values in store.items():
        node = node_of[cols]
        keep = (node >= 0).nonzero(as_tuple=True)[0]
        adjacency.set_columns(row_of[slots], node[keep], values[:, keep])
    sources = torch.cat([selected, torch.arange(n_feat, n_cols - n_tgt, device=device)])
    target_nodes = torch.arange(n_nodes - n_tgt, n_nodes, device=device)
    every_source = torch.arange(n_nodes - n_tgt, device=device)
    adjacency.set_columns(target_nodes, every_source, target_rows.index_select(1, sources))
    return adjacency


def _row_values(
    plan: _Plan, selected: Tensor, zero_pres: Tensor, zero_final: Tensor
) -> tuple[Tensor, Tensor]:
    """``(row_values, constants)`` ``[n_nodes]``: each selected feature's pre-activation and
    each target's value, and the parts of them due to constants (G1; ``zero_pres``
    ``[n_features]`` and ``zero_final`` from :func:`_zero_node_constants`)."""
    ctx, features, n_tgt = plan.ctx, plan.columns.features, plan.n_targets
    n_nodes = len(selected) + plan.columns.n_cols - plan.columns.n_features + n_tgt
    dtype, device = ctx.compute_dtype, ctx.embeddings.device
    constants = torch.zeros(n_nodes, dtype=dtype, device=device)
    row_values = torch.zeros(n_nodes, dtype=dtype, device=device)
    constants[: len(selected)] = zero_pres[selected]
    row_values[: len(selected)] = ctx.in_compute(features.pre_activation[selected])
    constants[n_nodes - n_tgt :] = target_values(plan.targets, ctx.in_compute(zero_final))
    final = ctx.in_compute(ctx.final_normalized)
    row_values[n_nodes - n_tgt :] = target_values(plan.targets, final)
    return row_values, constants


def _assemble(
    plan: _Plan,
    selected: Tensor,
    edges: Tensor | CausalAdjacency,
    row_values: Tensor,
    constants: Tensor,
    max_feature_nodes: int | None,
) -> AttributionGraph:
    """The graph: node table, excluded features, info and the prompt."""
    ctx, features = plan.ctx, plan.columns.features
    nodes = _node_table(ctx, plan, selected, row_values[len(row_values) - plan.n_targets :])
    left_out = torch.ones(len(features), dtype=torch.bool)
    left_out[selected] = False
    cfg = ctx.model.cfg
    info = {
        "model_name": cfg.model_name,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "architecture": cfg.original_architecture,
        "transcoders": type(ctx.transcoders).__name__,
        "prompt": ctx.model.to_string(ctx.tokens) if ctx.model.tokenizer is not None else None,
        "max_feature_nodes": max_feature_nodes,
        "n_active_features": len(features),
    }
    token_strings = (
        ctx.model.to_str_tokens(ctx.tokens)
        if ctx.model.tokenizer is not None
        else [str(t) for t in ctx.tokens.tolist()]
    )
    return AttributionGraph(
        nodes=nodes,
        edges=edges,
        row_values=row_values,
        constants=constants,
        targets=plan.targets,
        tokens=ctx.tokens.clone(),
        token_strings=list(token_strings),
        excluded=_feature_nodes(features, left_out.nonzero(as_tuple=True)[0]),
        info=info,
        context=ctx,
    )


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
    ctx: ReplacementContext, plan: _Plan, selected: Tensor, target_vals: Tensor
) -> NodeTable:
    """Nodes: the selected features, every error, every token, the targets."""
    n_layers, n_pos = ctx.n_layers, ctx.n_pos
    feats = _feature_nodes(plan.columns.features, selected)
    errors = ctx.compute_errors
    err_norm = torch.stack([errors[la].norm(dim=-1) for la in range(n_layers)]).reshape(-1)
    long = dict(dtype=torch.long)
    kind, layer, pos = _node_layout(plan.columns, selected, plan.targets)
    return NodeTable(
        kind=kind,
        layer=layer,
        pos=pos,
        feature=torch.cat(
            [
                feats.feature,
                torch.full((n_layers * n_pos + n_pos,), -1, **long),
                torch.tensor([t.token for t in plan.targets], **long),
            ]
        ),
        activation=torch.cat(
            [
                ctx.in_compute(feats.activation),
                err_norm,
                ctx.compute_embeddings.norm(dim=-1),
                target_vals,
            ]
        ),
    )
