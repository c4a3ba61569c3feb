"""circuit-tracer's format: its ``config.yaml`` (hooks, activation, the files it lists)
and its per-layer ``layer_{i}.safetensors`` and CLT ``W_enc_{i}`` / ``W_dec_{i}`` files."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from tl_circuits.errors import HookError, TranscoderConfigError
from tl_circuits.model.hooks import SUPPORTED_INPUT_HOOKS, SUPPORTED_OUTPUT_HOOK
from tl_circuits.transcoders.base import Transcoders
from tl_circuits.transcoders.cross_layer import CrossLayerTranscoder
from tl_circuits.transcoders.formats.files import (
    CT_CONFIG,
    CT_KINDS,
    CT_MLP_MODULE_OUT,
    Described,
    FetchUris,
    Options,
    check_non_negative_threshold,
    expect_tensors,
    make_clt,
    numbered_files,
    per_layer_tensors,
    read_header,
    read_tensors,
    read_yaml,
)
from tl_circuits.transcoders.formats.gemma_scope import gs2_clt
from tl_circuits.transcoders.per_layer import SOURCE_HOOK_OUT_KEY, TranscoderSet, saelens_transcoder

_CT_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_CT_ENC_FILE = re.compile(r"^W_enc_(\d+)\.safetensors$")
#: models whose MLP output is normalised (ln2_post): mlp.hook_out != hook_mlp_out there
_POST_NORM_MODELS = re.compile(r"gemma-?[23]", re.IGNORECASE)


# ---- circuit-tracer hooks ------------------------------------------------------------------


def ct_hooks(config_path: Path, cfg: Mapping[str, Any]) -> tuple[str, str, bool]:
    """``(input template, output template, output_is_mlp_module_out)`` of a circuit-tracer
    config: its block-relative ``feature_input_hook`` / ``feature_output_hook`` as
    TransformerLens hooks ``blocks.{layer}.<hook>`` that the splice supports."""
    names = {}
    for key in ("feature_input_hook", "feature_output_hook"):
        value = cfg.get(key)
        if not isinstance(value, str) or not value:
            raise TranscoderConfigError(f"{config_path}: {key} is missing (a hook name)")
        names[key] = re.sub(r"^blocks\.(\{layer\}|\d+)\.", "", value)
    hook_in, hook_out = names["feature_input_hook"], names["feature_output_hook"]
    if hook_in not in SUPPORTED_INPUT_HOOKS:
        raise HookError(
            f"{config_path}: feature_input_hook {cfg['feature_input_hook']!r} is not a point "
            f"tl_circuits can read transcoder inputs from; supported: {list(SUPPORTED_INPUT_HOOKS)}"
        )
    module_out = hook_out == CT_MLP_MODULE_OUT
    if hook_out not in (SUPPORTED_OUTPUT_HOOK, CT_MLP_MODULE_OUT):
        raise HookError(
            f"{config_path}: feature_output_hook {cfg['feature_output_hook']!r} is not "
            f"supported; transcoders must write to {SUPPORTED_OUTPUT_HOOK!r} (or "
            f"{CT_MLP_MODULE_OUT!r}, the same point in models without a post-MLP norm)"
        )
    model_name = cfg.get("model_name")
    if module_out and isinstance(model_name, str) and _POST_NORM_MODELS.search(model_name):
        raise HookError(
            f"{config_path}: feature_output_hook {CT_MLP_MODULE_OUT!r} is the MLP module's "
            f"output, but {model_name} normalises the MLP output (ln2_post), so it is not "
            f"{SUPPORTED_OUTPUT_HOOK!r} there and cannot be replaced exactly"
        )
    return (
        "blocks.{layer}." + hook_in,
        "blocks.{layer}." + SUPPORTED_OUTPUT_HOOK,
        module_out,
    )


def _ct_activation(config_path: Path, cfg: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """The activation a config declares: circuit-tracer 0.5.0 writes none (ReLU vs JumpReLU
    follows from threshold tensors); ``activation_function`` (or ``activation``) ``relu`` /
    ``jumprelu`` / ``topk`` with ``k`` (or ``top_k``) are accepted and checked."""
    declared = cfg.get("activation_function", cfg.get("activation"))
    k = cfg.get("k", cfg.get("top_k"))
    if declared is None:
        if k is not None:
            raise TranscoderConfigError(f"{config_path}: k={k!r} without activation_function")
        return None, None
    name = str(declared).lower().replace("_", "")
    if name not in ("relu", "jumprelu", "topk"):
        raise TranscoderConfigError(
            f"{config_path}: activation_function {declared!r} is not relu, jumprelu or topk"
        )
    if (name == "topk") != (k is not None):
        raise TranscoderConfigError(
            f"{config_path}: k is given exactly for activation_function topk (got "
            f"{declared!r}, k={k!r})"
        )
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise TranscoderConfigError(f"{config_path}: k must be a positive integer, got {k!r}")
    return name, k


def _check_activation(path: Path, declared: str | None, has_threshold: bool) -> None:
    if declared == "relu" and has_threshold:
        raise TranscoderConfigError(f"{path}: has thresholds but the config says relu")
    if declared == "jumprelu" and not has_threshold:
        raise TranscoderConfigError(f"{path}: has no thresholds but the config says jumprelu")
    if declared == "topk" and has_threshold:
        raise TranscoderConfigError(
            f"{path}: has thresholds but the config says topk (circuit-tracer's TopK has none)"
        )


# ---- circuit-tracer ----------------------------------------------------------------------


def load_circuit_tracer(root: Path, options: Options) -> Transcoders:
    """A circuit-tracer folder: ``config.yaml`` plus the files it names or implies."""
    config_path = root / CT_CONFIG
    cfg = read_yaml(config_path)
    kind = cfg.get("model_kind")
    if kind not in CT_KINDS:
        raise TranscoderConfigError(
            f"{config_path}: model_kind is {kind!r}, expected one of {list(CT_KINDS)}"
        )
    hook_in, hook_out, module_out = ct_hooks(config_path, cfg)
    activation, k = _ct_activation(config_path, cfg)
    listed = cfg.get("transcoders")
    paths: list[Path] | None = None
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed or [0]):
            raise TranscoderConfigError(f"{config_path}: transcoders must be a list of paths")
        paths = resolve_listed(root, listed, options.fetch_uris)
    model_name = cfg.get("model_name") if isinstance(cfg.get("model_name"), str) else None
    described = Described(hook_in, hook_out, module_out, model_name, activation, k)
    if kind == "transcoder_set":
        if paths is None:
            paths = numbered_files(root, _CT_LAYER_FILE, "layer_{}.safetensors", options)
        return _per_layer_set(paths, options, described)
    if paths is not None:
        return gs2_clt(paths, options, described)
    return _ct_clt(root, options, described)


def resolve_listed(root: Path, listed: Sequence[str], fetch_uris: FetchUris) -> list[Path]:
    """Local paths of a config's ``transcoders`` list: ``hf://`` URIs fetched, relative
    paths taken relative to the config's folder."""
    uris = [p for p in listed if p.startswith("hf://")]
    fetched = fetch_uris(uris) if uris else {}
    out = []
    for entry in listed:
        if entry.startswith("hf://"):
            out.append(Path(fetched[entry]))
        else:
            path = Path(entry).expanduser()
            out.append(path if path.is_absolute() else root / path)
    return out


def _per_layer_set(
    paths: Sequence[Path],
    options: Options,
    described: Described,
) -> TranscoderSet:
    saes = []
    for layer, path in enumerate(paths):
        tensors, _ = per_layer_tensors(path)
        _check_activation(path, described.activation, "threshold" in tensors)
        dtype = options.dtype if options.dtype is not None else tensors["W_enc"].dtype
        saes.append(
            saelens_transcoder(
                tensors,
                hook_name=described.hook_in.format(layer=layer),
                hook_name_out=described.hook_out.format(layer=layer),
                dtype=dtype,
                device=options.device,
                model_name=described.model_name,
                fold_ln=False,
                metadata={SOURCE_HOOK_OUT_KEY: f"blocks.{layer}.{CT_MLP_MODULE_OUT}"}
                if described.module_out
                else None,
            )
        )
    return TranscoderSet(saes, top_k=described.k)


class CircuitTracerCLTReader:
    """Layer ``i`` of a circuit-tracer CLT: ``W_enc_{i}.safetensors`` (``W_enc_{i}
    [d_sae, d_model]``, ``b_enc_{i}``, ``b_dec_{i}``, optional ``threshold_{i}``) and
    ``W_dec_{i}.safetensors`` (``W_dec_{i} [d_sae, n_layers - i, d_model]``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reads: list[int] = []  # layers read, in order (for inspection)

    def describe(self, layer: int) -> str:
        return f"{self.root / f'W_enc_{layer}.safetensors'} + W_dec_{layer}.safetensors"

    def __call__(self, layer: int) -> dict[str, Tensor]:
        self.reads.append(layer)
        enc_path = self.root / f"W_enc_{layer}.safetensors"
        dec_path = self.root / f"W_dec_{layer}.safetensors"
        enc = read_tensors(enc_path)
        dec = read_tensors(dec_path)
        i = layer
        expect_tensors(
            enc_path, enc, {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"}, {f"threshold_{i}"}
        )
        expect_tensors(dec_path, dec, {f"W_dec_{i}"}, set())
        out = {
            "W_enc": enc[f"W_enc_{i}"].T,
            "b_enc": enc[f"b_enc_{i}"],
            "b_dec": enc[f"b_dec_{i}"],
            "W_dec": dec[f"W_dec_{i}"],
        }
        if f"threshold_{i}" in enc:
            threshold = enc[f"threshold_{i}"].reshape(-1)
            check_non_negative_threshold(enc_path, f"threshold_{i}", threshold)
            out["threshold"] = threshold
        return out


def _ct_clt(
    root: Path,
    options: Options,
    described: Described,
) -> CrossLayerTranscoder:
    enc_files = numbered_files(root, _CT_ENC_FILE, "W_enc_{}.safetensors", options)
    n_layers = len(enc_files)
    for i in range(n_layers):
        if not (root / f"W_dec_{i}.safetensors").is_file():
            raise FileNotFoundError(f"{root / f'W_dec_{i}.safetensors'}: CLT layer file missing")
    shapes, file_dtype = read_header(enc_files[0])
    if "W_enc_0" not in shapes or len(shapes["W_enc_0"]) != 2:
        raise TranscoderConfigError(f"{enc_files[0]}: no 2-d tensor W_enc_0")
    d_sae, d_model = shapes["W_enc_0"]
    has_threshold = "threshold_0" in shapes
    _check_activation(enc_files[0], described.activation, has_threshold)
    return make_clt(
        CircuitTracerCLTReader(root),
        options,
        file_dtype,
        described,
        n_layers=n_layers,
        d_model=d_model,
        d_sae=d_sae,
        activation=described.activation or ("jumprelu" if has_threshold else "relu"),
        skip=False,
    )
