"""The local replacement model of DESIGN.md §1 for one prompt.

:class:`ReplacementContext` runs the clean forward pass once and caches what the
replacement model needs: every norm scale (``hook_scale`` of ``ln1``, ``ln2``, ``ln1_post``,
``ln2_post``, ``ln_final``, ``q_norm``, ``k_norm``), every attention pattern, each layer's
transcoder input and MLP output. From those it computes feature pre-activations and
activations, the reconstructions and the error terms
``error(l, p) = mlp_out(l, p) - reconstruction(l, p)``.

``ctx.hooks(...)`` installs hooks that turn the model into the replacement model:

- frozen norm scales and attention patterns (the cached values, so gradients treat them as
  constants and interventions do not change them);
- each MLP output replaced by ``reconstruction(live x_in, live or given activations) +
  error``, computed as ``mlp_out_clean + (recon_live - recon_clean)`` so the clean forward
  pass is reproduced bit for bit.

With ``feature_acts`` given, feature activations are free inputs ("node mode") and the map
from node values (activations, errors, embeddings) to pre-activations and pre-soft-cap
logits is affine (invariant R2).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_circuits.errors import NonFiniteError, TranscoderConfigError
from tl_circuits.model.hooks import (
    check_supported_architecture,
    check_transcoder_hooks,
    install_mlp_input_hooks,
    model_has_folded_ln,
)
from tl_circuits.model.prompt import Prompt, to_tokens
from tl_circuits.replacement.splice import (
    ActivationEdit,
    CleanSplice,
    Recording,
    recording_outputs,
    splice_hooks,
)
from tl_circuits.transcoders.base import Transcoders, all_finite
from tl_circuits.typing import Float, Int, typechecked

if TYPE_CHECKING:
    from tl_circuits.replacement.frozen import FrozenLinearModel

EMBED_HOOK = "blocks.0.hook_resid_pre"


def _is_scale_hook(name: str) -> bool:
    return name.endswith(".hook_scale")


def _is_pattern_hook(name: str) -> bool:
    return name.endswith("attn.hook_pattern")


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype analyses of a model in ``dtype`` compute in: float32 for 16-bit floats."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def validate_transcoders(model: HookedTransformer, transcoders: Transcoders) -> None:
    """Every check of transcoders against a model; raises a TLCircuitsError subclass.

    Architecture supported; one transcoder per layer; ``d_in``/``d_out`` equal ``d_model``;
    hooks exist and fire with width ``d_model``; dtype and device match the model's; the
    ``fold_ln`` setting the transcoders were trained with matches the model's weights.
    """
    check_supported_architecture(model)
    transcoders.check_model(model)
    cfg = model.cfg
    if transcoders.n_layers > cfg.n_layers:
        extra = cfg.n_layers
        raise TranscoderConfigError(
            f"transcoder layer {extra} ({transcoders.input_hook(extra)!r}) is out of range: "
            f"the model has {cfg.n_layers} layers"
        )
    if transcoders.n_layers < cfg.n_layers:
        raise TranscoderConfigError(
            f"the transcoders cover layers 0..{transcoders.n_layers - 1} but the model has "
            f"{cfg.n_layers} layers; every MLP needs a transcoder"
        )
    for name, param in model.named_parameters():
        if not all_finite(param):
            raise NonFiniteError(f"model parameter {name!r} contains NaN/inf")
    if transcoders.d_model != cfg.d_model:
        raise TranscoderConfigError(
            f"transcoder d_in={transcoders.d_model} does not match the model's "
            f"d_model={cfg.d_model}"
        )
    transcoders.check_consistent()
    model_dtype = next(model.parameters()).dtype
    model_device = next(model.parameters()).device
    if transcoders.dtype != model_dtype:
        raise TranscoderConfigError(
            f"transcoders are {transcoders.dtype}, the model is {model_dtype}; "
            "convert one with .to()"
        )
    if transcoders.device.type != model_device.type:
        raise TranscoderConfigError(
            f"transcoders are on {transcoders.device}, the model on {model_device}"
        )
    folded = model_has_folded_ln(model)
    if transcoders.expects_folded_ln is not None and transcoders.expects_folded_ln != folded:
        raise TranscoderConfigError(
            f"the transcoders were trained with fold_ln={transcoders.expects_folded_ln} but the "
            f"model has fold_ln={folded} (normalization_type={cfg.normalization_type!r}); load "
            "the model with the matching setting"
        )
    install_mlp_input_hooks(model)
    check_transcoder_hooks(
        model,
        [transcoders.input_hook(layer) for layer in range(cfg.n_layers)],
        [transcoders.output_hook(layer) for layer in range(cfg.n_layers)],
    )


@typechecked
@dataclass(frozen=True)
class FeatureTable:
    """Active features (activation nonzero: > 0 for ReLU and JumpReLU; a TopK encoder keeps
    pre-activations of either sign), sorted by (layer, pos, feature)."""

    layer: Int[Tensor, " n"]
    pos: Int[Tensor, " n"]
    feature: Int[Tensor, " n"]
    activation: Float[Tensor, " n"]
    pre_activation: Float[Tensor, " n"]

    def __len__(self) -> int:
        return int(self.layer.shape[0])


@typechecked
@dataclass(frozen=True)
class ReconstructionStats:
    """Per-layer quality of the transcoders on this prompt.

    ``fvu``: fraction of variance unexplained, ``sum |error|^2 / sum |mlp_out - mean|^2``
    over positions; ``relative_error``: ``|error|_F / |mlp_out|_F``; ``l0``: mean number of
    active features per position (features of that source layer).
    """

    fvu: Float[Tensor, " n_layers"]
    relative_error: Float[Tensor, " n_layers"]
    l0: Float[Tensor, " n_layers"]


class ReplacementContext:
    """Cached clean run of ``model`` on one prompt, and the hooks of its replacement model.

    Attributes (no batch dimension): ``tokens [pos]``, ``logits [pos, d_vocab]``,
    ``logits_pre_cap``, ``embeddings [pos, d_model]`` (token + positional embedding, the
    token nodes' value), and per layer ``l`` lists ``x_in``, ``mlp_out``, ``reconstruction``,
    ``errors`` (``[pos, d_model]``) and ``pre_activations``, ``activations``
    (``[pos, d_sae(l)]``). ``frozen`` maps each norm-scale and pattern hook to its cached
    value (batch dimension 1).
    """

    @typechecked
    def __init__(self, model: HookedTransformer, transcoders: Transcoders, prompt: Prompt) -> None:
        validate_transcoders(model, transcoders)
        self.model = model
        self.transcoders = transcoders
        self.tokens: Tensor = to_tokens(model, prompt)
        n_layers = model.cfg.n_layers
        in_hooks = [transcoders.input_hook(layer) for layer in range(n_layers)]
        out_hooks = [transcoders.output_hook(layer) for layer in range(n_layers)]
        frozen_names = [n for n in model.hook_dict if _is_scale_hook(n) or _is_pattern_hook(n)]
        wanted = set(in_hooks) | set(out_hooks) | set(frozen_names) | {EMBED_HOOK}

        captured: dict[str, Tensor] = {}

        def keep(tensor: Tensor, hook: HookPoint) -> None:
            captured[hook.name] = tensor.detach()

        pre_cap: list[Tensor] = []
        final: list[Tensor] = []
        handle = model.unembed.register_forward_hook(
            lambda _m, _i, out: pre_cap.append(out.detach())
        )
        handle_final = model.ln_final.register_forward_hook(
            lambda _m, _i, out: final.append(out.detach())
        )
        try:
            with torch.no_grad():
                logits = model.run_with_hooks(
                    self.tokens[None], fwd_hooks=[(name, keep) for name in wanted]
                )
        finally:
            handle.remove()
            handle_final.remove()
        for name, value in [("logits", logits), *captured.items()]:
            if not torch.isfinite(value).all():
                raise NonFiniteError(f"the clean forward pass produced NaN/inf at {name!r}")

        self.logits: Tensor = logits[0].detach()
        self.logits_pre_cap: Tensor = pre_cap[0][0]
        self.final_normalized: Tensor = final[0][0]
        self.frozen: dict[str, Tensor] = {n: captured[n] for n in frozen_names if n in captured}
        self._embeddings_b = captured[EMBED_HOOK]
        self.embeddings: Tensor = self._embeddings_b[0]
        # Per-layer values are computed on [1, pos, ...] tensors, the shapes the hooks see,
        # so the clean replacement forward repeats them bit for bit.
        self._x_in_b = [captured[h] for h in in_hooks]
        self._mlp_out_b = [captured[h] for h in out_hooks]
        with torch.no_grad():
            self._pre_b = [
                transcoders.encoder(layer).pre_activations(self._x_in_b[layer])
                for layer in range(n_layers)
            ]
            self._acts_b = [
                transcoders.encoder(layer).activations(self._pre_b[layer])
                for layer in range(n_layers)
            ]
            acts = dict(enumerate(self._acts_b))
            self._recon_b = [
                transcoders.reconstruct(layer, acts, self._x_in_b[layer])
                for layer in range(n_layers)
            ]
        self._errors_b = [m - r for m, r in zip(self._mlp_out_b, self._recon_b, strict=False)]
        self.x_in = [t[0] for t in self._x_in_b]
        self.mlp_out = [t[0] for t in self._mlp_out_b]
        self.pre_activations = [t[0] for t in self._pre_b]
        self.activations = [t[0] for t in self._acts_b]
        self.reconstruction = [t[0] for t in self._recon_b]
        self.errors = [t[0] for t in self._errors_b]

    # ---- summaries -------------------------------------------------------------------

    @functools.cached_property
    def linear(self) -> FrozenLinearModel:
        """This prompt's frozen replacement model as explicit linear operators (built once,
        shared by graph building, head loadings and QK attribution)."""
        from tl_circuits.replacement.frozen import FrozenLinearModel

        return FrozenLinearModel(self)

    @functools.cached_property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the linear analyses (edges, head loadings, QK terms, influence) compute
        and accumulate in: float32 for a bfloat16 / float16 model (DESIGN.md §1, dtypes),
        the model's own dtype otherwise. The clean run and the splice stay in the model's
        dtype, so R1 holds bit for bit in any dtype."""
        return compute_dtype_for(self.embeddings.dtype)

    def in_compute(self, tensor: Tensor) -> Tensor:
        """``tensor`` in :attr:`compute_dtype` (itself when it already is)."""
        return tensor.to(self.compute_dtype)

    @functools.cached_property
    def compute_embeddings(self) -> Tensor:
        """:attr:`embeddings` in :attr:`compute_dtype` ``[pos, d_model]``."""
        return self.in_compute(self.embeddings)

    @functools.cached_property
    def compute_errors(self) -> list[Tensor]:
        """:attr:`errors` in :attr:`compute_dtype` (per layer ``[pos, d_model]``)."""
        return [self.in_compute(e) for e in self.errors]

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    def active_features(self) -> FeatureTable:
        """Every (layer, pos, feature) with a nonzero activation."""
        layers, poss, feats, acts, pres = [], [], [], [], []
        for layer in range(self.n_layers):
            pos, feat = (self.activations[layer] != 0).nonzero(as_tuple=True)
            layers.append(torch.full_like(pos, layer))
            poss.append(pos)
            feats.append(feat)
            acts.append(self.activations[layer][pos, feat])
            pres.append(self.pre_activations[layer][pos, feat])
        return FeatureTable(
            torch.cat(layers), torch.cat(poss), torch.cat(feats), torch.cat(acts), torch.cat(pres)
        )

    def reconstruction_stats(self) -> ReconstructionStats:
        """FVU, relative error and L0 per layer on this prompt."""
        fvu, rel, l0 = [], [], []
        for layer in range(self.n_layers):
            out, err = self.mlp_out[layer].float(), self.errors[layer].float()
            centred = out - out.mean(0, keepdim=True)
            fvu.append(err.pow(2).sum() / centred.pow(2).sum().clamp_min(1e-30))
            rel.append(err.norm() / out.norm().clamp_min(1e-30))
            l0.append((self.activations[layer] != 0).float().sum(-1).mean())
        return ReconstructionStats(torch.stack(fvu), torch.stack(rel), torch.stack(l0))

    # ---- the replacement model -------------------------------------------------------

    @contextmanager
    def hooks(
        self,
        *,
        feature_acts: Mapping[int, Tensor] | None = None,
        errors: Mapping[int, Tensor] | None = None,
        embeddings: Tensor | None = None,
        freeze_attention: bool = True,
        freeze_norms: bool = True,
        edit: ActivationEdit | None = None,
        edit_target_layers: range | None = None,
        record: Recording | None = None,
    ) -> Iterator[Recording]:
        """Install the replacement-model hooks for the duration of a ``with`` block.

        ``feature_acts[l]`` (``[pos, d_sae]``, or with a batch dim) replaces layer ``l``'s
        activations as free inputs (layers not given are computed from the live encoder);
        ``errors[l]`` (``[pos, d_model]``) replaces the error term; ``embeddings``
        (``[pos, d_model]``) replaces the token nodes' value (residual stream entering
        block 0). ``freeze_attention`` / ``freeze_norms`` pin patterns / norm scales to
        their clean values. ``edit(layer, acts)`` returns edited activations (an
        intervention); they are decoded into the MLP outputs of ``edit_target_layers`` only
        (default: all). Yields the :class:`Recording` filled during forward passes; run the
        model on ``ctx.tokens[None]``.
        """
        rec = record if record is not None else Recording()
        fwd_hooks = []

        def frozen_value(_tensor: Tensor, hook: HookPoint) -> Tensor:
            return self.frozen[hook.name]

        for name in self.frozen:
            if (freeze_norms and _is_scale_hook(name)) or (
                freeze_attention and _is_pattern_hook(name)
            ):
                fwd_hooks.append((name, frozen_value))

        if embeddings is not None:
            delta = embeddings - self.embeddings
            fwd_hooks.append((EMBED_HOOK, lambda t, hook: t + delta))

        fwd_hooks += splice_hooks(
            self.transcoders,
            rec,
            given_acts=feature_acts,
            edit=edit,
            edit_target_layers=edit_target_layers,
            clean=CleanSplice(self._mlp_out_b, self._recon_b, self.errors),
            errors=errors,
        )
        with recording_outputs(self.model, rec), self.model.hooks(fwd_hooks=fwd_hooks):
            yield rec

    def run_zero_nodes(self, capture: tuple[str, ...] = ()) -> tuple[Recording, dict[str, Tensor]]:
        """The frozen replacement model with every node (features, errors, embeddings) set
        to zero: what remains is the contribution of the constants (biases, ``b_dec``, norm
        biases). Returns the recording and the values of the ``capture`` hooks (batch dim
        kept)."""
        captured: dict[str, Tensor] = {}

        def keep(tensor: Tensor, hook: HookPoint) -> None:
            captured[hook.name] = tensor.detach()

        zeros = {layer: torch.zeros_like(a) for layer, a in enumerate(self.activations)}
        errors = {layer: torch.zeros_like(e) for layer, e in enumerate(self.errors)}
        with (
            torch.no_grad(),
            self.hooks(
                feature_acts=zeros, errors=errors, embeddings=torch.zeros_like(self.embeddings)
            ) as rec,
            self.model.hooks(fwd_hooks=[(name, keep) for name in capture]),
        ):
            # every constant is read before the unembedding: stop there (it copies W_U)
            resid = self.model(self.tokens[None], stop_at_layer=self.model.cfg.n_layers)
            self.model.ln_final(resid)  # recorded as the final norm's output
        return rec, captured

    def run(self, **hook_kwargs: object) -> tuple[Tensor, Recording]:
        """One replacement forward pass on the prompt: ``(logits [pos, d_vocab], recording)``.

        Keyword arguments are those of :meth:`hooks`. Gradients flow (no ``no_grad``).
        """
        with self.hooks(**hook_kwargs) as rec:  # type: ignore[arg-type]
            logits = self.model(self.tokens[None])
        return logits[0], rec
