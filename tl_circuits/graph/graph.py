"""The attribution graph of DESIGN.md §2: a container plus thin methods.

The maths lives in sibling modules: :mod:`~tl_circuits.graph.build` (nodes and edges),
:mod:`~tl_circuits.graph.pruning` (influence, pruning, scores),
:mod:`~tl_circuits.graph.files` (lossless save/load), :mod:`~tl_circuits.graph.frontend`
(the Neuronpedia JSON). The graph is plain data: analyses of it (head loadings, QK
attributions) are values of their own that take the graph, and it never imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from tl_circuits.graph.causal_adjacency import CausalAdjacency
from tl_circuits.graph.nodes import (
    KINDS,
    NodeTable,
    Target,
    normalized_target_weights,
    target_display,
)
from tl_circuits.typing import Float, Int

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_circuits.graph.pruning import GraphScores
    from tl_circuits.replacement.context import ReplacementContext
    from tl_circuits.transcoders.base import Transcoders


@dataclass
class AttributionGraph:
    """Nodes, direct-effect edges and targets of one prompt's local replacement model.

    - ``nodes``: :class:`NodeTable`, order features, errors, tokens, targets
    - ``edges``: the direct effects, a dense ``[n_nodes, n_nodes]`` tensor or a
      :class:`~tl_circuits.graph.causal_adjacency.CausalAdjacency` (what a full build
      stores: only the causally possible blocks); ``adjacency`` is always the dense view.
      Pruning, scores, subgraphs and :meth:`save` read ``edges`` block by block and never
      build the dense view; it is built (and kept) only when something reads ``adjacency``
    - ``adjacency[t, s]``: direct effect of source node ``s`` on target node ``t``
      (rows are targets: features' pre-activations and the targets' values); built from
      ``edges`` on first use and kept
    - ``row_values[t]``: what row ``t`` explains: a feature's pre-activation, a target's
      value; 0 for error and token rows (they have no inputs)
    - ``constants[t]``: the part of ``row_values[t]`` due to biases and other constants,
      so ``adjacency.sum(1) + constants == row_values`` on feature and target rows (G1)
    - ``targets``: one :class:`Target` per target node, in node order
    - ``tokens``, ``token_strings``: the prompt
    - ``excluded``: active features left out by a feature budget (same columns as nodes)
    - ``info``: JSON-able metadata (model name and shape, transcoder kind, build options)
    """

    nodes: NodeTable
    edges: Float[Tensor, "n_nodes n_nodes"] | CausalAdjacency
    row_values: Float[Tensor, " n_nodes"]
    constants: Float[Tensor, " n_nodes"]
    targets: list[Target]
    tokens: Int[Tensor, " pos"]
    token_strings: list[str]
    excluded: NodeTable
    info: dict[str, Any] = field(default_factory=dict)
    #: the replacement context the graph was built from (not saved; None after load)
    context: ReplacementContext | None = field(default=None, repr=False, compare=False)
    _dense: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: HookedTransformer,
        transcoders: Transcoders,
        prompt: str | Sequence[int] | Tensor,
        targets: Sequence[Any] | None = None,
        max_feature_nodes: int | None = None,
        **options: Any,
    ) -> AttributionGraph:
        """Build the graph; see :func:`tl_circuits.graph.build.build_graph` for options."""
        from tl_circuits.graph.build import build_graph

        return build_graph(
            model,
            transcoders,
            prompt,
            targets=targets,
            max_feature_nodes=max_feature_nodes,
            **options,
        )

    # ---- views -----------------------------------------------------------------------

    @property
    def adjacency(self) -> Float[Tensor, "n_nodes n_nodes"]:
        """The dense ``A[target, source]`` (materialised from causal blocks on first use)."""
        if isinstance(self.edges, Tensor):
            return self.edges
        if self._dense is None:
            self._dense = self.edges.to_dense()
        return self._dense

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def indices(self, kind: str) -> Tensor:
        """Node indices of ``kind`` ("feature", "error", "token", "target")."""
        return self.nodes.indices(kind)

    def target_weights(self) -> Float[Tensor, " n_targets"]:
        """Weights of the targets in influence computations, summing to 1."""
        return normalized_target_weights(self.targets, self.row_values.dtype)

    def node_label(self, index: int) -> str:
        """A short human-readable label for node ``index``."""
        kind = KINDS[int(self.nodes.kind[index])]
        layer, pos = int(self.nodes.layer[index]), int(self.nodes.pos[index])
        tok = self.token_strings[pos] if pos < len(self.token_strings) else "?"
        if kind == "feature":
            return f"L{layer} F{int(self.nodes.feature[index])} @{pos} {tok!r}"
        if kind == "error":
            return f"L{layer} error @{pos} {tok!r}"
        if kind == "token":
            return f"token @{pos} {tok!r}"
        return target_display(self.targets[index - int(self.indices("target")[0])])

    def with_adjacency(self, adjacency: Tensor) -> AttributionGraph:
        """A copy with ``adjacency`` (dense ``[n_nodes, n_nodes]``) as its edges."""
        return replace(self, edges=adjacency)

    # ---- pruning and scores ------------------------------------------------------------

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
        """Keep nodes to ``node_threshold`` and edges to ``edge_threshold`` cumulative
        influence on the targets (DESIGN.md G3)."""
        from tl_circuits.graph.pruning import prune_graph

        return prune_graph(self, node_threshold=node_threshold, edge_threshold=edge_threshold)

    def scores(self) -> GraphScores:
        """Replacement and completeness scores of this graph (methods paper)."""
        from tl_circuits.graph.pruning import graph_scores

        return graph_scores(self)

    # ---- files -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Save losslessly (safetensors + JSON)."""
        from tl_circuits.graph.files import save_graph

        return save_graph(self, path)

    @classmethod
    def load(cls, path: str | Path, *, max_memory_bytes: int | None = None) -> AttributionGraph:
        """Load a graph written by :meth:`save` (no pickle; checked for integrity and
        meaning); ``max_memory_bytes`` bounds what loading may allocate
        (:func:`~tl_circuits.graph.files.load_graph`)."""
        from tl_circuits.graph.files import load_graph

        return load_graph(path, max_memory_bytes=max_memory_bytes)

    def to_json(self, path: str | Path | None = None, **options: Any) -> dict[str, Any]:
        """The Neuronpedia / circuit-tracer frontend JSON of the graph; written to ``path``
        if given (options: :func:`~tl_circuits.graph.frontend.frontend_json`). With head
        loadings and QK terms: :func:`tl_circuits.export_json`."""
        from tl_circuits.graph.frontend import frontend_json

        return frontend_json(self, path, **options)
