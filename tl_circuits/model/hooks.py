"""Model-side plumbing: supported architectures, the MLP-input hook, hook validation.

TransformerLens's ``HookedTransformer`` has no hook on the MLP's own input (the ``ln2``
output *including* the norm's weight and bias). :func:`install_mlp_input_hooks` adds one,
``blocks.{l}.mlp.hook_in``, as a real :class:`HookPoint` (so ``run_with_hooks`` and
``run_with_cache`` see it) without changing the model's parameters or outputs.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_circuits.errors import HookError, TranscoderConfigError, UnsupportedArchitectureError

MLP_INPUT_HOOK = "mlp.hook_in"

#: Transcoder input points we can express as a linear map of the residual stream (with
#: frozen norm scales). Suffixes after ``blocks.{l}.``.
SUPPORTED_INPUT_HOOKS = (
    MLP_INPUT_HOOK,
    "ln2.hook_normalized",
    "hook_resid_mid",
    "hook_mlp_in",
    "hook_resid_pre",
)
#: Inputs only a parallel block's MLP reads (``parallel_attn_mlp=True``: the MLP reads
#: ``resid_pre`` through ln2, so ``hook_resid_pre`` is its residual input, as
#: ``hook_resid_mid`` is a sequential block's). In a sequential block the MLP reads
#: ``resid_mid``: a transcoder on ``resid_pre`` would skip the attention.
PARALLEL_ONLY_INPUT_HOOKS = ("hook_resid_pre",)
#: The point whose value the reconstruction replaces (after ``ln2_post`` when present).
SUPPORTED_OUTPUT_HOOK = "hook_mlp_out"


def check_supported_architecture(model: HookedTransformer) -> None:
    """Raise UnsupportedArchitectureError if the exact replacement model cannot be built."""
    cfg = model.cfg
    problems = []
    if cfg.attn_only:
        problems.append("attn_only=True (there are no MLPs to replace)")
    if cfg.original_architecture in {"OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"}:
        problems.append(f"post-norm architecture {cfg.original_architecture}")
    if cfg.positional_embedding_type in {"alibi", "relative_positional_bias", "shortformer"}:
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    if cfg.use_attn_result or cfg.use_split_qkv_input or cfg.use_attn_in:
        problems.append("use_attn_result / use_split_qkv_input / use_attn_in must be off")
    if getattr(cfg, "num_experts", None):
        problems.append("mixture-of-experts MLPs")
    if getattr(cfg, "use_attention_sinks", False):
        problems.append("attention sinks")
    if cfg.clip_qkv is not None:
        problems.append("clip_qkv")
    if getattr(cfg, "load_in_4bit", False):
        problems.append("4-bit weights")
    if problems:
        raise UnsupportedArchitectureError(
            "tl_circuits cannot build an exact local replacement model for this model: "
            + "; ".join(problems)
        )


def model_has_folded_ln(model: HookedTransformer) -> bool:
    """True when the norms' weights were folded into the next layer (``fold_ln=True``)."""
    return model.cfg.normalization_type in ("LNPre", "RMSPre")


def install_mlp_input_hooks(model: HookedTransformer) -> None:
    """Add ``blocks.{l}.mlp.hook_in`` to every block (idempotent).

    The hook fires with the MLP's input ``[batch, pos, d_model]`` and a hook function may
    replace it, exactly like any TransformerLens hook point.
    """
    added = False
    for block in model.blocks:
        mlp = getattr(block, "mlp", None)
        if mlp is None or isinstance(getattr(mlp, "hook_in", None), HookPoint):
            continue
        mlp.hook_in = HookPoint()
        mlp.register_forward_pre_hook(_call_hook_in)
        added = True
    if added:
        model.setup()  # rebuild hook_dict / mod_dict so the new points are addressable


def _call_hook_in(module: torch.nn.Module, args: tuple) -> tuple:
    return (module.hook_in(args[0]), *args[1:])


def check_input_hook_reads_mlp_input(model: HookedTransformer, layer: int, suffix: str) -> None:
    """Raise HookError when ``blocks.{layer}.{suffix}`` is not on the path into layer
    ``layer``'s MLP: ``hook_resid_pre`` in a sequential block (it is before the attention)."""
    if suffix in PARALLEL_ONLY_INPUT_HOOKS and not model.cfg.parallel_attn_mlp:
        raise HookError(
            f"layer {layer}: input hook 'blocks.{layer}.{suffix}' is not the MLP's input in "
            "this sequential block: it is before the attention, and the MLP reads the "
            f"residual stream after it ('blocks.{layer}.hook_resid_mid'); it is a transcoder "
            "input only in parallel blocks (parallel_attn_mlp=True)"
        )


def check_transcoder_hooks(
    model: HookedTransformer, input_hooks: list[str], output_hooks: list[str]
) -> None:
    """Each layer's hooks exist, have the right form, and fire with ``[.., d_model]``.

    ``input_hooks[l]`` / ``output_hooks[l]`` belong to the transcoder of layer ``l``.
    Raises HookError naming the layer and hook.
    """
    n_layers = model.cfg.n_layers
    if len(input_hooks) != n_layers:
        raise TranscoderConfigError(
            f"the transcoders cover {len(input_hooks)} layers but the model has {n_layers}"
        )
    for layer, (hin, hout) in enumerate(zip(input_hooks, output_hooks, strict=False)):
        if hout != f"blocks.{layer}.{SUPPORTED_OUTPUT_HOOK}":
            raise HookError(
                f"layer {layer}: output hook {hout!r} is not supported; transcoders must write "
                f"to 'blocks.{layer}.{SUPPORTED_OUTPUT_HOOK}'"
            )
        if hin not in {f"blocks.{layer}.{suffix}" for suffix in SUPPORTED_INPUT_HOOKS}:
            raise HookError(
                f"layer {layer}: input hook {hin!r} is not supported; use one of "
                + ", ".join(f"'blocks.{layer}.{s}'" for s in SUPPORTED_INPUT_HOOKS)
            )
        check_input_hook_reads_mlp_input(model, layer, hin.removeprefix(f"blocks.{layer}."))
        for hook in (hin, hout):
            if hook not in model.hook_dict:
                raise HookError(f"layer {layer}: hook {hook!r} does not exist on this model")

    fired: dict[str, int] = {}

    def record(tensor: torch.Tensor, hook: HookPoint) -> None:
        fired[hook.name] = tensor.shape[-1]

    names = set(input_hooks) | set(output_hooks)
    with torch.no_grad():
        model.run_with_hooks(
            torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device),
            fwd_hooks=[(name, record) for name in names],
            stop_at_layer=model.cfg.n_layers,  # the hooks are inside blocks: no unembedding
        )
    for layer, (hin, hout) in enumerate(zip(input_hooks, output_hooks, strict=False)):
        for hook in (hin, hout):
            if hook not in fired:
                raise HookError(
                    f"layer {layer}: hook {hook!r} exists but never fires on a forward pass "
                    "(e.g. 'hook_mlp_in' needs model.set_use_hook_mlp_in(True))"
                )
            if fired[hook] != model.cfg.d_model:
                raise HookError(
                    f"layer {layer}: hook {hook!r} carries width {fired[hook]}, "
                    f"expected d_model={model.cfg.d_model}"
                )
