"""Trained weights -> SAE-Lens transcoders (per-layer) or a :class:`CrossLayerTranscoder`.

The trainer works in normalised units (``x_n = s_in x``, ``y_n = s_out y``); exporting
folds the scales into the weights so the saved transcoders act on raw activations:
``W_enc = s_in W_enc_n``, ``b_enc = b_enc_n``, ``threshold = threshold_n``,
``W_dec^(i->t) = W_dec_n^(i->t) / s_out[t]``, ``b_dec[t] = b_dec_n[t] / s_out[t]``,
``W_skip[t] = W_skip_n[t] s_in[t] / s_out[t]``.
"""

from __future__ import annotations

import warnings

import torch
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import JumpReLUTranscoder, SkipTranscoder, Transcoder
from torch import Tensor

from tl_circuits.model.hooks import SUPPORTED_OUTPUT_HOOK
from tl_circuits.training.trainable import TrainableTranscoder
from tl_circuits.transcoders.cross_layer import CrossLayerTranscoder
from tl_circuits.transcoders.per_layer import SAELENS_CLASSES, TranscoderSet


@torch.no_grad()
def raw_layer_tensors(module: TrainableTranscoder, source: int) -> dict[str, Tensor]:
    """Raw-unit tensors of source ``source`` (index among the trained layers), float32.

    Keys: ``W_enc [d, F]``, ``b_enc [F]``, ``W_dec [F, n_targets, d]``, ``b_dec [d]``
    (target ``source``), and ``threshold [F]`` / ``W_skip [d, d]`` where present.
    """
    s_in, s_out = module.scale_in, module.scale_out
    n_t = module.n_targets(source)
    out_scales = s_out[source : source + n_t]
    tensors = {
        "W_enc": module.W_enc[source] * s_in[source],
        "b_enc": module.b_enc[source].clone(),
        "W_dec": module.W_dec[source] / out_scales[None, :, None],
        "b_dec": module.b_dec[source] / s_out[source],
    }
    if module.log_threshold is not None:
        tensors["threshold"] = module.log_threshold[source].exp()
    if module.W_skip is not None:
        tensors["W_skip"] = module.W_skip[source] * (s_in[source] / s_out[source])
    return {name: t.detach().contiguous() for name, t in tensors.items()}


@torch.no_grad()
def to_saelens(
    module: TrainableTranscoder,
    layers: list[int],
    input_hook: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    fold_ln: bool,
    model_name: str,
) -> dict[int, Transcoder]:
    """One SAE-Lens transcoder per trained layer (model layer -> object)."""
    cfg = module.cfg
    sae_cls, cfg_cls = SAELENS_CLASSES[(cfg.skip, cfg.activation == "jumprelu")]
    d = module.d_model
    saes: dict[int, Transcoder] = {}
    for i, layer in enumerate(layers):
        tensors = raw_layer_tensors(module, i)
        sae_cfg = cfg_cls(
            d_in=d,
            d_sae=cfg.d_sae,
            d_out=d,
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
            apply_b_dec_to_input=False,
            metadata=SAEMetadata(
                hook_name=f"blocks.{layer}.{input_hook}",
                hook_name_out=f"blocks.{layer}.{SUPPORTED_OUTPUT_HOOK}",
                model_name=model_name,
                model_from_pretrained_kwargs={"fold_ln": fold_ln},
            ),
        )
        with warnings.catch_warnings():
            # SAE-Lens suggests how to load the model when fold_ln is recorded; we record it
            # on purpose (validate_transcoders checks it), so the advice is noise here
            warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")
            sae = sae_cls(sae_cfg)
        sae.W_enc.copy_(tensors["W_enc"])
        sae.b_enc.copy_(tensors["b_enc"])
        sae.W_dec.copy_(tensors["W_dec"][:, 0, :])
        sae.b_dec.copy_(tensors["b_dec"])
        if isinstance(sae, JumpReLUTranscoder):
            sae.threshold.copy_(tensors["threshold"])
        if isinstance(sae, SkipTranscoder):
            sae.W_skip.copy_(tensors["W_skip"])
        saes[layer] = sae.to(device=device, dtype=dtype).eval()
    return saes


def to_transcoder_set(saes: dict[int, Transcoder]) -> TranscoderSet | None:
    """A TranscoderSet when the layers are ``0..k-1``, else None (a set must start at 0)."""
    if sorted(saes) != list(range(len(saes))):
        return None
    return TranscoderSet.from_saelens([saes[layer] for layer in sorted(saes)])


@torch.no_grad()
def to_clt(
    module: TrainableTranscoder,
    input_hook: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    fold_ln: bool,
    model_name: str,
) -> CrossLayerTranscoder:
    """The trained cross-layer transcoder over every layer."""
    cfg = module.cfg
    layers = [
        {k: t.to(device=device, dtype=dtype) for k, t in raw_layer_tensors(module, i).items()}
        for i in range(module.n_sources)
    ]
    return CrossLayerTranscoder(
        layers,
        n_layers=module.n_sources,
        d_model=module.d_model,
        d_sae=cfg.d_sae,
        activation=cfg.activation,
        skip=cfg.skip,
        input_hook="blocks.{layer}." + input_hook,
        output_hook="blocks.{layer}." + SUPPORTED_OUTPUT_HOOK,
        fold_ln=fold_ln,
        model_name=model_name,
    )
