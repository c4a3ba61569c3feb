"""What every QK basis shares: component tables, component ids, the frozen scales the
projection reads, and which head a side reads (DESIGN.md §4).

Component ids: ``0..n-1`` index a basis's :class:`ComponentTable`; ``BIAS`` (-1) is the last
row and ``EXCLUDED`` (-2) the one before it (the graph basis's left-out nodes), so negative
ids index the table the Python way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_circuits.errors import UnsupportedArchitectureError
from tl_circuits.typing import Int, typechecked

if TYPE_CHECKING:
    from tl_circuits.attention.qk.reverse import ReverseHeadVectors

BIAS = -1  #: component id of the bias term (the last row of a basis table)
EXCLUDED = -2  #: component id of the nodes left out of a graph (graph basis)

Side = Literal["q", "k"]
#: ``contributions(rows, positions)`` -> ``[len(rows), len(positions), d_model]``
Contributions = Callable[[Tensor, Sequence[int]], Tensor]
#: ``live_rows(positions)`` -> table rows that can be nonzero there (with the bias row)
LiveRows = Callable[[Sequence[int]], Tensor]


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


def component_table(rows: list[tuple[str, int, int, int, str]]) -> ComponentTable:
    """A table from ``(kind, layer, pos, index, label)`` rows."""
    kinds, layers, poss, idx, labels = zip(*rows, strict=True)
    return ComponentTable(
        kind=tuple(kinds),
        layer=torch.tensor(layers, dtype=torch.long),
        pos=torch.tensor(poss, dtype=torch.long),
        index=torch.tensor(idx, dtype=torch.long),
        label=tuple(labels),
    )


@dataclass(frozen=True, eq=False)
class BasisParts:
    """What a basis builder returns (see :class:`~tl_circuits.attention.qk.basis.QKBasis`
    for the fields)."""

    name: str
    table: ComponentTable
    frozen: dict[str, Tensor]
    contributions: Contributions
    live_rows: LiveRows
    reverse: ReverseHeadVectors | None = None


def side_head(cfg: Any, head: int, side: Side) -> int:
    """The query head itself, or the key head it reads under GQA."""
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    return head if side == "q" else head // group


def frozen_scales(captured: dict[str, Tensor], model: HookedTransformer, layer: int) -> dict:
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


def capture(model: HookedTransformer, tokens: Tensor, names: Sequence[str]) -> dict:
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


def score_hook_names(cfg: Any, layer: int) -> tuple[str, str]:
    """The hooks holding layer ``layer``'s final query and key vectors (after QK-norm and
    rotary): ``hook_rot_q/k`` in rotary models, else ``hook_q/k``."""
    prefix = f"blocks.{layer}.attn."
    if cfg.positional_embedding_type == "rotary":
        return prefix + "hook_rot_q", prefix + "hook_rot_k"
    return prefix + "hook_q", prefix + "hook_k"


def pre_cap_scores(model: HookedTransformer, q: Tensor, k: Tensor, layer: int) -> Tensor:
    """Pre-soft-cap scores ``q . k / attn_scale`` ``[n_heads, pos, pos]`` from the vectors at
    :func:`score_hook_names` (``[pos, n_heads or n_kv_heads, d_head]``, batch dim dropped;
    keys repeated to their query heads under GQA)."""
    cfg = model.cfg
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    k = k.repeat_interleave(group, dim=1)
    return torch.einsum("qhe,khe->hqk", q, k) / model.blocks[layer].attn.attn_scale
