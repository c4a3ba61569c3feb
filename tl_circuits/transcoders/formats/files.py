"""What every format reader shares: file names, :class:`Options`, and reading and checking
tensor and config files (safetensors, ``.npz``, JSON, YAML; nothing is unpickled)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_circuits.errors import TranscoderConfigError
from tl_circuits.storage import SAFETENSORS_CODES, read_safetensors
from tl_circuits.transcoders import hub
from tl_circuits.transcoders.base import read_json_object
from tl_circuits.transcoders.cross_layer import CrossLayerTranscoder

CT_CONFIG = "config.yaml"
GS2_CONFIG = "config.json"
GS2_PARAMS = "params.safetensors"
GS_PARAMS = "params.npz"
CT_KINDS = ("transcoder_set", "cross_layer_transcoder")
#: circuit-tracer's output hook for the MLP module's own output
CT_MLP_MODULE_OUT = "mlp.hook_out"
GS2_CLT_FILE = re.compile(r"^params_layer_(\d+)\.safetensors$")
#: the float dtypes a dictionary file may hold, by safetensors code
_SAFETENSORS_DTYPES = {
    SAFETENSORS_CODES[name]: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16")
}

FetchUris = Callable[[Sequence[str]], Mapping[str, Path]]


@dataclass(frozen=True)
class Options:
    """How to read: target ``device`` and ``dtype`` (None: the files' dtype), whether CLTs
    load lazily, the expected layer count (None: from the files), and how ``hf://`` files
    named by a config are fetched."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    lazy: bool = True
    n_layers: int | None = None
    fetch_uris: FetchUris = hub.download_uris


@dataclass(frozen=True)
class Described:
    """What a folder's config says about its dictionaries: the TransformerLens hook
    templates they read and write (``{layer}`` in each), whether the output is the MLP
    module's own output (circuit-tracer's ``mlp.hook_out``), the model name, and the
    declared activation (``None``: from the files) with its ``k`` for TopK."""

    hook_in: str
    hook_out: str
    module_out: bool = False
    model_name: str | None = None
    activation: str | None = None
    k: int | None = None


# ---- file helpers ------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (:func:`~tl_circuits.transcoders.base.read_json_object`)."""
    return read_json_object(path)


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``, read with ``yaml.safe_load`` (TranscoderConfigError
    naming the file otherwise)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TranscoderConfigError(f"{path}: not a readable YAML file: {exc}") from exc
    if not isinstance(data, dict):
        raise TranscoderConfigError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors or ``.npz`` file, on the CPU (FileNotFoundError or
    TranscoderConfigError naming the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: transcoder file missing")
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as npz:
                return {key: torch.from_numpy(np.array(npz[key])) for key in npz.files}
        except (OSError, ValueError) as exc:
            raise TranscoderConfigError(f"{path} is not a readable .npz file: {exc}") from exc
    tensors, _ = read_safetensors(path, error=TranscoderConfigError)
    return tensors


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
    """Tensor shapes and the dtype of a safetensors file, read from its header only."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: transcoder file missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            dtypes = {s.get_dtype() for s in slices.values()}
    except Exception as exc:  # safetensors raises its own (Rust) error types
        raise TranscoderConfigError(f"{path} is not a readable safetensors file: {exc}") from exc
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SAFETENSORS_DTYPES:
        raise TranscoderConfigError(f"{path}: tensors of dtypes {sorted(dtypes)} (expected one)")
    return shapes, _SAFETENSORS_DTYPES[dtypes.pop()]


def expect_tensors(
    path: Path, tensors: Mapping[str, Tensor], required: set[str], optional: set[str]
):
    """TranscoderConfigError unless ``tensors`` holds every ``required`` name and no others
    besides ``optional``."""
    missing = sorted(required - set(tensors))
    extra = sorted(set(tensors) - required - optional)
    if missing or extra:
        raise TranscoderConfigError(
            f"{path}: missing tensors {missing}, unexpected tensors {extra} "
            f"(expected {sorted(required)} and optionally {sorted(optional)})"
        )


def _shape(path: Path, name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise TranscoderConfigError(
            f"{path}: {name} has shape {tuple(tensor.shape)}, expected {shape}"
        )


def check_non_negative_threshold(path: Path, name: str, threshold: Tensor) -> None:
    """circuit-tracer's JumpReLU keeps ``z`` where ``z > threshold`` without clipping at 0;
    SAE-Lens's (and ours) also clips. They agree exactly when no threshold is negative."""
    if bool((threshold < 0).any()):
        raise TranscoderConfigError(
            f"{path}: {name} has negative values; circuit-tracer's JumpReLU would then pass "
            "negative activations that SAE-Lens's JumpReLU (which tl_circuits computes) clips, "
            "so the two would differ: refusing rather than changing the transcoder"
        )


def numbered_files(root: Path, pattern: re.Pattern, template: str, options: Options) -> list[Path]:
    """``root/template.format(i)`` for i = 0..n-1: every index up to the largest present
    (or ``options.n_layers``) must exist; FileNotFoundError names the first missing file."""
    found = {int(m.group(1)) for p in root.iterdir() if (m := pattern.match(p.name))}
    if not found:
        raise FileNotFoundError(f"{root}: no {template.format('{i}')} files")
    n = options.n_layers if options.n_layers is not None else max(found) + 1
    for i in range(n):
        if i not in found:
            raise FileNotFoundError(f"{root / template.format(i)}: layer file missing")
    extra = sorted(i for i in found if i >= n)
    if extra:
        raise TranscoderConfigError(
            f"{root}: {template.format(extra[0])} is beyond the {n} layers asked for"
        )
    return [root / template.format(i) for i in range(n)]


def per_layer_tensors(path: Path) -> tuple[dict[str, Tensor], str]:
    """One per-layer transcoder file in SAE-Lens names and orientation, and its format."""
    raw = read_tensors(path)
    if path.suffix == ".npz":
        # Gemma Scope: W_enc [d_model, d_sae] (already SAE-Lens's orientation), JumpReLU
        expect_tensors(path, raw, {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}, set())
        d_model, d_sae = raw["W_enc"].shape
        out = {k: raw[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
        fmt = "gemma_scope"
    elif "w_enc" in raw:
        # Gemma Scope 2: w_enc [d_in, d_sae], affine_skip_connection [d_in, d_out]
        expect_tensors(
            path, raw, {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}, {"affine_skip_connection"}
        )
        d_model, d_sae = raw["w_enc"].shape
        out = {
            "W_enc": raw["w_enc"],
            "W_dec": raw["w_dec"],
            "b_enc": raw["b_enc"],
            "b_dec": raw["b_dec"],
            "threshold": raw["threshold"],
        }
        if "affine_skip_connection" in raw:
            _shape(path, "affine_skip_connection", raw["affine_skip_connection"], (d_model,) * 2)
            out["W_skip"] = raw["affine_skip_connection"].T
        fmt = "gemma_scope_2"
    else:
        # circuit-tracer: W_enc [d_sae, d_model] (feature-major), W_skip [d_out, d_in]
        expect_tensors(
            path,
            raw,
            {"W_enc", "W_dec", "b_enc", "b_dec"},
            {"activation_function.threshold", "W_skip"},
        )
        d_sae, d_model = raw["b_enc"].shape[0], raw["b_dec"].shape[0]
        _shape(path, "W_enc", raw["W_enc"], (d_sae, d_model))
        out = {k: raw[k] for k in ("W_dec", "b_enc", "b_dec")}
        out["W_enc"] = raw["W_enc"].T
        if "activation_function.threshold" in raw:
            threshold = raw["activation_function.threshold"].reshape(-1)
            _shape(path, "activation_function.threshold", threshold, (d_sae,))
            check_non_negative_threshold(path, "activation_function.threshold", threshold)
            out["threshold"] = threshold
        if "W_skip" in raw:
            out["W_skip"] = raw["W_skip"]
        fmt = "circuit_tracer"
    for name, shape in {
        "W_enc": (d_model, d_sae),
        "W_dec": (d_sae, d_model),
        "b_enc": (d_sae,),
        "b_dec": (d_model,),
        "threshold": (d_sae,),
        "W_skip": (d_model, d_model),
    }.items():
        if name in out:
            _shape(path, name, out[name], shape)
    return out, fmt


def make_clt(
    reader: Any,
    options: Options,
    file_dtype: torch.dtype,
    described: Described,
    *,
    n_layers: int,
    d_model: int,
    d_sae: int,
    activation: str,
    skip: bool,
) -> CrossLayerTranscoder:
    """A CrossLayerTranscoder that reads its layers through ``reader`` (every layer now,
    and checked, unless ``options.lazy``); ``activation`` is the one the files show,
    ``described`` gives the hooks, model name and TopK ``k``."""
    clt = CrossLayerTranscoder(
        None,
        n_layers=n_layers,
        d_model=d_model,
        d_sae=d_sae,
        activation=activation,  # type: ignore[arg-type]
        top_k=described.k,
        skip=skip,
        input_hook=described.hook_in,
        output_hook=described.hook_out,
        fold_ln=False,
        model_name=described.model_name,
        reader=reader,
        dtype=options.dtype if options.dtype is not None else file_dtype,
        device=options.device,
        output_is_mlp_module_out=described.module_out,
    )
    if not options.lazy:
        for layer in range(n_layers):
            clt.layer_tensors(layer)
        clt.check_consistent()
    return clt
