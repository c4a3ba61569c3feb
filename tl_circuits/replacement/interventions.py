"""Feature interventions to validate what a graph claims, and steered generation.

An intervention sets, scales or zeroes one feature's activation at one position (or all).
:func:`intervene` runs the replacement model of a prompt (:class:`ReplacementContext`)
with the interventions:

- downstream features are recomputed from their encoders (the replacement model is
  "live"), error terms stay at their clean values;
- ``freeze_attention`` / ``freeze_norms`` pin attention patterns / norm scales to the
  clean run (default: live);
- ``constrained=(first, last)`` restricts the change to layers ``first..last``: edited
  activations are decoded only into those layers' MLP outputs, and the features of those
  layers are held at their clean values (not recomputed); layers after ``last`` run live.
  With ``last`` the final layer and attention frozen this isolates direct effects: zeroing
  a feature then moves each logit target by exactly minus its graph edge.

:func:`steered_generate` generates text with the same interventions applied at every step,
with the true MLP outputs steered by the decoded change (errors recomputed live, since new
positions have no clean run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_circuits.errors import TLCircuitsError
from tl_circuits.model.prompt import Prompt, to_tokens
from tl_circuits.replacement.context import ReplacementContext, validate_transcoders
from tl_circuits.replacement.splice import Recording, recording_outputs, splice_hooks
from tl_circuits.transcoders.base import Transcoders
from tl_circuits.typing import Float, typechecked


class InterventionError(TLCircuitsError):
    """An intervention names a layer, feature or position that does not exist."""


@dataclass(frozen=True)
class FeatureIntervention:
    """Change feature ``feature`` of layer ``layer`` at ``pos`` (None: every position).

    Exactly one of ``value`` (set the activation) and ``scale`` (multiply it) is given;
    :meth:`zero` is ``scale=0``.
    """

    layer: int
    feature: int
    pos: int | None = None
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise InterventionError("give exactly one of value= and scale=")

    @classmethod
    def zero(cls, layer: int, feature: int, pos: int | None = None) -> FeatureIntervention:
        return cls(layer, feature, pos, scale=0.0)

    def check(self, transcoders: Transcoders, n_pos: int | None) -> None:
        if not 0 <= self.layer < transcoders.n_layers:
            raise InterventionError(f"layer {self.layer} out of range [0, {transcoders.n_layers})")
        d_sae = transcoders.d_sae(self.layer)
        if not 0 <= self.feature < d_sae:
            raise InterventionError(
                f"feature {self.feature} out of range for layer {self.layer} (d_sae={d_sae})"
            )
        if self.pos is not None and n_pos is not None and not -n_pos <= self.pos < n_pos:
            raise InterventionError(f"position {self.pos} outside the prompt (length {n_pos})")


def _edit_function(interventions: Sequence[FeatureIntervention]):
    by_layer: dict[int, list[FeatureIntervention]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv)

    def edit(layer: int, acts: Tensor) -> Tensor:
        ivs = by_layer.get(layer)
        if not ivs:
            return acts
        acts = acts.clone()
        for iv in ivs:
            where = slice(None) if iv.pos is None else iv.pos
            if iv.value is not None:
                acts[..., where, iv.feature] = iv.value
            else:
                acts[..., where, iv.feature] = acts[..., where, iv.feature] * iv.scale
        return acts

    return edit


@typechecked
@dataclass(frozen=True)
class InterventionResult:
    """Outputs of an intervened run (no batch dimension).

    ``logits``: the model's (soft-capped) logits; ``logits_pre_cap``: before any soft-cap;
    ``activations[l]``: layer ``l``'s feature activations as used, ``[pos, d_sae]``;
    ``final_normalized``: the final norm's output.
    """

    logits: Float[Tensor, "pos d_vocab"]
    logits_pre_cap: Float[Tensor, "pos d_vocab"]
    activations: list[Tensor]
    final_normalized: Float[Tensor, "pos d_model"]


def intervene(
    ctx: ReplacementContext,
    interventions: Sequence[FeatureIntervention],
    *,
    freeze_attention: bool = False,
    freeze_norms: bool | None = None,
    constrained: tuple[int, int] | None = None,
) -> InterventionResult:
    """Run the prompt's replacement model with ``interventions`` (module docstring).

    ``freeze_norms`` defaults to ``freeze_attention``.
    """
    for iv in interventions:
        iv.check(ctx.transcoders, ctx.n_pos)
    given = None
    targets = None
    if constrained is not None:
        first, last = constrained
        if not 0 <= first <= last < ctx.n_layers:
            raise InterventionError(
                f"constrained range {constrained} must satisfy 0 <= first <= last < {ctx.n_layers}"
            )
        outside = [iv.layer for iv in interventions if not first <= iv.layer <= last]
        if outside:
            raise InterventionError(
                f"interventions at layers {outside} lie outside the constrained range {constrained}"
            )
        given = {layer: ctx.activations[layer][None] for layer in range(first, last + 1)}
        targets = range(first, last + 1)
    with torch.no_grad():
        logits, rec = ctx.run(
            feature_acts=given,
            edit=_edit_function(interventions),
            edit_target_layers=targets,
            freeze_attention=freeze_attention,
            freeze_norms=freeze_attention if freeze_norms is None else freeze_norms,
        )
    return _result(logits, rec, ctx.n_layers)


def _result(logits: Tensor, rec: Recording, n_layers: int) -> InterventionResult:
    assert rec.logits_pre_cap is not None and rec.final_normalized is not None
    return InterventionResult(
        logits=logits,
        logits_pre_cap=rec.logits_pre_cap[0],
        activations=[rec.activations[layer][0] for layer in range(n_layers)],
        final_normalized=rec.final_normalized[0],
    )


def steered_generate(
    model: HookedTransformer,
    transcoders: Transcoders,
    prompt: Prompt,
    interventions: Sequence[FeatureIntervention] = (),
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Generate ``max_new_tokens`` tokens with ``interventions`` applied at every step.

    Interventions with ``pos=None`` apply to every position, new ones included. Greedy
    when ``temperature`` is 0. Returns all tokens ``[prompt + new]``. With no
    interventions this is exactly the model's own greedy generation.
    """
    validate_transcoders(model, transcoders)
    tokens = to_tokens(model, prompt)
    for iv in interventions:
        iv.check(transcoders, None)
    if max_new_tokens < 0:
        raise TLCircuitsError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if tokens.shape[0] + max_new_tokens > model.cfg.n_ctx:
        raise TLCircuitsError(
            f"prompt ({tokens.shape[0]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"n_ctx={model.cfg.n_ctx}"
        )
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    edit = _edit_function(interventions)
    for _ in range(max_new_tokens):
        rec = Recording()
        hooks = splice_hooks(transcoders, rec, edit=edit)
        with torch.no_grad(), recording_outputs(model, rec), model.hooks(fwd_hooks=hooks):
            logits = model(tokens[None])[0, -1]
        if temperature == 0:
            nxt = logits.argmax()
        else:
            probs = torch.softmax(logits.double() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen)[0]
        tokens = torch.cat([tokens, nxt.view(1).to(tokens.dtype)])
    return tokens
