"""The splice: TransformerLens hooks that replace every MLP output by its transcoder.

Shared by the local replacement model of one prompt
(:class:`~tl_circuits.replacement.context.ReplacementContext`, constant error terms), by
interventions and by steered generation (live error terms). :class:`Recording` collects what
a spliced forward pass computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_circuits.transcoders.base import Transcoders


@dataclass
class Recording:
    """Values captured during a replacement forward pass (batch dimension kept).

    ``x_in[l]``, ``pre_activations[l]``, ``activations[l]``: the live transcoder input,
    pre-activations and (edited) activations used at layer ``l``;
    ``reference_activations[l]``: the activations before any edit; ``logits_pre_cap``: the
    unembedding output before any logit soft-cap, ``[batch, pos, d_vocab]``;
    ``final_normalized``: the final norm's output (the unembedding's input),
    ``[batch, pos, d_model]``.
    """

    x_in: dict[int, Tensor] = field(default_factory=dict)
    pre_activations: dict[int, Tensor] = field(default_factory=dict)
    activations: dict[int, Tensor] = field(default_factory=dict)
    reference_activations: dict[int, Tensor] = field(default_factory=dict)
    logits_pre_cap: Tensor | None = None
    final_normalized: Tensor | None = None


#: ``edit(layer, acts)`` -> edited activations ``[batch, pos, d_sae]`` (an intervention).
ActivationEdit = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class CleanSplice:
    """Cached clean values for the constant-error splice (batch dim 1 on the first two)."""

    mlp_out: list[Tensor]  # [1, pos, d_model] per layer
    reconstruction: list[Tensor]  # [1, pos, d_model] per layer
    errors: list[Tensor]  # [pos, d_model] per layer


def splice_hooks(
    transcoders: Transcoders,
    rec: Recording,
    *,
    given_acts: Mapping[int, Tensor] | None = None,
    edit: ActivationEdit | None = None,
    edit_target_layers: range | None = None,
    clean: CleanSplice | None = None,
    errors: Mapping[int, Tensor] | None = None,
) -> list[tuple[str, Callable]]:
    """TransformerLens hooks that replace every MLP output by its transcoder.

    At each layer's input hook the activations are computed (or taken from
    ``given_acts``) into ``rec.reference_activations``, and ``edit`` applied into
    ``rec.activations``. At the output hook the reconstruction ``recon_new`` decodes the
    edited activations (for target layers in ``edit_target_layers``, else the reference
    ones). Two error modes:

    - ``clean`` given (constant error, the local replacement model of one prompt):
      ``out = mlp_out_clean + (recon_new - recon_clean)``, plus any ``errors`` override;
    - ``clean`` None (live error, any sequence, e.g. generation):
      ``out = mlp_out_live + (recon_new - recon_reference)``: the true MLP output, steered.

    With nothing edited both reproduce the unspliced model exactly.
    """
    hooks: list[tuple[str, Callable]] = []

    def make_input_hook(layer: int) -> Callable:
        encoder = transcoders.encoder(layer)

        def on_input(x: Tensor, hook: HookPoint) -> Tensor:
            rec.x_in[layer] = x
            pre = encoder.pre_activations(x)
            rec.pre_activations[layer] = pre
            given = None if given_acts is None else given_acts.get(layer)
            acts = encoder.activations(pre) if given is None else given
            rec.reference_activations[layer] = acts
            rec.activations[layer] = acts if edit is None else edit(layer, acts)
            return x

        return on_input

    def make_output_hook(layer: int) -> Callable:
        decode_edited = edit_target_layers is None or layer in edit_target_layers

        def on_output(out: Tensor, hook: HookPoint) -> Tensor:
            used = rec.activations if decode_edited else rec.reference_activations
            recon = transcoders.reconstruct(layer, used, rec.x_in[layer])
            if clean is None:
                reference = transcoders.reconstruct(
                    layer, rec.reference_activations, rec.x_in[layer]
                )
                return out + (recon - reference)
            new = clean.mlp_out[layer] + (recon - clean.reconstruction[layer])
            if errors is not None and layer in errors:
                new = new + (errors[layer] - clean.errors[layer])
            return new

        return on_output

    for layer in range(transcoders.n_layers):
        hooks.append((transcoders.input_hook(layer), make_input_hook(layer)))
        hooks.append((transcoders.output_hook(layer), make_output_hook(layer)))
    return hooks


@contextmanager
def recording_outputs(model: HookedTransformer, rec: Recording) -> Iterator[None]:
    """Record the final norm's output and the pre-soft-cap logits into ``rec``."""

    def keep_pre_cap(_module: torch.nn.Module, _inputs: tuple, out: Tensor) -> None:
        rec.logits_pre_cap = out

    def keep_final(_module: torch.nn.Module, _inputs: tuple, out: Tensor) -> None:
        rec.final_normalized = out

    handles = [
        model.unembed.register_forward_hook(keep_pre_cap),
        model.ln_final.register_forward_hook(keep_final),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
