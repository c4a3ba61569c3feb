"""Bases for QK attributions (DESIGN.md §4): the residual stream entering a layer as a sum.

A *basis* at layer ``m`` is a table of components whose contributions to
``resid_pre(m)`` (at every position) sum to the residual stream itself, the last component
being the constant ``bias``. Three bases share one projection (:func:`project`, ln1 with its
frozen scale, ``W_Q``/``W_K``, biases, QK-norm with its frozen scale, rotary):

- **graph** (:meth:`QKBasis.from_graph`): the attribution graph's nodes (features and errors
  of earlier layers, token embeddings) propagated through the frozen replacement model, the
  features a budget left out (one component) and the bias (every constant of the model);
- **SAE** (:meth:`QKBasis.from_sae`): a residual-stream SAE at ``blocks.{m}.hook_resid_pre``,
  ``x = sum_f a_f d_f + b_dec + error`` (one component per feature active somewhere in the
  prompt, one error, ``b_dec`` as the bias);
- **components** (:meth:`QKBasis.from_components`, dictionary-free): the token embedding,
  the positional embedding, each earlier head's output ``z_h W_O^h`` (through the frozen
  post-attention norm, if any), each earlier MLP's output, and the bias (every ``b_O``).

Component ids: ``0..n-1`` index :attr:`QKBasis.table`; ``BIAS`` (-1) is the last row and
``EXCLUDED`` (-2) the one before it (the budget's left-out features; graph basis only, zero
without a budget), so negative ids index the table the Python way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_circuits.attention.qk.reverse import Method, ReverseHeadVectors, Side
from tl_circuits.errors import QKError, UnsupportedArchitectureError
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import ERROR, FEATURE, TOKEN
from tl_circuits.model.prompt import Prompt, to_tokens
from tl_circuits.replacement.frozen import FrozenNorm, _frozen_norm
from tl_circuits.typing import Int, typechecked

BIAS = -1  #: component id of the bias term (the last row of a basis table)
EXCLUDED = -2  #: component id of the features left out by a budget (graph basis)
#: rows projected at once (bounds the ``[chunk, positions, d_model]`` temporaries)
CHUNK = 512
PROPAGATE_CHUNK = 64
"""Rows per forward propagation of graph nodes (small, so each chunk spans few positions
and its causal suffix stays short)."""


@typechecked
@dataclass(frozen=True)
class ComponentTable:
    """One row per component of a basis.

    - ``kind``: "feature", "error", "token", "excluded", "bias" (graph basis);
      "sae_feature", "sae_error" (SAE basis); "embed", "pos_embed", "head", "mlp"
      (components basis)
    - ``layer``: the layer that writes it (-1: embeddings and bias)
    - ``pos``: its position; -1 for position-local bases, where a component is read at the
      position of the side using it (the query position, or each key position)
    - ``index``: graph node index, SAE feature, or head index (-1 when none)
    - ``label``: a short human-readable name
    """

    kind: tuple[str, ...]
    layer: Int[Tensor, " n"]
    pos: Int[Tensor, " n"]
    index: Int[Tensor, " n"]
    label: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.kind)

    def row(self, component: int) -> int:
        """Table row of a component id (negative ids count from the end)."""
        return component if component >= 0 else len(self) + component

    def records(self, components: Sequence[int]) -> list[dict[str, Any]]:
        """JSON-ready rows (kind, layer, pos, index, label) of ``components``."""
        out = []
        for c in components:
            r = self.row(int(c))
            out.append(
                dict(
                    id=int(c),
                    kind=self.kind[r],
                    layer=int(self.layer[r]),
                    pos=int(self.pos[r]),
                    index=int(self.index[r]),
                    label=self.label[r],
                )
            )
        return out


def _table(rows: list[tuple[str, int, int, int, str]]) -> ComponentTable:
    kinds, layers, poss, idx, labels = zip(*rows, strict=True)
    return ComponentTable(
        kind=tuple(kinds),
        layer=torch.tensor(layers, dtype=torch.long),
        pos=torch.tensor(poss, dtype=torch.long),
        index=torch.tensor(idx, dtype=torch.long),
        label=tuple(labels),
    )


Contributions = Callable[[Tensor, Sequence[int]], Tensor]
LiveRows = Callable[[Sequence[int]], Tensor]


@dataclass(frozen=True, eq=False)
class QKBasis:
    """Components of ``resid_pre(layer)`` of ``model`` on ``tokens`` (see the module doc).

    ``contributions(rows, positions)`` returns ``[len(rows), len(positions), d_model]``,
    component ``rows`` (table rows) at ``positions``; summed over all rows it is
    ``resid_pre(layer)`` there. ``live_rows(positions)`` lists the rows that can be nonzero
    at those positions (always with the bias row). ``frozen``: the clean run's ln1 scale
    ``[pos, 1]`` and QK-norm scales ``[pos, n_heads]`` / ``[pos, n_key_value_heads]``
    (keys ``"ln1"``, ``"q_norm"``, ``"k_norm"``), the values the projection freezes.
    ``reverse`` (graph basis): answers :meth:`project` by reverse passes seeded at the
    head's query / key map when that is cheaper (see :meth:`from_graph`).
    """

    model: HookedTransformer
    tokens: Tensor
    layer: int
    name: str
    table: ComponentTable
    frozen: dict[str, Tensor]
    contributions: Contributions
    live_rows: LiveRows
    reverse: ReverseHeadVectors | None = None

    # ---- constructors ------------------------------------------------------------------

    @classmethod
    def from_graph(cls, graph: AttributionGraph, layer: int, *, method: Method = "auto") -> QKBasis:
        """Graph-node basis: nodes writing below ``layer`` (propagated through the frozen
        replacement model, attention and norm scales frozen), ``EXCLUDED`` and ``BIAS``.

        Two exact ways to get a head's vectors of every node, chosen by ``method``:

        - ``"forward"``: propagate every node's write to ``resid_pre(layer)`` once (about
          one row per node; :func:`_graph_residuals`), shared by every head and position;
        - ``"reverse"``: one reverse pass per query / key dimension and position asked for
          (``d_head`` rows per position; :mod:`tl_circuits.attention.qk.reverse`), cached;
        - ``"auto"`` (default): reverse while the seeds run stay within the forward
          propagation's row count, then the forward table for everything after; one head
          at a few positions costs a few reverse passes, all heads of a layer one forward
          propagation (plus at most as much again spent before switching).

        Nothing is computed until :meth:`project` (or :attr:`contributions`) asks.
        """
        ctx = graph.context
        if ctx is None:
            raise QKError("this graph has no replacement context (loaded from disk?); rebuild it")
        if method not in ("auto", "forward", "reverse"):
            raise QKError(f"method must be 'auto', 'forward' or 'reverse', got {method!r}")
        _check_layer(ctx.model, layer)
        return _graph_basis(graph, layer, method)

    @classmethod
    def from_sae(cls, model: HookedTransformer, prompt: Prompt, sae: Any, layer: int) -> QKBasis:
        """SAE basis: ``sae`` (SAE-Lens) must read ``blocks.{layer}.hook_resid_pre``."""
        _check_layer(model, layer)
        return _sae_basis(model, to_tokens(model, prompt), sae, layer)

    @classmethod
    def from_components(cls, model: HookedTransformer, prompt: Prompt, layer: int) -> QKBasis:
        """Dictionary-free basis: embeddings, earlier heads' and MLPs' outputs, biases."""
        _check_layer(model, layer)
        return _components_basis(model, to_tokens(model, prompt), layer)

    # ---- the shared projection ---------------------------------------------------------

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @functools.cached_property
    def clean_pattern(self) -> Tensor:
        """The model's attention pattern ``[n_heads, pos, pos]`` at this layer (clean run)."""
        name = f"blocks.{self.layer}.attn.hook_pattern"
        return _capture(self.model, self.tokens, (name,))[name][0]

    def project(
        self,
        head: int,
        rows: Tensor,
        positions: Sequence[int],
        side: Side,
        *,
        finish: bool = True,
        show_progress: bool = False,
    ) -> Tensor:
        """Query (``side="q"``) or key vectors of component ``rows`` at ``positions``.

        Returns ``[len(rows), len(positions), d_head]``: ln1 (frozen scale) and ``W_Q[head]``
        / ``W_K[head]``; the bias row also gets ``ln1.b @ W`` and ``b_Q`` / ``b_K``. With
        ``finish`` (default) QK-norm (frozen scale) and rotary follow, giving the vectors
        whose dot products are the scores; without, the vectors added at ``hook_q`` /
        ``hook_k`` (what the Q2 interventions edit). Rows are processed in chunks.
        """
        chunks = rows.split(CHUNK)
        out = [
            self._project_chunk(head, chunk, list(positions), side, finish, show_progress)
            for chunk in tqdm(chunks, desc=f"QK {side} vectors", disable=not show_progress)
        ]
        return torch.cat(out) if out else self._project_chunk(head, rows, positions, side, finish)

    def _project_chunk(
        self,
        head: int,
        rows: Tensor,
        positions: Sequence[int],
        side: Side,
        finish: bool,
        show_progress: bool = False,
    ) -> Tensor:
        block = self.model.blocks[self.layer]
        attn = block.attn
        cfg = self.model.cfg
        pos = torch.as_tensor(list(positions), dtype=torch.long)
        side_head = _side_head(cfg, head, side)
        # TransformerLens expands W_K / b_K to every query head under GQA: index by ``head``
        W = (attn.W_Q if side == "q" else attn.W_K)[head].detach()  # [d_model, d_head]
        b = (attn.b_Q if side == "q" else attn.b_K)[head].detach()
        is_bias = rows == len(self.table) - 1
        vec = None
        if self.reverse is not None:
            vec = self.reverse.vectors(side, side_head, W, rows, positions, show_progress)
        if vec is None:  # project the residual contributions
            vec = self._project_residual(rows, positions, W)
        elif is_bias.any():  # the reverse passes leave the bias row to the residual
            vec[is_bias] = self._project_residual(rows[is_bias], positions, W)
        ln_bias = getattr(block.ln1, "b", None)
        bias = b if ln_bias is None else ln_bias.detach() @ W + b
        vec[is_bias] = vec[is_bias] + bias
        if not finish:
            return vec
        if cfg.use_qk_norm:
            norm = attn.q_norm if side == "q" else attn.k_norm
            scale = self.frozen[f"{side}_norm"][pos, side_head]  # [P]
            vec = vec / scale[None, :, None] * norm.w.detach()
        if cfg.positional_embedding_type == "rotary":
            vec = _rotary(attn, vec, pos)
        return vec

    def _project_residual(self, rows: Tensor, positions: Sequence[int], W: Tensor) -> Tensor:
        """``ln1(x) @ W`` (frozen scale, no bias) of the contributions ``x`` of ``rows``."""
        resid = self.contributions(rows, positions)  # [n, P, d_model]
        if "ln1" in self.frozen:
            pos = torch.as_tensor(list(positions), dtype=torch.long)
            ln1: FrozenNorm = _frozen_norm(
                self.model.blocks[self.layer].ln1, self.frozen["ln1"][pos]
            )
            resid = ln1.forward_linear(resid)
        return resid @ W


def _side_head(cfg: Any, head: int, side: Side) -> int:
    """The query head itself, or the key head it reads under GQA."""
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    return head if side == "q" else head // group


def _rotary(attn: Any, vec: Tensor, pos: Tensor) -> Tensor:
    """Rotary embedding of ``vec`` ``[n, P, d_head]`` at absolute positions ``pos`` ``[P]``
    (the first ``rotary_dim`` dimensions; the model's pairing, ``attn.rotate_every_two``)."""
    r = attn.cfg.rotary_dim
    cos, sin = attn.rotary_cos[pos].to(vec.dtype), attn.rotary_sin[pos].to(vec.dtype)
    x_rot = vec[..., :r]
    rotated = x_rot * cos + attn.rotate_every_two(x_rot) * sin
    return torch.cat([rotated, vec[..., r:]], dim=-1)


def _check_layer(model: HookedTransformer, layer: int) -> None:
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise QKError(f"layer {layer} out of range [0, {cfg.n_layers})")
    if cfg.use_logn_attn or cfg.use_dynamic_ntk_rope:
        raise UnsupportedArchitectureError(
            "QK attribution does not support log-n attention scaling or dynamic NTK rotary"
        )
    if cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        raise UnsupportedArchitectureError(
            "OLMo's QK-norm spans all heads (not bilinear per head); QK attribution is "
            "per-head exact only for per-head QK-norm"
        )


def _frozen_scales(captured: dict[str, Tensor], model: HookedTransformer, layer: int) -> dict:
    """The projection's frozen scales from captured hook values (batch dim 1)."""
    cfg = model.cfg
    prefix = f"blocks.{layer}."
    out = {}
    if prefix + "ln1.hook_scale" in captured:
        out["ln1"] = captured[prefix + "ln1.hook_scale"][0]
    if cfg.use_qk_norm:
        n_pos = captured[prefix + "attn.q_norm.hook_scale"].shape[0] // cfg.n_heads
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        out["q_norm"] = captured[prefix + "attn.q_norm.hook_scale"].reshape(n_pos, cfg.n_heads)
        out["k_norm"] = captured[prefix + "attn.k_norm.hook_scale"].reshape(n_pos, n_kv)
    return out


def scale_hook_names(model: HookedTransformer, layer: int) -> tuple[str, ...]:
    """Hooks holding the scales the projection of ``layer`` freezes."""
    prefix = f"blocks.{layer}."
    names = [] if model.cfg.normalization_type is None else [prefix + "ln1.hook_scale"]
    if model.cfg.use_qk_norm:
        names += [prefix + "attn.q_norm.hook_scale", prefix + "attn.k_norm.hook_scale"]
    return tuple(names)


def _capture(model: HookedTransformer, tokens: Tensor, names: Sequence[str]) -> dict:
    wanted = set(names)
    missing = wanted - set(model.hook_dict)
    if missing:
        raise UnsupportedArchitectureError(
            f"the model has no hook(s) {sorted(missing)}; its norms must be LayerNorm or "
            "RMSNorm (with or without folded weights)"
        )
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in wanted)
    return {n: cache[n] for n in wanted}


# ---- graph basis ------------------------------------------------------------------------


def _graph_basis(graph: AttributionGraph, layer: int, method: Method) -> QKBasis:
    ctx = graph.context
    assert ctx is not None
    nodes = graph.nodes
    n_nodes = len(nodes)
    kind, node_layer, node_pos = nodes.kind, nodes.layer, nodes.pos
    eligible = ((kind == FEATURE) | (kind == ERROR)) & (node_layer < layer) | (kind == TOKEN)
    live = eligible.nonzero()[:, 0]
    left_out = _left_out(graph, layer)
    special = torch.tensor(([n_nodes] if left_out else []) + [n_nodes + 1])
    rows = torch.cat([live, special])
    slot = torch.full((n_nodes + 2,), -1, dtype=torch.long)
    slot[rows] = torch.arange(len(rows))
    table_rows = [
        (
            ("feature", "error", "token", "target")[int(kind[i])],
            int(node_layer[i]),
            int(node_pos[i]),
            i,
            graph.node_label(i),
        )
        for i in range(n_nodes)
    ]
    table_rows += [
        ("excluded", -1, -1, -1, "nodes left out of the graph (budget or pruning)"),
        ("bias", -1, -1, -1, "bias (all constants of the model)"),
    ]
    pos_of_row = torch.cat([node_pos, torch.tensor([-1, -1])])
    forward: list[Tensor] = []  # the forward table [len(rows), pos, d], built on first need

    @functools.cache
    def bias() -> Tensor:
        """``[pos, d_model]``: ``resid_pre(layer)`` with every node zero (the constants)."""
        name = f"blocks.{layer}.hook_resid_pre"
        return ctx.run_zero_nodes(capture=(name,))[1][name][0]

    def check_rows(r: Tensor) -> None:
        s = slot[r]
        if (s < 0).any():
            raise QKError(f"components {r[s < 0].tolist()} do not write below layer {layer}")

    def contributions(r: Tensor, positions: Sequence[int]) -> Tensor:
        check_rows(r)
        pos = list(positions)
        if bool((r == n_nodes + 1).all()):  # the bias alone needs no propagation
            return bias()[pos].expand(len(r), -1, -1).clone()
        if not forward:
            forward.append(_graph_residuals(graph, layer, live, left_out, bias()))
        return forward[0][slot[r]][:, pos]

    def live_rows(positions: Sequence[int]) -> Tensor:
        last = max(positions)
        p = pos_of_row[rows]
        return rows[(p <= last) | (p < 0)]  # causal: a node reaches only later positions

    frozen = _frozen_scales(ctx.frozen, ctx.model, layer)
    reverse = ReverseHeadVectors(
        graph,
        layer,
        frozen.get("ln1"),
        check_rows=check_rows,
        method=method,
        n_forward_rows=len(rows),
        forward_built=lambda: bool(forward),
    )
    return QKBasis(
        model=ctx.model,
        tokens=ctx.tokens,
        layer=layer,
        name="graph",
        table=_table(table_rows),
        frozen=frozen,
        contributions=contributions,
        live_rows=live_rows,
        reverse=reverse,
    )


Item = tuple[str, int, int, int, float]  # (kind, layer, pos, feature, activation)


def _left_out(graph: AttributionGraph, layer: int) -> list[Item]:
    """Everything writing below ``layer`` that is not a node of ``graph``: the active
    features a budget left out or pruning removed, and pruned errors and tokens."""
    ctx = graph.context
    assert ctx is not None
    nodes = graph.nodes
    present = {
        (int(k), int(la), int(p), int(f))
        for k, la, p, f in zip(
            nodes.kind.tolist(), nodes.layer.tolist(), nodes.pos.tolist(), nodes.feature.tolist()
        )
    }
    out: list[Item] = []
    active = ctx.active_features()
    for la, p, f, a in zip(
        active.layer.tolist(),
        active.pos.tolist(),
        active.feature.tolist(),
        active.activation.tolist(),
    ):
        if la < layer and (FEATURE, la, p, f) not in present:
            out.append(("feature", la, p, f, a))
    for p in range(ctx.n_pos):
        if (TOKEN, -1, p, -1) not in present:
            out.append(("token", -1, p, -1, 0.0))
        for la in range(layer):
            if (ERROR, la, p, -1) not in present:
                out.append(("error", la, p, -1, 0.0))
    return out


def _graph_residuals(
    graph: AttributionGraph, layer: int, live: Tensor, left_out: list[Item], bias: Tensor
) -> Tensor:
    """Contributions ``[len(live) + bool(left_out) + 1, pos, d_model]`` to
    ``resid_pre(layer)`` of the ``live`` nodes, the ``left_out`` ones together, and the
    ``bias`` ``[pos, d_model]`` (last), propagated by
    :meth:`FrozenLinearModel.forward_residuals`.

    Rows are sorted by (first layer written, first position) and propagated in chunks of
    :data:`PROPAGATE_CHUNK`; a chunk starts at its earliest layer and position (blocks
    before it and positions before it carry nothing), so a late node costs a few blocks over
    a suffix of the prompt instead of the whole model over the whole prompt.
    """
    ctx = graph.context
    assert ctx is not None
    tcs, nodes = ctx.transcoders, graph.nodes
    n_pos, d_model = ctx.n_pos, ctx.model.cfg.d_model
    dtype = ctx.embeddings.dtype
    items: list[list[Item]] = []
    for i in live.tolist():
        k, la, p = int(nodes.kind[i]), int(nodes.layer[i]), int(nodes.pos[i])
        kind = ("feature", "error", "token")[k]
        items.append([(kind, la, p, int(nodes.feature[i]), float(nodes.activation[i]))])
    if left_out:
        items.append(left_out)
    first_layer = [min(-1 if kind == "token" else la for kind, la, *_ in parts) for parts in items]
    first_pos = [min(p for _, _, p, *_ in parts) for parts in items]
    order = sorted(range(len(items)), key=lambda i: (first_layer[i], first_pos[i]))
    out = torch.zeros(len(items) + 1, n_pos, d_model, dtype=dtype)
    for begin in range(0, len(order), PROPAGATE_CHUNK):
        chunk = order[begin : begin + PROPAGATE_CHUNK]
        n = len(chunk)
        f = min(first_pos[i] for i in chunk)
        start = min(first_layer[i] for i in chunk) + 1  # 0 when the chunk holds a token row
        writes: dict[int, Tensor] = {}
        embed = torch.zeros(n, n_pos - f, d_model, dtype=dtype) if start == 0 else None
        for row, i in enumerate(chunk):
            for kind, la, p, feat, a in items[i]:
                if kind == "token":
                    assert embed is not None
                    embed[row, p - f] = ctx.embeddings[p]
                    continue
                if kind == "error":
                    targets = [(la, ctx.errors[la][p])]
                else:
                    targets = [(w, a * tcs.decoder(la, w)[feat]) for w in tcs.target_layers(la)]
                for w, vec in targets:
                    if w < layer:
                        if w not in writes:
                            writes[w] = torch.zeros(n, n_pos - f, d_model, dtype=dtype)
                        writes[w][row, p - f] += vec
        res = ctx.linear.forward_residuals(
            writes=writes, embed=embed, start=start, stop=layer, first_pos=f
        )[layer]
        out[torch.tensor(chunk), f:] = res
    out[-1] = bias
    return out


# ---- SAE basis --------------------------------------------------------------------------


def sae_hook_name(sae: Any) -> str:
    """The hook an SAE-Lens SAE reads (``cfg.metadata.hook_name`` or ``cfg.hook_name``)."""
    cfg = sae.cfg
    meta = getattr(cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None)
    if not isinstance(name, str):
        raise QKError("the SAE's config names no hook (cfg.metadata.hook_name)")
    return name


def _sae_basis(model: HookedTransformer, tokens: Tensor, sae: Any, layer: int) -> QKBasis:
    expected = f"blocks.{layer}.hook_resid_pre"
    found = sae_hook_name(sae)
    if found != expected:
        raise QKError(
            f"the basis SAE reads {found!r} but layer {layer}'s QK basis needs a residual-stream "
            f"SAE at {expected!r}; pass the SAE trained on that hook"
        )
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in (None, "none"):
        raise QKError(
            f"the SAE normalises its input ({norm!r}), so x != sum_f a_f d_f + b_dec + error in "
            "the model's units; fold the normalisation into the SAE's weights first"
        )
    captured = _capture(model, tokens, (expected, *scale_hook_names(model, layer)))
    dtype = captured[expected].dtype
    x = captured[expected][0]  # [pos, d_model]
    with torch.no_grad():
        acts = sae.encode(x.to(sae.W_dec.dtype)).to(dtype)  # [pos, d_sae]
    W_dec, b_dec = sae.W_dec.detach().to(dtype), sae.b_dec.detach().to(dtype)
    features = acts.ne(0).any(0).nonzero()[:, 0]  # active somewhere in the prompt
    error = x - (acts @ W_dec + b_dec)  # [pos, d_model]
    feat_acts = acts[:, features]  # [pos, n_f]
    n_f = len(features)
    table = _table(
        [("sae_feature", layer, -1, f, f"SAE F{f}") for f in features.tolist()]
        + [("sae_error", layer, -1, -1, "SAE error"), ("bias", -1, -1, -1, "b_dec")]
    )
    decoder = torch.cat([W_dec[features], torch.zeros(2, x.shape[1], dtype=dtype)])

    def contributions(rows: Tensor, positions: Sequence[int]) -> Tensor:
        pos = list(positions)
        scale = torch.zeros(len(rows), len(pos), dtype=dtype)
        is_f = rows < n_f
        scale[is_f] = feat_acts[pos][:, rows[is_f]].T
        out = scale[:, :, None] * decoder[rows][:, None, :]
        out[rows == n_f] = error[pos]
        out[rows == n_f + 1] = b_dec
        return out

    def live_rows(positions: Sequence[int]) -> Tensor:
        active = feat_acts[list(positions)].ne(0).any(0).nonzero()[:, 0]
        return torch.cat([active, torch.tensor([n_f, n_f + 1])])

    return QKBasis(
        model=model,
        tokens=tokens,
        layer=layer,
        name="sae",
        table=table,
        frozen=_frozen_scales(captured, model, layer),
        contributions=contributions,
        live_rows=live_rows,
    )


# ---- dictionary-free components basis ------------------------------------------------------


def _components_basis(model: HookedTransformer, tokens: Tensor, layer: int) -> QKBasis:
    cfg = model.cfg
    standard_pos = cfg.positional_embedding_type in ("standard", "shortformer")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        raise UnsupportedArchitectureError(
            f"positional embedding {cfg.positional_embedding_type!r}: the components basis "
            "supports learned ('standard') and rotary positions"
        )
    names = ["hook_embed", *scale_hook_names(model, layer)]
    if standard_pos:
        names.append("hook_pos_embed")
    post = [hasattr(model.blocks[m], "ln1_post") for m in range(layer)]
    for m in range(layer):
        names.append(f"blocks.{m}.attn.hook_z")
        if not cfg.attn_only:
            names.append(f"blocks.{m}.hook_mlp_out")
        if post[m]:
            names.append(f"blocks.{m}.ln1_post.hook_scale")
    captured = _capture(model, tokens, names)
    dtype = captured["hook_embed"].dtype
    values = [captured["hook_embed"][0]]  # each [pos, d_model]
    rows = [("embed", -1, -1, -1, "token embedding")]
    if standard_pos:
        values.append(captured["hook_pos_embed"][0])
        rows.append(("pos_embed", -1, -1, -1, "positional embedding"))
    bias = torch.zeros_like(values[0])
    for m in range(layer):
        block = model.blocks[m]
        z = captured[f"blocks.{m}.attn.hook_z"][0]  # [pos, n_heads, d_head]
        heads = torch.einsum("phe,hed->hpd", z, block.attn.W_O.detach())
        b_O = block.attn.b_O.detach().expand_as(bias)
        if post[m]:
            norm = _frozen_norm(block.ln1_post, captured[f"blocks.{m}.ln1_post.hook_scale"][0])
            heads, b_O = norm.forward_linear(heads), norm.forward_linear(b_O)
            post_bias = getattr(block.ln1_post, "b", None)
            if post_bias is not None:
                b_O = b_O + post_bias.detach()
        bias = bias + b_O
        values += list(heads)
        rows += [("head", m, -1, h, f"L{m}H{h}") for h in range(cfg.n_heads)]
        if not cfg.attn_only:
            values.append(captured[f"blocks.{m}.hook_mlp_out"][0])
            rows.append(("mlp", m, -1, -1, f"MLP{m}"))
    values.append(bias)
    rows.append(("bias", -1, -1, -1, "biases (b_O, post-norm biases)"))
    stacked = torch.stack(values).to(dtype)  # [n, pos, d_model]
    all_rows = torch.arange(len(rows))

    def contributions(r: Tensor, positions: Sequence[int]) -> Tensor:
        return stacked[r][:, list(positions)]

    def live_rows(positions: Sequence[int]) -> Tensor:
        return all_rows

    return QKBasis(
        model=model,
        tokens=tokens,
        layer=layer,
        name="components",
        table=_table(rows),
        frozen=_frozen_scales(captured, model, layer),
        contributions=contributions,
        live_rows=live_rows,
    )
