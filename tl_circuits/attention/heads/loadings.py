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
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tl_circuits.attention.heads.compute import head_loading_fields
from tl_circuits.errors import HeadLoadingError
from tl_circuits.graph.context import graph_context
from tl_circuits.graph.nodes import FEATURE, KINDS, TARGET
from tl_circuits.model.devices import available_memory_bytes
from tl_circuits.storage import read_safetensors, write_safetensors
from tl_circuits.typing import Bool, Float, Int, typechecked

#: the tensor fields, in order (the last four only with ``split_write_layers``)
FIELDS = (
    "edges",
    "edge_values",
    "loadings",
    "bypass",
    "crossed",
    "write_layers",
    "loadings_by_write",
    "bypass_by_write",
    "values_by_write",
)
FORMAT_NAME = "tl_circuits.head_loadings"
FORMAT_VERSION = 1
#: the file :meth:`HeadLoadings.save` writes in a graph folder
FILE_NAME = "head_loadings.safetensors"

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_circuits.graph.graph import AttributionGraph
    from tl_circuits.transcoders.base import Transcoders


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

        Cost: one reverse pass per distinct target row (up to its position) and one forward
        pass per distinct source (from its layer and position), in chunks; one side is held
        in memory batch by batch and the other recomputed per held batch, whichever costs
        less (once each when a side fits); then one contraction per (edge, crossed layer)
        over the positions between source and target, by GEMM where the pairs are dense.
        ``memory_bytes`` (default: 4 GiB or half the free memory of the model's device, host
        RAM or CUDA, whichever is less) bounds the gradients and forward contributions held
        at once (1/8 of it per chunk); ``target_batch`` / ``source_batch`` cap the rows per
        reverse pass (default 256) and the sources per forward pass (default 128);
        ``edge_chunk``: edges per gathered write-value product.
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
        ctx = graph_context(graph, model, transcoders, error=HeadLoadingError)
        if memory_bytes is None:
            free = available_memory_bytes(ctx.embeddings.device)
            memory_bytes = min(4 * 2**30, free // 2)
        edge_index = _edge_list(graph, edges)
        with torch.no_grad():
            fields = head_loading_fields(
                graph,
                ctx,
                edge_index,
                split_write_layers,
                target_batch,
                source_batch,
                edge_chunk,
                memory_bytes,
            )
        return cls(**fields)

    # ---- files ---------------------------------------------------------------------------

    def save(self, path: str | Path, graph: AttributionGraph | None = None) -> Path:
        """Write the loadings (safetensors, never pickle) and return the file written.

        ``path``: a graph folder (``AttributionGraph.save``'s directory layout; the loadings
        go beside the graph as ``head_loadings.safetensors``) or a file path ending in
        ``.safetensors``. The graph's id (:func:`~tl_circuits.graph.files.graph_id`) is
        recorded: ``graph``'s when given (after :meth:`check_graph`), else the id of the
        graph saved in the folder ``path``, if any; :meth:`load` with a graph refuses
        loadings recorded for another id."""
        from tl_circuits.graph.files import graph_id, saved_graph_id

        path = Path(path)
        target = _file_of(path)
        if graph is not None:
            self.check_graph(graph)
            gid = graph_id(graph)
        else:
            gid = saved_graph_id(path) if path.is_dir() else None
        target.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None}
        metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
        if gid is not None:
            metadata["graph_id"] = gid
        write_safetensors(tensors, target, metadata)
        return target

    @classmethod
    def load(cls, path: str | Path, graph: AttributionGraph | None = None) -> HeadLoadings:
        """Read loadings written by :meth:`save` (``path``: the graph folder or the file).
        With ``graph``, check that they are this graph's: the recorded graph id (when
        the file has one) is ``graph``'s, and :meth:`check_graph` passes."""
        source = _file_of(Path(path))
        if not source.is_file():
            raise FileNotFoundError(f"no head loadings at {source} (HeadLoadings.save writes it)")
        tensors, metadata = read_safetensors(source, HeadLoadingError)
        if metadata.get("format") != FORMAT_NAME or metadata.get("version") != str(FORMAT_VERSION):
            raise HeadLoadingError(
                f"{source} is not a {FORMAT_NAME} file of version {FORMAT_VERSION} "
                f"(metadata {metadata})"
            )
        if set(tensors) - set(FIELDS) or not set(FIELDS[:5]) <= set(tensors):
            raise HeadLoadingError(f"{source}: unexpected tensors {sorted(tensors)}")
        try:
            loaded = cls(**tensors)
        except Exception as e:  # jaxtyping / beartype shape errors
            raise HeadLoadingError(f"{source}: inconsistent head-loading tensors: {e}") from e
        if graph is not None:
            recorded = metadata.get("graph_id")
            if recorded is not None:
                from tl_circuits.graph.files import graph_id

                actual = graph_id(graph)
                if recorded != actual:
                    raise HeadLoadingError(
                        f"{source} holds head loadings of the graph with id {recorded}, but "
                        f"this graph's id is {actual}: they belong to another graph "
                        "(compute them on this one with HeadLoadings.compute)"
                    )
            loaded.check_graph(graph)
        return loaded

    def check_graph(self, graph: AttributionGraph) -> None:
        """Raise :class:`~tl_circuits.errors.HeadLoadingError` unless these are loadings of
        ``graph``'s edges: every edge indexes its nodes, and wherever the graph still has
        the edge its value is the recorded ``edge_values`` (bit for bit)."""
        n = graph.n_nodes
        edges = self.edges.cpu()
        if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= n):
            raise HeadLoadingError(
                f"these head loadings have edges outside the graph's {n} nodes: they belong to "
                "another graph (compute them on this one with HeadLoadings.compute)"
            )
        adjacency = graph.adjacency
        values = adjacency[edges[:, 0].to(adjacency.device), edges[:, 1].to(adjacency.device)]
        recorded = self.edge_values.to(values.device, values.dtype)
        differ = (values != 0) & (values != recorded)
        if bool(differ.any()):
            i = int(differ.nonzero()[0, 0])
            raise HeadLoadingError(
                f"these head loadings split edge {tuple(edges[i].tolist())} = "
                f"{float(recorded[i])!r}, but the graph's edge there is {float(values[i])!r}: "
                "they belong to another graph (compute them on this one)"
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


def _file_of(path: Path) -> Path:
    """The loadings file of ``path``: itself if it ends in ``.safetensors`` (and is not a
    directory), else ``path / head_loadings.safetensors``."""
    if path.suffix == ".safetensors" and not path.is_dir():
        return path
    return path / FILE_NAME
