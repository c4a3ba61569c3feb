"""A static picture of an attribution graph (SVG / PNG, via matplotlib).

Layout: token positions are columns (labelled with the prompt's tokens), rows are, from
the bottom, the embeddings, each transcoder layer's features and errors, and the targets
(logits) on top. Nodes sharing a (row, position) cell are spread side by side. Edges are
straight lines from source to target, coloured by sign (blue positive, red negative) with
width and opacity proportional to ``|A[t, s]|`` relative to the largest edge drawn. Given
head loadings, the strongest cross-position edges are labelled with the
attention heads that carried them (``L1H3``), largest loading first.

The picture is meant for a pruned graph (tens to a few hundred nodes); ``max_edges``
bounds what is drawn for larger ones.

Text from the model (token strings, the prompt, target labels) is drawn as plain text:
mathtext is off for it (``$\\frac{$`` is drawn as typed), and characters that are
invisible or not allowed in XML (control characters, lone surrogates, U+FFFE/U+FFFF) are
drawn as their escapes (``\\x01``, ``\\ud800``); newline, tab and carriage return as
``⏎``, ``→``, ``↵``, as in the frontend JSON. The SVG therefore always parses as XML.
Each file is rendered to a temporary file beside it and renamed into place
(:func:`tl_circuits.storage.write_atomically`): an interrupted write leaves the old file or
none, never a truncated one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, works without a display

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.nodes import ERROR, FEATURE, TARGET, TOKEN
from tl_circuits.storage import write_atomically

if TYPE_CHECKING:
    from tl_circuits.attention.heads.loadings import HeadLoadings
    from tl_circuits.graph.graph import AttributionGraph

POSITIVE, NEGATIVE = "#2b6cb0", "#c53030"
_MARKERS = {FEATURE: "o", ERROR: "s", TOKEN: "s", TARGET: "D"}
_COLORS = {FEATURE: "#f6ad55", ERROR: "#a0aec0", TOKEN: "#68d391", TARGET: "#b794f4"}
CELL_SPREAD = 0.8  #: fraction of a column the nodes of one cell spread over


def nodes_to_draw(graph: AttributionGraph, max_nodes: int) -> torch.Tensor:
    """``[n_nodes]`` bool: every token and target node, and the ``max_nodes`` feature and
    error nodes of largest influence on the targets (DESIGN.md §2, as in pruning)."""
    kinds = graph.nodes.kind
    shown = (kinds == TOKEN) | (kinds == TARGET)
    inner = ((kinds == FEATURE) | (kinds == ERROR)).nonzero(as_tuple=True)[0]
    if inner.numel() <= max_nodes:
        shown[inner] = True
        return shown
    from tl_circuits.graph.pruning import node_influence

    influence = node_influence(graph.adjacency, graph.indices("target"), graph.target_weights())
    shown[inner[torch.argsort(influence[inner], descending=True)[:max_nodes]]] = True
    return shown


def node_coordinates(graph: AttributionGraph, shown: torch.Tensor | None = None) -> torch.Tensor:
    """``[n_nodes, 2]`` (x, y) positions: x = token position (plus a within-cell offset
    spreading the ``shown`` nodes of one cell; default all), y = 0 for tokens,
    ``layer + 1`` for features and errors, ``n_layers + 1`` for targets."""
    nodes = graph.nodes
    kind, layer, pos = nodes.kind, nodes.layer, nodes.pos
    y = torch.where(kind == TOKEN, torch.zeros_like(layer), layer + 1).to(torch.float64)
    # targets carry layer == n_layers, so they sit on the row above the last layer
    x = pos.to(torch.float64).clone()
    cells: dict[tuple[int, int], list[int]] = {}
    members_shown = range(len(nodes)) if shown is None else shown.nonzero(as_tuple=True)[0].tolist()
    for i in members_shown:
        cells.setdefault((int(y[i]), int(pos[i])), []).append(i)
    for members in cells.values():
        n = len(members)
        if n > 1:
            offsets = torch.linspace(-CELL_SPREAD / 2, CELL_SPREAD / 2, n, dtype=torch.float64)
            x[members] += offsets
    return torch.stack([x, y], dim=1)


def _edges_to_draw(
    graph: AttributionGraph, max_edges: int, shown: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n, 2]`` (target, source) of the ``max_edges`` largest ``|A|`` entries (between
    ``shown`` nodes, default all)."""
    adjacency = graph.adjacency
    if shown is not None:
        adjacency = adjacency * (shown[:, None] & shown[None, :])
    nonzero = adjacency.nonzero()
    if nonzero.shape[0] > max_edges:
        weights = adjacency[nonzero[:, 0], nonzero[:, 1]].abs()
        nonzero = nonzero[torch.argsort(weights, descending=True)[:max_edges]]
    return nonzero


def _head_labels(
    graph: AttributionGraph,
    loadings: HeadLoadings | None,
    edges: torch.Tensor,
    n_label: int,
) -> dict[int, str]:
    """Row in ``edges`` -> ``"L1H3 L0H2"`` for the ``n_label`` strongest cross-position
    edges whose head loadings are known."""
    if loadings is None or n_label <= 0:
        return {}
    loadings.check_graph(graph)
    pos = graph.nodes.pos
    known = {(int(t), int(s)): i for i, (t, s) in enumerate(loadings.edges.tolist())}
    weights = graph.adjacency[edges[:, 0], edges[:, 1]].abs()
    labels: dict[int, str] = {}
    for row in torch.argsort(weights, descending=True).tolist():
        t, s = int(edges[row, 0]), int(edges[row, 1])
        if pos[t] == pos[s] or (t, s) not in known:
            continue
        heads = loadings.top_heads(known[(t, s)], k=2)
        total = abs(float(graph.adjacency[t, s]))
        named = [f"L{m}H{h}" for m, h, value in heads if abs(value) >= 0.1 * total]
        if named:
            labels[row] = " ".join(named)
        if len(labels) >= n_label:
            break
    return labels


def draw_graph(
    graph: AttributionGraph,
    *,
    head_loadings: HeadLoadings | None = None,
    max_nodes: int = 40,
    max_edges: int = 300,
    label_heads: int = 8,
    title: str | None = None,
) -> Figure:
    """Draw ``graph`` (see the module docstring) and return the matplotlib figure.

    ``max_nodes``: draw the tokens, the targets and this many feature/error nodes (the most
    influential); ``max_edges``: draw only the largest ``|A[t, s]|`` edges between drawn
    nodes; ``label_heads``: how many cross-position edges to label with their top heads
    (from ``head_loadings``, :meth:`HeadLoadings.compute` of this graph).
    """
    for name, value in (("max_nodes", max_nodes), ("max_edges", max_edges)):
        if value <= 0:
            raise TLCircuitsError(f"{name} must be positive, got {value}")
    n_pos = len(graph.token_strings)
    n_rows = int(graph.info.get("n_layers", int(graph.nodes.layer.max()))) + 2
    shown = nodes_to_draw(graph, max_nodes)
    xy = node_coordinates(graph, shown)
    edges = _edges_to_draw(graph, max_edges, shown)
    width = min(22.0, max(6.0, 0.9 * n_pos + 2))
    fig, ax = plt.subplots(figsize=(width, max(4.5, 1.5 * n_rows + 1.5)))

    if edges.shape[0]:
        labels = _head_labels(graph, head_loadings, edges, label_heads)
        _draw_edges(ax, graph, edges, xy, labels)
    _draw_nodes(ax, graph, shown, xy)
    ax.set_xticks(range(n_pos))
    ax.set_xticklabels(
        [display_text(s) for s in graph.token_strings], rotation=45, ha="right", parse_math=False
    )
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(["emb"] + [f"L{m}" for m in range(n_rows - 2)] + ["out"])
    ax.set_xlim(-0.7, n_pos - 0.3)
    ax.set_ylim(-0.6, n_rows + 0.2)
    ax.grid(axis="y", color="#edf2f7", zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    prompt = graph.info.get("prompt")
    text = title or (prompt if isinstance(prompt, str) else "") or " ".join(graph.token_strings)
    ax.set_title(display_text(text), fontsize=9, parse_math=False)
    fig.tight_layout()
    return fig


def save_graph_picture(
    graph: AttributionGraph,
    path: str | Path,
    formats: tuple[str, ...] = ("svg", "png"),
    **options: object,
) -> list[Path]:
    """Draw ``graph`` and write ``path`` with each suffix in ``formats``; returns the files.
    ``options`` go to :func:`draw_graph` (``head_loadings=`` labels edges with heads)."""
    unknown = set(formats) - {"svg", "png", "pdf"}
    if unknown:
        raise TLCircuitsError(f"unsupported picture formats {sorted(unknown)}; use svg, png, pdf")
    fig = draw_graph(graph, **options)  # type: ignore[arg-type]
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        # SVG text as <text> elements (searchable, XML-escaped), not as glyph outlines
        with plt.rc_context({"svg.fonttype": "none"}):
            for fmt in formats:
                out = stem.with_suffix(f".{fmt}")

                def render(tmp: str, fmt: str = fmt) -> None:
                    fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")

                write_atomically(out, render)
                written.append(out)
    finally:
        plt.close(fig)
    return written


#: how newline, tab and carriage return are shown (as in the frontend JSON)
_SHOWN = {"\n": "⏎", "\t": "→", "\r": "↵"}


def display_text(text: str) -> str:
    """``text`` as drawn (module docstring): newline, tab and carriage return as arrows,
    other characters that are invisible or invalid in XML as their escapes."""
    return "".join(_SHOWN.get(c) or (_escape(c) if _hidden(c) else c) for c in str(text))


def _hidden(c: str) -> bool:
    """A control character (C0, DEL, C1), a surrogate, or U+FFFE/U+FFFF."""
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or o in (0xFFFE, 0xFFFF)


def _escape(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}"


def _draw_edges(
    ax: Axes, graph: AttributionGraph, edges: torch.Tensor, xy: torch.Tensor, labels: dict[int, str]
) -> None:
    """Lines from source to target, by sign and weight (weakest first, so strong edges are
    on top), with the head labels of ``labels`` (row in ``edges`` -> text)."""
    weights = graph.adjacency[edges[:, 0], edges[:, 1]]
    scale = float(weights.abs().max())
    # weakest first, so strong edges are drawn on top
    for row in torch.argsort(weights.abs()).tolist():
        t, s = int(edges[row, 0]), int(edges[row, 1])
        w = float(weights[row]) / scale
        (x0, y0), (x1, y1) = xy[s].tolist(), xy[t].tolist()
        ax.plot(
            [x0, x1],
            [y0, y1],
            color=POSITIVE if w > 0 else NEGATIVE,
            linewidth=0.4 + 3.0 * abs(w),
            alpha=0.15 + 0.75 * abs(w),
            zorder=1,
        )
        if row in labels:  # 40% of the way up, so labels of fan-in edges separate
            ax.annotate(
                labels[row],
                (x0 + 0.4 * (x1 - x0), y0 + 0.4 * (y1 - y0)),
                fontsize=7,
                ha="center",
                va="center",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "#718096", "lw": 0.5},
                zorder=4,
            )


def _draw_nodes(ax: Axes, graph: AttributionGraph, shown: torch.Tensor, xy: torch.Tensor) -> None:
    """The ``shown`` nodes by kind, feature indices (small pictures) and target labels."""
    kinds = graph.nodes.kind
    for kind, marker in _MARKERS.items():
        members = ((kinds == kind) & shown).nonzero(as_tuple=True)[0]
        if members.numel():
            ax.scatter(
                xy[members, 0].numpy(),
                xy[members, 1].numpy(),
                marker=marker,
                s=70 if kind != TARGET else 90,
                c=_COLORS[kind],
                edgecolors="#2d3748",
                linewidths=0.6,
                zorder=3,
                label=("feature", "error", "token", "target")[kind],
            )
    if int(shown.sum()) <= 80:
        for i in ((kinds == FEATURE) & shown).nonzero(as_tuple=True)[0].tolist():
            ax.annotate(
                str(int(graph.nodes.feature[i])),
                (float(xy[i, 0]), float(xy[i, 1])),
                xytext=(0, 7),
                textcoords="offset points",
                fontsize=6,
                ha="center",
                zorder=5,
            )
    for i in (kinds == TARGET).nonzero(as_tuple=True)[0].tolist():
        ax.annotate(
            display_text(graph.node_label(i).removeprefix("Output ")),
            (float(xy[i, 0]), float(xy[i, 1])),
            xytext=(2, 8),
            textcoords="offset points",
            fontsize=7,
            rotation=40,
            ha="left",
            va="bottom",
            zorder=5,
            parse_math=False,
        )
