"""QK-circuit interventions (DESIGN.md §4, Q2): scale components inside chosen heads' QK circuit.

Scaling component ``i`` by ``c`` on the query side of head ``h`` adds ``(c - 1) q_i`` to the
head's query vectors, where ``q_i`` is the component's query contribution *before* QK-norm and
rotary (``LN1(x_i) @ W_Q[h]``, frozen ln1 scale, the bias row with its constants) -- the
value at ``hook_q``. Only ``h``'s query vector changes; its values, every other head and the
residual stream are untouched, so the model then runs on and the downstream effect on the
prediction is measured. With the QK-norm scale frozen (``freeze_qk_norm``, default) the new
scores are exactly ``score + (c - 1) * sum_j T[i, j]`` (the component's query marginal);
the key side is the same with ``hook_k`` and the key marginals.

Under grouped-query attention a key head is shared by ``group`` query heads, and ``hook_k``
cannot tell them apart: a key-side intervention must choose every query head of each key
head it touches (else :class:`QKError`).

``freeze_other_heads`` (default) pins every other head's scores -- hence its attention pattern
-- to the clean run's, in every layer; with ``False`` they are recomputed (live attention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_circuits.attention.qk.basis import QKBasis
from tl_circuits.attention.qk.components import (
    Side,
    pre_cap_scores,
    score_hook_names,
    side_head,
)
from tl_circuits.errors import QKError, UnsupportedArchitectureError
from tl_circuits.typing import Float, Int, typechecked


@typechecked
@dataclass(frozen=True)
class QKInterventionResult:
    """What a QK-circuit intervention did.

    - ``heads``: the chosen heads (of ``layer``)
    - ``scores`` / ``clean_scores``: their pre-soft-cap scores ``[n_chosen, pos, pos]``
      (``q . k / attn_scale``, every entry; only ``key <= query`` is attended)
    - ``patterns`` / ``clean_patterns``: their attention patterns ``[n_chosen, pos, pos]``
    - ``attn_scores``: ``hook_attn_scores`` of every head ``[n_layers, n_heads, pos, pos]``
      in the intervened run (after any soft-cap, masked entries ``-inf``)
    - ``logits`` / ``clean_logits``: ``[pos, d_vocab]``
    """

    layer: int
    heads: Int[Tensor, " n_chosen"]
    scores: Float[Tensor, "n_chosen pos pos"]
    clean_scores: Float[Tensor, "n_chosen pos pos"]
    patterns: Float[Tensor, "n_chosen pos pos"]
    clean_patterns: Float[Tensor, "n_chosen pos pos"]
    attn_scores: Float[Tensor, "n_layers n_heads pos pos"]
    logits: Float[Tensor, "pos d_vocab"]
    clean_logits: Float[Tensor, "pos d_vocab"]

    def top_predictions(
        self, k: int = 5, pos: int = -1, *, clean: bool = False
    ) -> list[tuple[int, float]]:
        """The ``k`` most likely next tokens at ``pos`` as (token id, probability)."""
        probs = (self.clean_logits if clean else self.logits)[pos].softmax(-1)
        top = probs.topk(k)
        return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


@typechecked
def intervene_qk(
    basis: QKBasis,
    scales: Mapping[int, float],
    *,
    side: Side,
    heads: Sequence[int],
    positions: Sequence[int] | None = None,
    freeze_other_heads: bool = True,
    freeze_qk_norm: bool = True,
) -> QKInterventionResult:
    """Scale components (``scales``: component id -> factor ``c``) on the query (``side="q"``)
    or key side of ``heads`` of ``basis.layer``, at ``positions`` (default: all), and run the
    model. See the module docstring for what is frozen."""
    model, layer = basis.model, basis.layer
    cfg = model.cfg
    chosen = _check_heads(cfg, heads)
    if not scales:
        raise QKError("no components to scale")
    n = len(basis.table)
    for c in scales:
        if not -n <= c < n:
            raise QKError(f"component id {c} outside the basis table ({n} rows)")
    pos = list(range(basis.n_pos)) if positions is None else list(positions)
    if any(not 0 <= p < basis.n_pos for p in pos):
        raise QKError(f"positions {pos} outside the prompt (length {basis.n_pos})")
    if cfg.positional_embedding_type != "rotary" and cfg.use_qk_norm:
        raise UnsupportedArchitectureError(
            "QK interventions read the scores from hook_rot_q/k or hook_q/k; a model with "
            "QK-norm and no rotary has no hook after the norm"
        )
    side_heads = _side_heads(cfg, chosen, side)
    rows = torch.tensor([basis.table.row(c) for c in scales])
    factors = torch.tensor([c - 1.0 for c in scales.values()])
    deltas = {}
    for reader, head in side_heads.items():
        vec = basis.project(head, rows, pos, side, finish=False)  # [n_r, P, d_head]
        deltas[reader] = torch.einsum("r,rpe->pe", factors.to(vec.dtype), vec)
    prefix = f"blocks.{layer}.attn."

    def add_delta(x: Tensor, hook: HookPoint) -> Tensor:
        x = x.clone()
        for reader, delta in deltas.items():
            x[:, pos, reader] += delta.to(x.dtype)
        return x

    clean = _run(basis, [], layer)
    hooks = [(prefix + f"hook_{side}", add_delta)]
    if freeze_qk_norm and cfg.use_qk_norm:
        for s in ("q", "k"):
            name = prefix + f"{s}_norm.hook_scale"
            hooks.append((name, _pinned(clean[name])))
    if freeze_other_heads:
        others = [h for h in range(cfg.n_heads) if h not in chosen]
        for m in range(cfg.n_layers):
            name = f"blocks.{m}.attn.hook_attn_scores"
            pinned = others if m == layer else list(range(cfg.n_heads))
            hooks.append((name, _pinned(clean[name], pinned)))
    new = _run(basis, hooks, layer)
    index = torch.tensor(chosen)
    return QKInterventionResult(
        layer=layer,
        heads=index,
        scores=new["scores"][index],
        clean_scores=clean["scores"][index],
        patterns=new[prefix + "hook_pattern"][0, index],
        clean_patterns=clean[prefix + "hook_pattern"][0, index],
        attn_scores=torch.stack(
            [new[f"blocks.{m}.attn.hook_attn_scores"][0] for m in range(cfg.n_layers)]
        ),
        logits=new["logits"],
        clean_logits=clean["logits"],
    )


def _check_heads(cfg, heads: Sequence[int]) -> list[int]:
    chosen = sorted(set(int(h) for h in heads))
    if not chosen:
        raise QKError("no heads chosen")
    for h in chosen:
        if not 0 <= h < cfg.n_heads:
            raise QKError(f"head {h} out of range [0, {cfg.n_heads})")
    return chosen


def _side_heads(cfg, chosen: list[int], side: Side) -> dict[int, int]:
    """Side head (query head, or shared key head) -> a chosen query head reading it; key
    heads must have every query head that shares them chosen."""
    out: dict[int, int] = {}
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    for h in chosen:
        s = side_head(cfg, h, side)
        if side == "k":
            sharing = list(range(s * group, (s + 1) * group))
            missing = [x for x in sharing if x not in chosen]
            if missing:
                raise QKError(
                    f"key head {s} is shared by query heads {sharing} (grouped-query "
                    f"attention); a key-side intervention changes all of them: choose heads "
                    f"{sharing} (missing {missing}) or intervene on the query side"
                )
        out.setdefault(s, h)
    return out


def _pinned(value: Tensor, heads: list[int] | None = None):
    """A hook returning the clean ``value`` (for ``heads`` only along dim 1, if given)."""

    def hook(x: Tensor, hook: HookPoint) -> Tensor:
        if heads is None:
            return value
        if not heads:
            return x
        x = x.clone()
        x[:, heads] = value[:, heads]
        return x

    return hook


def _run(basis: QKBasis, hooks: list, layer: int) -> dict[str, Tensor]:
    """Run ``basis.model`` on the prompt with ``hooks``; returns logits, every layer's
    ``hook_attn_scores``, this layer's pattern, QK-norm scales and pre-cap scores
    ``[n_heads, pos, pos]``."""
    model = basis.model
    cfg = model.cfg
    prefix = f"blocks.{layer}.attn."
    q_name, k_name = score_hook_names(cfg, layer)
    names = {q_name, k_name, prefix + "hook_pattern"}
    names |= {f"blocks.{m}.attn.hook_attn_scores" for m in range(cfg.n_layers)}
    if cfg.use_qk_norm:
        names |= {prefix + "q_norm.hook_scale", prefix + "k_norm.hook_scale"}
    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: HookPoint) -> None:
        kept[hook.name] = x.detach()

    # recording hooks go last so they see the edited values
    all_hooks = [*hooks, *[(name, keep) for name in sorted(names)]]
    with torch.no_grad(), model.hooks(fwd_hooks=all_hooks):
        logits = model(basis.tokens[None])
    kept["scores"] = pre_cap_scores(model, kept[q_name][0], kept[k_name][0], layer)
    kept["logits"] = logits[0].detach()
    return kept
