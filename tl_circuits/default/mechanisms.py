"""Measurements of the default model's circuits: head scores, accuracies, ablations.

- previous-token score of head ``(l, h)``: mean attention from position ``i`` to ``i - 1``
  over random filler sequences (positions ``i >= 2``, so the ``<bos>`` sink is excluded);
- induction score: mean attention from a copied token (position ``copy_start + j``) to the
  token after its first occurrence (``block_start + j + 1``), ``j = 0 .. L - 2``, over
  every repeated block of :attr:`SyntheticBatch.blocks`;
- copying / fact accuracy: the argmax next-token prediction is right at the positions of
  :attr:`SyntheticBatch.copy_mask` / ``fact_mask``; optionally with some heads' outputs
  zeroed (``hook_z``) or with transcoders spliced in.

All functions run the model in eval mode without gradients; scores are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from transformer_lens import HookedTransformer

from tl_circuits.default.synthetic import SyntheticBatch
from tl_circuits.typing import Bool, Float, Int, Tensor, typechecked

Head = tuple[int, int]
"""(layer, head)."""


def _patterns(model: HookedTransformer, tokens: Tensor) -> list[Tensor]:
    """Attention patterns ``[batch, head, q, k]`` of every layer."""
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens.to(model.cfg.device), names_filter=lambda n: n.endswith("hook_pattern")
        )
    return [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]


@typechecked
def previous_token_scores(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "n_layers n_heads"]:
    """Mean attention from position ``i`` to ``i - 1`` (``i >= 2``) of every head."""
    scores = []
    for pattern in _patterns(model, tokens):
        diag = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, head, pos - 1]
        scores.append(diag[..., 1:].mean(dim=(0, 2)))
    return torch.stack(scores).cpu()


def _copy_query_key(batch: SyntheticBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(sequence index, query position, key position) of every induction pair."""
    seq, q, k = [], [], []
    for b, start, copy, length in batch.blocks.tolist():
        j = torch.arange(length - 1)
        seq.append(torch.full((length - 1,), b))
        q.append(copy + j)
        k.append(start + j + 1)
    return torch.cat(seq), torch.cat(q), torch.cat(k)


@typechecked
def induction_scores(
    model: HookedTransformer, batch: SyntheticBatch
) -> Float[Tensor, "n_layers n_heads"]:
    """Mean attention from each second-copy token to the token after its first occurrence."""
    seq, q, k = _copy_query_key(batch)
    scores = []
    for pattern in _patterns(model, batch.tokens):
        scores.append(pattern[seq, :, q, k].mean(dim=0))  # [head]
    return torch.stack(scores).cpu()


def zero_heads_hooks(heads: Sequence[Head]) -> list[tuple[str, Callable]]:
    """Forward hooks that zero the outputs (``hook_z``) of the given heads."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def make(hs: list[int]) -> Callable:
        def hook(z: Tensor, hook) -> Tensor:  # z: [batch, pos, head, d_head]
            z = z.clone()
            z[:, :, hs] = 0.0
            return z

        return hook

    return [(f"blocks.{layer}.attn.hook_z", make(hs)) for layer, hs in by_layer.items()]


@typechecked
def accuracies(
    model: HookedTransformer,
    batch: SyntheticBatch,
    ablate_heads: Sequence[Head] = (),
    logits_fn: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Copying and fact accuracy (argmax next token) on ``batch``.

    ``ablate_heads`` zeroes those heads' ``hook_z``; ``logits_fn`` (tokens ``[batch, pos]``
    -> logits ``[batch, pos, d_vocab]``) replaces the model's forward pass, e.g. a spliced
    replacement model. Returns ``{"copy": ..., "fact": ...}``.
    """
    tokens = batch.tokens.to(model.cfg.device)
    with torch.no_grad():
        if logits_fn is not None:
            if ablate_heads:
                raise ValueError("pass either ablate_heads or logits_fn, not both")
            logits = logits_fn(tokens)
        else:
            ctx = model.hooks(fwd_hooks=zero_heads_hooks(ablate_heads)) if ablate_heads else None
            with ctx or nullcontext():
                logits = model(tokens)
    pred = logits[:, :-1].argmax(-1).cpu()
    right = pred == batch.tokens[:, 1:]
    return {
        "copy": float(right[batch.copy_mask[:, :-1]].float().mean()),
        "fact": float(right[batch.fact_mask[:, :-1]].float().mean()),
    }


@typechecked
def agreement(
    logits_a: Float[Tensor, "batch pos d_vocab"],
    logits_b: Float[Tensor, "batch pos d_vocab"],
    mask: Bool[Tensor, "batch pos"],
) -> float:
    """Fraction of masked positions where two models' argmax next tokens agree."""
    same = logits_a.argmax(-1) == logits_b.argmax(-1)
    return float(same[mask].float().mean())


def circuit_heads(
    prev_scores: Float[Tensor, "n_layers n_heads"], ind_scores: Float[Tensor, "n_layers n_heads"]
) -> tuple[tuple[int, int, float], tuple[int, int, float]]:
    """The induction head (highest induction score in a layer >= 1) and the previous-token
    head (highest previous-token score in an earlier layer), as ``(layer, head, score)``."""
    ind = ind_scores.clone()
    ind[0] = -1.0
    il, ih = divmod(int(ind.argmax()), ind.shape[1])
    prev = prev_scores[:il]
    pl, ph = divmod(int(prev.argmax()), prev.shape[1])
    return (pl, ph, float(prev_scores[pl, ph])), (il, ih, float(ind_scores[il, ih]))


@typechecked
def mlp_ablation_accuracies(
    model: HookedTransformer, batch: SyntheticBatch
) -> dict[int, dict[str, float]]:
    """Copying and fact accuracy with one layer's MLP output (``hook_mlp_out``) zeroed, for
    every layer: the layers whose ablation breaks facts are the fact-lookup layers."""
    result = {}
    for layer in range(model.cfg.n_layers):
        hooks = [(f"blocks.{layer}.hook_mlp_out", lambda out, hook: torch.zeros_like(out))]
        with model.hooks(fwd_hooks=hooks):
            result[layer] = accuracies(model, batch)
    return result
