"""Gemma Scope 2: per-layer transcoder folders (``config.json`` + ``params.safetensors``)
and cross-layer transcoders (``params_layer_{i}.safetensors``, from a folder or listed by a
circuit-tracer config). Gemma Scope ``params.npz`` tensors are read by
:func:`~tl_circuits.transcoders.formats.files.per_layer_tensors`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_circuits.errors import HookError, TranscoderConfigError
from tl_circuits.model.hooks import SUPPORTED_OUTPUT_HOOK
from tl_circuits.transcoders.cross_layer import CrossLayerTranscoder
from tl_circuits.transcoders.formats.files import (
    GS2_CLT_FILE,
    GS2_CONFIG,
    GS2_PARAMS,
    Described,
    Options,
    expect_tensors,
    make_clt,
    numbered_files,
    per_layer_tensors,
    read_header,
    read_json,
    read_tensors,
)
from tl_circuits.transcoders.per_layer import TranscoderSet, saelens_transcoder, tl_hook_of_hf_hook


def _gs2_hooks(config_path: Path, cfg: Mapping[str, Any]) -> tuple[int | None, str, str]:
    """``(layer or None, input template, output template)`` from a Gemma Scope 2
    ``config.json``'s Hugging Face hook points (``hf_hook_point_in`` / ``_out``)."""
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise TranscoderConfigError(
            f"{config_path}: architecture {cfg.get('architecture')!r}, expected 'jump_relu'"
        )
    found = []
    for key in ("hf_hook_point_in", "hf_hook_point_out"):
        value = cfg.get(key)
        if not isinstance(value, str):
            raise TranscoderConfigError(
                f"{config_path}: {key} is missing; a Gemma Scope 2 transcoder must name its "
                "Hugging Face input and output points"
            )
        mapped = tl_hook_of_hf_hook(value.replace("{layer}", "0"))
        if mapped is None:
            raise HookError(
                f"{config_path}: {key} {value!r} has no exact TransformerLens equivalent the "
                "splice supports (known: model.layers.N.pre_feedforward_layernorm.output / "
                ".input, model.layers.N.post_feedforward_layernorm.output)"
            )
        layer = None if "{layer}" in value else mapped[0]
        found.append((layer, re.sub(r"^blocks\.\d+\.", "blocks.{layer}.", mapped[1])))
    (layer_in, hook_in), (layer_out, hook_out) = found
    if layer_in != layer_out:
        raise TranscoderConfigError(f"{config_path}: input and output are in different layers")
    if not hook_out.endswith(SUPPORTED_OUTPUT_HOOK):
        raise HookError(f"{config_path}: the output point must be the MLP output")
    return layer_in, hook_in, hook_out


def gs2_set(folders: Sequence[Path], options: Options) -> TranscoderSet:
    """Gemma Scope 2 transcoder folders (``config.json`` + ``params.safetensors``), one per
    layer; the layer is the one the config's hook points name."""
    by_layer: dict[int, Path] = {}
    saes = []
    for folder in folders:
        config_path = folder / GS2_CONFIG
        cfg = read_json(config_path)
        layer, hook_in, hook_out = _gs2_hooks(config_path, cfg)
        if layer is None:
            raise TranscoderConfigError(f"{config_path}: the hook points name no layer")
        if layer in by_layer:
            raise TranscoderConfigError(
                f"{folder} and {by_layer[layer]} are both transcoders of layer {layer}; point "
                "at a folder with one per layer"
            )
        by_layer[layer] = folder
        path = folder / GS2_PARAMS
        tensors, fmt = per_layer_tensors(path)
        if fmt != "gemma_scope_2":
            raise TranscoderConfigError(f"{path}: not Gemma Scope 2 tensors (w_enc, w_dec, ...)")
        affine = cfg.get("affine_connection")
        if affine is not None and bool(affine) != ("W_skip" in tensors):
            raise TranscoderConfigError(
                f"{path}: affine_connection={affine} in {GS2_CONFIG} but the file "
                f"{'lacks' if affine else 'has'} affine_skip_connection"
            )
        dtype = options.dtype if options.dtype is not None else tensors["W_enc"].dtype
        name = cfg.get("model_name") if isinstance(cfg.get("model_name"), str) else None
        saes.append(
            saelens_transcoder(
                tensors,
                hook_name=hook_in.format(layer=layer),
                hook_name_out=hook_out.format(layer=layer),
                dtype=dtype,
                device=options.device,
                model_name=name,
                fold_ln=False,
            )
        )
    return TranscoderSet(saes)


class GemmaScope2CLTReader:
    """Layer ``i`` of a Gemma Scope 2 CLT from its own file (``w_enc [d_in, d_sae]``,
    ``w_dec [d_sae, n_layers, d_out]`` with zero slots before ``i``, ``b_enc``, ``b_dec``,
    ``threshold``, optional ``affine_skip_connection [d_in, d_out]``)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.reads: list[int] = []

    def describe(self, layer: int) -> str:
        return str(self.paths[layer])

    def __call__(self, layer: int) -> dict[str, Tensor]:
        self.reads.append(layer)
        path = self.paths[layer]
        raw = read_tensors(path)
        expect_tensors(
            path, raw, {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}, {"affine_skip_connection"}
        )
        w_dec = raw["w_dec"]
        if w_dec.dim() != 3 or w_dec.shape[1] != len(self.paths):
            raise TranscoderConfigError(
                f"{path}: w_dec has shape {tuple(w_dec.shape)}, expected "
                f"(d_sae, {len(self.paths)}, d_model) (one slot per layer)"
            )
        if layer and bool(w_dec[:, :layer].any()):
            raise TranscoderConfigError(
                f"{path}: features of layer {layer} have nonzero decoders to earlier layers "
                f"0..{layer - 1}; a cross-layer transcoder writes only to its own and later "
                "layers, so this one cannot be spliced exactly"
            )
        out = {
            "W_enc": raw["w_enc"],
            "b_enc": raw["b_enc"],
            "b_dec": raw["b_dec"],
            "threshold": raw["threshold"],
            "W_dec": w_dec[:, layer:],
        }
        if "affine_skip_connection" in raw:
            out["W_skip"] = raw["affine_skip_connection"].T
        return out


def _gs2_clt_header(paths: Sequence[Path]) -> tuple[int, int, bool, torch.dtype]:
    """``(d_model, d_sae, skip, dtype)`` from the first layer file's header."""
    shapes, dtype = read_header(paths[0])
    for name in ("w_enc", "w_dec"):
        if name not in shapes:
            raise TranscoderConfigError(
                f"{paths[0]}: no {name}; not a Gemma Scope 2 cross-layer transcoder file"
            )
    if len(shapes["w_enc"]) != 2:
        raise TranscoderConfigError(f"{paths[0]}: w_enc has shape {shapes['w_enc']}")
    d_model, d_sae = shapes["w_enc"]
    return d_model, d_sae, "affine_skip_connection" in shapes, dtype


def gs2_clt(
    paths: Sequence[Path],
    options: Options,
    described: Described,
) -> CrossLayerTranscoder:
    """A Gemma Scope 2 CLT from the layer files a circuit-tracer config lists."""
    if options.n_layers is not None and len(paths) != options.n_layers:
        raise TranscoderConfigError(
            f"the config lists {len(paths)} layer files, but {options.n_layers} layers were "
            "asked for"
        )
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: CLT layer file missing")
    d_model, d_sae, skip, dtype = _gs2_clt_header(paths)
    if described.activation not in (None, "jumprelu"):
        raise TranscoderConfigError(f"{paths[0]}: Gemma Scope 2 CLTs are JumpReLU")
    return make_clt(
        GemmaScope2CLTReader(paths),
        options,
        dtype,
        described,
        n_layers=len(paths),
        d_model=d_model,
        d_sae=d_sae,
        activation="jumprelu",
        skip=skip,
    )


def gs2_clt_from_folder(root: Path, options: Options) -> CrossLayerTranscoder:
    """A Gemma Scope 2 CLT folder: ``config.json`` + ``params_layer_{i}.safetensors``."""
    config_path = root / GS2_CONFIG
    cfg = read_json(config_path)
    _, hook_in, hook_out = _gs2_hooks(config_path, cfg)
    paths = numbered_files(root, GS2_CLT_FILE, "params_layer_{}.safetensors", options)
    name = cfg.get("model_name") if isinstance(cfg.get("model_name"), str) else None
    return gs2_clt(paths, options, Described(hook_in, hook_out, model_name=name))
