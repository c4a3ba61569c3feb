"""Transcoders in a local folder, in any supported format, detected from the files.

``load_folder(path)`` looks at the files (in this order) and reads:

- ``transcoder_set.json``: a :meth:`TranscoderSet.save` folder;
- ``cfg.json`` with ``"format": "tl_circuits.clt"``: our CLT format (docs/clt_format.md);
- ``cfg.json`` (any other): one SAE-Lens transcoder directory (a one-layer set);
- ``config.yaml``: circuit-tracer's format (``model_kind: transcoder_set`` or
  ``cross_layer_transcoder``; per-layer ``layer_{i}.safetensors``, CLT ``W_enc_{i}`` /
  ``W_dec_{i}.safetensors``, or a ``transcoders:`` list of files: circuit-tracer per-layer
  safetensors, Gemma Scope ``params.npz``, Gemma Scope 2 ``params.safetensors`` or Gemma
  Scope 2 CLT layer files, local paths or ``hf://`` URIs);
- ``config.json`` with ``params.safetensors``: one Gemma Scope 2 transcoder (a one-layer
  set); with ``params_layer_{i}.safetensors``: a Gemma Scope 2 cross-layer transcoder;
- sub-folders that are all SAE-Lens directories (a set without a manifest), or all Gemma
  Scope 2 transcoder folders (one per layer).

Anything else raises TranscoderConfigError naming the folder and what was found. Tensors are
read with safetensors and ``numpy.load(..., allow_pickle=False)``, configs with JSON and
``yaml.safe_load``; nothing is unpickled. Per-layer formats become SAE-Lens transcoder
objects in a :class:`TranscoderSet`; cross-layer ones a :class:`CrossLayerTranscoder` that
reads each layer's files on first use (``lazy=True``). Orientation rules, hook names and
refusals are in docs/dictionaries.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_circuits.errors import HookError, TranscoderConfigError
from tl_circuits.model.hooks import SUPPORTED_INPUT_HOOKS, SUPPORTED_OUTPUT_HOOK
from tl_circuits.storage import read_safetensors
from tl_circuits.transcoders import hub
from tl_circuits.transcoders.base import Transcoders
from tl_circuits.transcoders.cross_layer import CFG_FILE, CLT_FORMAT, CrossLayerTranscoder
from tl_circuits.transcoders.per_layer import (
    MANIFEST,
    SAELENS_CFG,
    SOURCE_HOOK_OUT_KEY,
    TranscoderSet,
    saelens_transcoder,
    tl_hook_of_hf_hook,
)

CT_CONFIG = "config.yaml"
GS2_CONFIG = "config.json"
GS2_PARAMS = "params.safetensors"
GS_PARAMS = "params.npz"
CT_KINDS = ("transcoder_set", "cross_layer_transcoder")
#: circuit-tracer's output hook for the MLP module's own output
CT_MLP_MODULE_OUT = "mlp.hook_out"
_CT_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_CT_ENC_FILE = re.compile(r"^W_enc_(\d+)\.safetensors$")
_GS2_CLT_FILE = re.compile(r"^params_layer_(\d+)\.safetensors$")
#: models whose MLP output is normalised (ln2_post): mlp.hook_out != hook_mlp_out there
_POST_NORM_MODELS = re.compile(r"gemma-?[23]", re.IGNORECASE)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
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


# ---- detection -------------------------------------------------------------------------


def detect(root: Path) -> str:
    """The name of the format of folder ``root`` (module docstring); TranscoderConfigError
    when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if (root / MANIFEST).is_file():
        return "tl_circuits.transcoder_set"
    if (root / CFG_FILE).is_file():
        cfg = _read_json(root / CFG_FILE)
        return "tl_circuits.clt" if cfg.get("format") == CLT_FORMAT else "saelens"
    if (root / CT_CONFIG).is_file():
        return "circuit_tracer"
    if (root / GS2_CONFIG).is_file():
        if (root / GS2_PARAMS).is_file():
            return "gemma_scope_2"
        if any(_GS2_CLT_FILE.match(p.name) for p in root.iterdir()):
            return "gemma_scope_2_clt"
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs and all((p / SAELENS_CFG).is_file() for p in subdirs):
        return "saelens_dirs"
    if subdirs and all(_is_gs2_dir(p) for p in subdirs):
        return "gemma_scope_2_dirs"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    hint = ""
    if any(root.rglob(GS_PARAMS)):
        hint = (
            f" It holds Gemma Scope {GS_PARAMS} files, which do not name their hooks: load "
            "them through SAE-Lens's release (e.g. 'gemma-scope-2b-pt-transcoders') or add a "
            f"circuit-tracer {CT_CONFIG} listing them (docs/dictionaries.md)."
        )
    raise TranscoderConfigError(
        f"{root}: not a transcoder folder in any known format (found {found[:8]}"
        f"{'...' if len(found) > 8 else ''}); expected {MANIFEST}, {CFG_FILE}, {CT_CONFIG}, "
        f"{GS2_CONFIG}, or sub-folders of SAE-Lens / Gemma Scope 2 transcoders.{hint}"
    )


def _is_gs2_dir(path: Path) -> bool:
    return (path / GS2_CONFIG).is_file() and (path / GS2_PARAMS).is_file()


def load_folder(root: Path, options: Options) -> Transcoders:
    """Transcoders from folder ``root`` in whatever format :func:`detect` finds."""
    root = Path(root)
    kind = detect(root)
    if kind == "tl_circuits.clt":
        loaded: Transcoders = CrossLayerTranscoder.load(
            root, device=options.device, dtype=options.dtype, lazy=options.lazy
        )
    elif kind in ("tl_circuits.transcoder_set", "saelens_dirs"):
        loaded = TranscoderSet.load(root, device=str(options.device))
        if options.dtype is not None and loaded.dtype != options.dtype:
            loaded = loaded.to(dtype=options.dtype)
    elif kind == "saelens":
        loaded = TranscoderSet.from_disk([root], device=str(options.device))
        if options.dtype is not None and loaded.dtype != options.dtype:
            loaded = loaded.to(dtype=options.dtype)
    elif kind == "circuit_tracer":
        loaded = load_circuit_tracer(root, options)
    elif kind == "gemma_scope_2":
        loaded = _gs2_set([root], options)
    elif kind == "gemma_scope_2_dirs":
        loaded = _gs2_set(sorted(p for p in root.iterdir() if p.is_dir()), options)
    else:
        assert kind == "gemma_scope_2_clt"
        loaded = _gs2_clt_from_folder(root, options)
    if options.n_layers is not None and loaded.n_layers != options.n_layers:
        raise TranscoderConfigError(
            f"{root}: {kind} transcoders for {loaded.n_layers} layers, but {options.n_layers} "
            f"were asked for (a layer is missing or extra: layer {loaded.n_layers} "
            f"{'is missing' if loaded.n_layers < options.n_layers else 'is one too many'})"
        )
    return loaded


# ---- file helpers ------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TranscoderConfigError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise TranscoderConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TranscoderConfigError(f"{path}: not a readable YAML file: {exc}") from exc
    if not isinstance(data, dict):
        raise TranscoderConfigError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data


def _read_tensors(path: Path) -> dict[str, Tensor]:
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


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
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


def _expect(path: Path, tensors: Mapping[str, Tensor], required: set[str], optional: set[str]):
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


def _non_negative_threshold(path: Path, name: str, threshold: Tensor) -> None:
    """circuit-tracer's JumpReLU keeps ``z`` where ``z > threshold`` without clipping at 0;
    SAE-Lens's (and ours) also clips. They agree exactly when no threshold is negative."""
    if bool((threshold < 0).any()):
        raise TranscoderConfigError(
            f"{path}: {name} has negative values; circuit-tracer's JumpReLU would then pass "
            "negative activations that SAE-Lens's JumpReLU (which tl_circuits computes) clips, "
            "so the two would differ: refusing rather than changing the transcoder"
        )


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
    common = dict(
        hook_in=hook_in,
        hook_out=hook_out,
        module_out=module_out,
        model_name=model_name,
        activation=activation,
        k=k,
    )
    if kind == "transcoder_set":
        if paths is None:
            paths = _numbered_files(root, _CT_LAYER_FILE, "layer_{}.safetensors", options)
        return _per_layer_set(paths, options, **common)
    if paths is not None:
        return _gs2_clt(paths, options, **common)
    return _ct_clt(root, options, **common)


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


def _numbered_files(root: Path, pattern: re.Pattern, template: str, options: Options) -> list[Path]:
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


def _per_layer_tensors(path: Path) -> tuple[dict[str, Tensor], str]:
    """One per-layer transcoder file in SAE-Lens names and orientation, and its format."""
    raw = _read_tensors(path)
    if path.suffix == ".npz":
        # Gemma Scope: W_enc [d_model, d_sae] (already SAE-Lens's orientation), JumpReLU
        _expect(path, raw, {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}, set())
        d_model, d_sae = raw["W_enc"].shape
        out = {k: raw[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
        fmt = "gemma_scope"
    elif "w_enc" in raw:
        # Gemma Scope 2: w_enc [d_in, d_sae], affine_skip_connection [d_in, d_out]
        _expect(
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
        _expect(
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
            _non_negative_threshold(path, "activation_function.threshold", threshold)
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


def _per_layer_set(
    paths: Sequence[Path],
    options: Options,
    *,
    hook_in: str,
    hook_out: str,
    module_out: bool,
    model_name: str | None,
    activation: str | None,
    k: int | None,
) -> TranscoderSet:
    saes = []
    for layer, path in enumerate(paths):
        tensors, _ = _per_layer_tensors(path)
        _check_activation(path, activation, "threshold" in tensors)
        dtype = options.dtype if options.dtype is not None else tensors["W_enc"].dtype
        saes.append(
            saelens_transcoder(
                tensors,
                hook_name=hook_in.format(layer=layer),
                hook_name_out=hook_out.format(layer=layer),
                dtype=dtype,
                device=options.device,
                model_name=model_name,
                fold_ln=False,
                metadata={SOURCE_HOOK_OUT_KEY: f"blocks.{layer}.{CT_MLP_MODULE_OUT}"}
                if module_out
                else None,
            )
        )
    return TranscoderSet(saes, top_k=k)


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
        enc = _read_tensors(enc_path)
        dec = _read_tensors(dec_path)
        i = layer
        _expect(enc_path, enc, {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"}, {f"threshold_{i}"})
        _expect(dec_path, dec, {f"W_dec_{i}"}, set())
        out = {
            "W_enc": enc[f"W_enc_{i}"].T,
            "b_enc": enc[f"b_enc_{i}"],
            "b_dec": enc[f"b_dec_{i}"],
            "W_dec": dec[f"W_dec_{i}"],
        }
        if f"threshold_{i}" in enc:
            threshold = enc[f"threshold_{i}"].reshape(-1)
            _non_negative_threshold(enc_path, f"threshold_{i}", threshold)
            out["threshold"] = threshold
        return out


def _ct_clt(
    root: Path,
    options: Options,
    *,
    hook_in: str,
    hook_out: str,
    module_out: bool,
    model_name: str | None,
    activation: str | None,
    k: int | None,
) -> CrossLayerTranscoder:
    enc_files = _numbered_files(root, _CT_ENC_FILE, "W_enc_{}.safetensors", options)
    n_layers = len(enc_files)
    for i in range(n_layers):
        if not (root / f"W_dec_{i}.safetensors").is_file():
            raise FileNotFoundError(f"{root / f'W_dec_{i}.safetensors'}: CLT layer file missing")
    shapes, file_dtype = _header(enc_files[0])
    if "W_enc_0" not in shapes or len(shapes["W_enc_0"]) != 2:
        raise TranscoderConfigError(f"{enc_files[0]}: no 2-d tensor W_enc_0")
    d_sae, d_model = shapes["W_enc_0"]
    has_threshold = "threshold_0" in shapes
    _check_activation(enc_files[0], activation, has_threshold)
    return _clt(
        CircuitTracerCLTReader(root),
        options,
        file_dtype,
        n_layers=n_layers,
        d_model=d_model,
        d_sae=d_sae,
        activation=activation or ("jumprelu" if has_threshold else "relu"),
        top_k=k,
        skip=False,
        hook_in=hook_in,
        hook_out=hook_out,
        module_out=module_out,
        model_name=model_name,
    )


def _clt(
    reader: Any,
    options: Options,
    file_dtype: torch.dtype,
    *,
    n_layers: int,
    d_model: int,
    d_sae: int,
    activation: str,
    top_k: int | None,
    skip: bool,
    hook_in: str,
    hook_out: str,
    module_out: bool,
    model_name: str | None,
) -> CrossLayerTranscoder:
    clt = CrossLayerTranscoder(
        None,
        n_layers=n_layers,
        d_model=d_model,
        d_sae=d_sae,
        activation=activation,  # type: ignore[arg-type]
        top_k=top_k,
        skip=skip,
        input_hook=hook_in,
        output_hook=hook_out,
        fold_ln=False,
        model_name=model_name,
        reader=reader,
        dtype=options.dtype if options.dtype is not None else file_dtype,
        device=options.device,
        output_is_mlp_module_out=module_out,
    )
    if not options.lazy:
        for layer in range(n_layers):
            clt.layer_tensors(layer)
        clt.check_consistent()
    return clt


# ---- Gemma Scope 2 -------------------------------------------------------------------------


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


def _gs2_set(folders: Sequence[Path], options: Options) -> TranscoderSet:
    """Gemma Scope 2 transcoder folders (``config.json`` + ``params.safetensors``), one per
    layer; the layer is the one the config's hook points name."""
    by_layer: dict[int, Path] = {}
    saes = []
    for folder in folders:
        config_path = folder / GS2_CONFIG
        cfg = _read_json(config_path)
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
        tensors, fmt = _per_layer_tensors(path)
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
        raw = _read_tensors(path)
        _expect(
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
    shapes, dtype = _header(paths[0])
    for name in ("w_enc", "w_dec"):
        if name not in shapes:
            raise TranscoderConfigError(
                f"{paths[0]}: no {name}; not a Gemma Scope 2 cross-layer transcoder file"
            )
    if len(shapes["w_enc"]) != 2:
        raise TranscoderConfigError(f"{paths[0]}: w_enc has shape {shapes['w_enc']}")
    d_model, d_sae = shapes["w_enc"]
    return d_model, d_sae, "affine_skip_connection" in shapes, dtype


def _gs2_clt(
    paths: Sequence[Path],
    options: Options,
    *,
    hook_in: str,
    hook_out: str,
    module_out: bool,
    model_name: str | None,
    activation: str | None,
    k: int | None,
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
    if activation not in (None, "jumprelu"):
        raise TranscoderConfigError(f"{paths[0]}: Gemma Scope 2 CLTs are JumpReLU")
    return _clt(
        GemmaScope2CLTReader(paths),
        options,
        dtype,
        n_layers=len(paths),
        d_model=d_model,
        d_sae=d_sae,
        activation="jumprelu",
        top_k=None,
        skip=skip,
        hook_in=hook_in,
        hook_out=hook_out,
        module_out=module_out,
        model_name=model_name,
    )


def _gs2_clt_from_folder(root: Path, options: Options) -> CrossLayerTranscoder:
    """A Gemma Scope 2 CLT folder: ``config.json`` + ``params_layer_{i}.safetensors``."""
    config_path = root / GS2_CONFIG
    cfg = _read_json(config_path)
    _, hook_in, hook_out = _gs2_hooks(config_path, cfg)
    paths = _numbered_files(root, _GS2_CLT_FILE, "params_layer_{}.safetensors", options)
    name = cfg.get("model_name") if isinstance(cfg.get("model_name"), str) else None
    return _gs2_clt(
        paths,
        options,
        hook_in=hook_in,
        hook_out=hook_out,
        module_out=False,
        model_name=name,
        activation=None,
        k=None,
    )
