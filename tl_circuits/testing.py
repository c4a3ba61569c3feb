"""Random-weight models and transcoders for tests, benchmarks and examples.

No download: models are built from ``HookedTransformerConfig`` for six architecture
families and every parameter (biases and norm weights included) is randomised so no term
of the maths is trivially zero. Transcoders are real SAE-Lens objects (or a
:class:`CrossLayerTranscoder`) whose thresholds are calibrated on the model so a chosen
fraction of features is active.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import JumpReLUTranscoder, SkipTranscoder
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_circuits.model.hooks import install_mlp_input_hooks
from tl_circuits.transcoders.cross_layer import CrossLayerTranscoder
from tl_circuits.transcoders.per_layer import SAELENS_CLASSES, TranscoderSet

Family = Literal["gpt2", "llama", "qwen3", "gemma2", "gemma3", "pythia"]
FAMILIES: tuple[Family, ...] = ("gpt2", "llama", "qwen3", "gemma2", "gemma3", "pythia")
TranscoderKind = Literal["relu", "skip", "jumprelu", "jumprelu_skip", "topk"]
#: the SAE-Lens classes, and TopK (a ReLU ``Transcoder`` whose set keeps the top k)
TRANSCODER_KINDS: tuple[TranscoderKind, ...] = (
    "relu",
    "skip",
    "jumprelu",
    "jumprelu_skip",
    "topk",
)

_FAMILY_CONFIG: dict[str, dict] = {
    # LayerNorm, learned positions, biases everywhere
    "gpt2": dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"),
    # RMSNorm, rotary, grouped-query attention, gated MLP
    "llama": dict(
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=2,
        final_rms=True,
    ),
    # Llama plus per-head QK RMSNorm
    "qwen3": dict(
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=2,
        use_qk_norm=True,
        final_rms=True,
    ),
    # sandwich norms, attention and logit soft-caps, local (sliding-window) attention
    "gemma2": dict(
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=2,
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0,
        use_local_attn=True,  # without it TransformerLens makes every layer global
        window_size=4,
        final_rms=True,
    ),
    # per-head QK RMSNorm, sandwich norms, sliding-window local layers with a global one
    # every third layer (``attn_types`` in random_model), separate rotary bases (and linear
    # RoPE scaling on global layers only), one key/value head; no soft-caps. The sqrt(d_model)
    # embedding scale of real Gemma is folded into W_E by TransformerLens's conversion.
    "gemma3": dict(
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=1,
        use_qk_norm=True,
        use_normalization_before_and_after=True,
        use_local_attn=True,
        window_size=4,
        rotary_base=1_000_000,
        rotary_base_local=10_000,
        rotary_scaling_factor=8.0,
        final_rms=True,
    ),
    # parallel attention/MLP, partial rotary with non-adjacent (GPT-NeoX) pairing
    "pythia": dict(
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        parallel_attn_mlp=True,
        rotary_adjacent_pairs=False,
    ),
}


def random_model(
    family: Family,
    *,
    n_layers: int = 3,
    d_model: int = 32,
    n_heads: int = 4,
    d_vocab: int = 50,
    n_ctx: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = False,
) -> HookedTransformer:
    """A random-weight ``HookedTransformer`` of ``family`` with ``mlp.hook_in`` installed.

    ``fold_ln=True`` folds norm weights into the next layer (``normalization_type`` becomes
    ``LNPre``/``RMSPre``), as ``from_pretrained`` does by default.
    """
    if family not in _FAMILY_CONFIG:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    d_head = d_model // n_heads
    extra = dict(_FAMILY_CONFIG[family])
    if extra["positional_embedding_type"] == "rotary":
        extra["rotary_dim"] = d_head // 2 if family == "pythia" else d_head
    if family == "gemma2":
        extra["attn_types"] = ["global" if i % 2 == 0 else "local" for i in range(n_layers)]
    if family == "gemma3":
        extra["attn_types"] = ["global" if i % 3 == 2 else "local" for i in range(n_layers)]
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=2 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        seed=seed,
        dtype=dtype,
        device="cpu",
        **extra,
    )
    model = HookedTransformer(cfg, move_to_device=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(dtype)
            if name.endswith((".w", "ln_final.w")) and param.dim() == 1:
                param.copy_(1.0 + 0.2 * noise)  # norm weights near 1
            elif param.dim() <= 1 or name.split(".")[-1].startswith("b"):
                param.copy_(0.1 * noise)  # biases: small, non-zero
            else:
                fan_in = param.shape[-2] if param.dim() >= 2 else param.shape[-1]
                param.copy_(noise / fan_in**0.5)
    if fold_ln:
        model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    model.eval()
    install_mlp_input_hooks(model)
    return model


def _calibrated_bias(
    x_in: torch.Tensor, W_enc: torch.Tensor, active_fraction: float
) -> torch.Tensor:
    """Encoder bias making each feature active on about ``active_fraction`` of inputs."""
    pre = x_in.reshape(-1, x_in.shape[-1]) @ W_enc
    return -torch.quantile(pre.float(), 1.0 - active_fraction, dim=0).to(W_enc.dtype)


def _mlp_inputs(
    model: HookedTransformer, hooks: list[str], seed: int, n_pos: int | None
) -> list[torch.Tensor]:
    """MLP inputs on random prompts of ``n_pos`` tokens (default ``min(128, n_ctx)``).

    Early positions activate more features than late ones, so calibrating on prompts of
    the length that will be traced gives the intended L0 for that length.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    n_pos = min(128, model.cfg.n_ctx) if n_pos is None else min(n_pos, model.cfg.n_ctx)
    n_prompts = max(4, 512 // n_pos)
    tokens = torch.randint(0, model.cfg.d_vocab, (n_prompts, n_pos), generator=gen)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    return [cache[h] for h in hooks]


def random_transcoders(
    model: HookedTransformer,
    kind: TranscoderKind = "jumprelu_skip",
    *,
    d_sae: int = 64,
    active_fraction: float = 0.15,
    input_hook: str = "mlp.hook_in",
    seed: int = 0,
    calibration_positions: int | None = None,
) -> TranscoderSet:
    """One random SAE-Lens transcoder of class ``kind`` per layer, as a TranscoderSet.

    Encoder biases are set so each feature is active on about ``active_fraction`` of the
    MLP inputs of random prompts ``calibration_positions`` tokens long. ``"topk"``: ReLU
    transcoders in a set keeping the ``round(active_fraction * d_sae)`` largest
    pre-activations per position.
    """
    install_mlp_input_hooks(model)
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    if kind not in TRANSCODER_KINDS:
        raise ValueError(f"unknown transcoder kind {kind!r}; choose from {TRANSCODER_KINDS}")
    sae_cls, cfg_cls = SAELENS_CLASSES[("skip" in kind, "jumprelu" in kind)]
    hooks = [f"blocks.{layer}.{input_hook}" for layer in range(cfg.n_layers)]
    inputs = _mlp_inputs(model, hooks, seed, calibration_positions)
    gen = torch.Generator().manual_seed(seed)
    saes = []
    for layer in range(cfg.n_layers):
        sae_cfg = cfg_cls(
            d_in=cfg.d_model,
            d_sae=d_sae,
            d_out=cfg.d_model,
            dtype=str(dtype).removeprefix("torch."),
            device="cpu",
            apply_b_dec_to_input=False,
            metadata=SAEMetadata(
                hook_name=hooks[layer],
                hook_name_out=f"blocks.{layer}.hook_mlp_out",
                model_name=f"random-{cfg.original_architecture or 'model'}",
            ),
        )
        sae = sae_cls(sae_cfg)
        with torch.no_grad():
            W_enc = (torch.randn(cfg.d_model, d_sae, generator=gen) / cfg.d_model**0.5).to(dtype)
            sae.W_enc.copy_(W_enc)
            sae.W_dec.copy_((torch.randn(d_sae, cfg.d_model, generator=gen) / d_sae**0.5).to(dtype))
            sae.b_dec.copy_((0.1 * torch.randn(cfg.d_model, generator=gen)).to(dtype))
            bias = _calibrated_bias(inputs[layer], W_enc, active_fraction)
            if isinstance(sae, JumpReLUTranscoder):
                # half of the cut-off in the threshold, half in the bias, so both matter
                threshold = (0.5 * bias.abs() + 0.01).to(dtype)
                sae.threshold.copy_(threshold)
                sae.b_enc.copy_(bias + threshold)
            else:
                sae.b_enc.copy_(bias)
            if isinstance(sae, SkipTranscoder):
                sae.W_skip.copy_(
                    (
                        0.3
                        * torch.randn(cfg.d_model, cfg.d_model, generator=gen)
                        / cfg.d_model**0.5
                    ).to(dtype)
                )
        saes.append(sae)
    top_k = max(1, round(active_fraction * d_sae)) if kind == "topk" else None
    return TranscoderSet.from_saelens(saes, top_k=top_k)


def random_clt(
    model: HookedTransformer,
    *,
    d_sae: int = 48,
    activation: Literal["relu", "jumprelu", "topk"] = "jumprelu",
    skip: bool = True,
    active_fraction: float = 0.15,
    input_hook: str = "mlp.hook_in",
    seed: int = 0,
) -> CrossLayerTranscoder:
    """A random cross-layer transcoder over all layers of ``model`` (``"topk"``: keeping the
    ``round(active_fraction * d_sae)`` largest pre-activations per position)."""
    install_mlp_input_hooks(model)
    cfg = model.cfg
    L, d = cfg.n_layers, cfg.d_model
    dtype = next(model.parameters()).dtype
    hooks = [f"blocks.{layer}.{input_hook}" for layer in range(L)]
    inputs = _mlp_inputs(model, hooks, seed, None)
    gen = torch.Generator().manual_seed(seed + 7)
    layers = []
    for layer in range(L):
        W_enc = (torch.randn(d, d_sae, generator=gen) / d**0.5).to(dtype)
        bias = _calibrated_bias(inputs[layer], W_enc, active_fraction)
        tensors = {
            "W_enc": W_enc,
            "W_dec": (torch.randn(d_sae, L - layer, d, generator=gen) / d_sae**0.5).to(dtype),
            "b_dec": (0.1 * torch.randn(d, generator=gen)).to(dtype),
        }
        if activation == "jumprelu":
            threshold = (0.5 * bias.abs() + 0.01).to(dtype)
            tensors["threshold"] = threshold
            tensors["b_enc"] = bias + threshold
        else:
            tensors["b_enc"] = bias
        if skip:
            tensors["W_skip"] = (0.3 * torch.randn(d, d, generator=gen) / d**0.5).to(dtype)
        layers.append(tensors)
    return CrossLayerTranscoder(
        layers,
        n_layers=L,
        d_model=d,
        d_sae=d_sae,
        activation=activation,
        top_k=max(1, round(active_fraction * d_sae)) if activation == "topk" else None,
        skip=skip,
        input_hook="blocks.{layer}." + input_hook,
        output_hook="blocks.{layer}.hook_mlp_out",
    )


def local_saelens_converter(root: str | Path, calls: list[tuple[str, str]] | None = None):
    """A converter for ``SAE.from_pretrained(..., converter=...)`` that reads the SAE-Lens
    folder ``root/<folder>`` from disk instead of downloading it (a ``.safetensors`` suffix
    on the folder name, as some releases use, is dropped). Each ``(repo_id, folder_name)``
    asked for is appended to ``calls``. Lets tests run SAE-Lens's real ``from_pretrained``
    code path offline."""
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    def converter(
        repo_id: str,
        folder_name: str,
        device: str,
        force_download: bool,
        cfg_overrides: dict | None,
    ) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
        if calls is not None:
            calls.append((repo_id, folder_name))
        folder = Path(root) / folder_name.removesuffix(".safetensors")
        cfg, state = sae_lens_disk_loader(folder, device, cfg_overrides=cfg_overrides)
        return cfg, state, None

    return converter
