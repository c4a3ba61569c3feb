"""Per-layer transcoders (PLTs) in SAE-Lens's format.

A :class:`TranscoderSet` holds one SAE-Lens transcoder per model layer, of any of the four
classes ``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``,
``JumpReLUSkipTranscoder``. The skip term ``W_skip`` is kept (SAE-Lens's own
``HookedSAETransformer`` drops it when splicing).

On disk a set is a directory of SAE-Lens directories (``layer_{l}/cfg.json`` +
``layer_{l}/sae_weights.safetensors``, written by ``SAE.save_model``) plus a manifest
``transcoder_set.json`` naming them; :meth:`TranscoderSet.load` also accepts a directory
of SAE-Lens directories with no manifest.

Formats that are not SAE-Lens's own (circuit-tracer's, Gemma Scope's) are turned into these
same SAE-Lens objects by :func:`saelens_transcoder`. A set refuses SAEs whose metadata
shows they are a cross-layer transcoder with summed decoders (module ``lossy``).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from torch import Tensor

from tl_circuits.errors import TranscoderConfigError
from tl_circuits.transcoders import lossy
from tl_circuits.transcoders.base import Encoder, Transcoders, layer_of_hook, read_json_object

MANIFEST = "transcoder_set.json"
SET_FORMAT, SET_VERSION = "tl_circuits.transcoder_set", 1
SAELENS_CFG = "cfg.json"
#: SAE-Lens transcoder class and config class by (skip, jumprelu)
SAELENS_CLASSES: dict[tuple[bool, bool], tuple[type[Transcoder], type[TranscoderConfig]]] = {
    (False, False): (Transcoder, TranscoderConfig),
    (True, False): (SkipTranscoder, SkipTranscoderConfig),
    (False, True): (JumpReLUTranscoder, JumpReLUTranscoderConfig),
    (True, True): (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
}


#: metadata key recording the output hook a foreign format named, when it is not
#: ``hook_name_out`` itself (circuit-tracer's ``mlp.hook_out``)
SOURCE_HOOK_OUT_KEY = "source_hook_name_out"


def saelens_transcoder(
    tensors: Mapping[str, Tensor],
    *,
    hook_name: str,
    hook_name_out: str,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    fold_ln: bool | None = False,
    metadata: Mapping[str, Any] | None = None,
) -> Transcoder:
    """An SAE-Lens transcoder holding ``tensors`` (SAE-Lens names and orientation:
    ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, optional
    ``threshold`` (JumpReLU classes) and ``W_skip [d_out, d_in]`` (skip classes)), converted
    to ``dtype`` on ``device``. Raises TranscoderConfigError for a tensor of the wrong shape."""
    names = set(tensors)
    unknown = names - {"W_enc", "W_dec", "b_enc", "b_dec", "threshold", "W_skip"}
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - names
    if unknown or missing:
        raise TranscoderConfigError(
            f"{hook_name}: missing tensors {sorted(missing)}, unexpected {sorted(unknown)}"
        )
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[-1]
    expected = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_out),
        "b_enc": (d_sae,),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
        "W_skip": (d_out, d_in),
    }
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise TranscoderConfigError(
                f"{hook_name}: {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
            )
    sae_cls, cfg_cls = SAELENS_CLASSES[("W_skip" in names, "threshold" in names)]
    meta: dict[str, Any] = {"hook_name": hook_name, "hook_name_out": hook_name_out}
    if model_name is not None:
        meta["model_name"] = model_name
    if fold_ln is not None:
        meta["model_from_pretrained_kwargs"] = {"fold_ln": fold_ln}
    meta.update(metadata or {})
    cfg = cfg_cls(
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        dtype=str(dtype).removeprefix("torch."),
        device="meta",
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(**meta),
    )
    with warnings.catch_warnings():  # SAE-Lens's advice on model_from_pretrained_kwargs
        warnings.filterwarnings("ignore", message=r"(?s).*model_from_pretrained_kwargs")
        sae = sae_cls(cfg)  # parameters on the meta device: no memory until assigned
    sae.cfg.device = str(device)
    state = {
        name: t.detach().to(device=device, dtype=dtype).contiguous() for name, t in tensors.items()
    }
    sae.load_state_dict(state, assign=True)
    return sae


#: Gemma Scope 2's Hugging Face module names -> the TransformerLens hook at the same point
HF_HOOKS = {
    "pre_feedforward_layernorm.output": "mlp.hook_in",
    "pre_feedforward_layernorm.input": "hook_resid_mid",
    "post_feedforward_layernorm.output": "hook_mlp_out",
}
_HF_HOOK = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.(.+)$")


def tl_hook_of_hf_hook(hf_hook: str) -> tuple[int, str] | None:
    """``(layer, TransformerLens hook)`` at the Hugging Face point ``hf_hook``
    (``model.layers.3.pre_feedforward_layernorm.output`` -> ``(3, "blocks.3.mlp.hook_in")``),
    or None for a point without an exact TransformerLens equivalent here."""
    match = _HF_HOOK.match(hf_hook or "")
    if match is None or match.group(2) not in HF_HOOKS:
        return None
    layer = int(match.group(1))
    return layer, f"blocks.{layer}.{HF_HOOKS[match.group(2)]}"


def _exact_input_hook(sae: Transcoder) -> None:
    """SAE-Lens's ``gemma_3`` loader names ``hook_mlp_in`` (the ``ln2`` input) for Gemma
    Scope 2 transcoders, whose recorded Hugging Face input is the norm's *output*
    (``pre_feedforward_layernorm.output``); use the TransformerLens hook at that point."""
    meta = sae.cfg.metadata
    found = tl_hook_of_hf_hook(meta.get("hf_hook_name") or "")
    if found is not None and meta.hook_name != found[1] and meta.hook_name.endswith("hook_mlp_in"):
        meta.hook_name = found[1]


def _fold_ln_from_metadata(sae: Transcoder) -> bool | None:
    kwargs = sae.cfg.metadata.get("model_from_pretrained_kwargs") or {}
    if "fold_ln" in kwargs:
        return bool(kwargs["fold_ln"])
    return None


def _checked_layer(i: int, sae: Transcoder, by_layer: Mapping[int, Transcoder]) -> int:
    """The layer of item ``i`` of a set, after checking it is an SAE-Lens transcoder that a
    set can splice (hooks in one block, a layer not yet in ``by_layer``, linear input)."""
    if not isinstance(sae, Transcoder):
        raise TranscoderConfigError(
            f"item {i} is a {type(sae).__name__}, not an SAE-Lens transcoder "
            "(Transcoder, SkipTranscoder, JumpReLUTranscoder or JumpReLUSkipTranscoder)"
        )
    hook_in = sae.cfg.metadata.hook_name
    hook_out = sae.cfg.metadata.hook_name_out
    lossy.check_metadata(sae.cfg.metadata, f"item {i} ({hook_in!r})")
    if not hook_in or not hook_out:
        raise TranscoderConfigError(
            f"item {i}: metadata must set hook_name and hook_name_out (got "
            f"{hook_in!r}, {hook_out!r})"
        )
    layer = layer_of_hook(hook_in)
    if layer_of_hook(hook_out) != layer:
        raise TranscoderConfigError(
            f"item {i}: reads at layer {layer} ({hook_in!r}) but writes at layer "
            f"{layer_of_hook(hook_out)} ({hook_out!r}); a per-layer transcoder must "
            "read and write in the same block (use CrossLayerTranscoder otherwise)"
        )
    if layer in by_layer:
        raise TranscoderConfigError(f"two transcoders for layer {layer} ({hook_in!r})")
    if sae.cfg.normalize_activations != "none":
        raise TranscoderConfigError(
            f"layer {layer}: normalize_activations={sae.cfg.normalize_activations!r} "
            "is not linear; fold the normalisation into the weights first"
        )
    if sae.cfg.reshape_activations != "none":
        raise TranscoderConfigError(
            f"layer {layer}: reshape_activations={sae.cfg.reshape_activations!r} "
            "is not supported for MLP transcoders"
        )
    return layer


class TranscoderSet(Transcoders):
    """One SAE-Lens transcoder per layer of the model, layer ``l`` replacing MLP ``l``.

    Build with :meth:`from_saelens` (SAE-Lens objects), :meth:`load` (a saved set),
    :meth:`from_disk` (SAE-Lens directories) or :meth:`from_pretrained` (an SAE-Lens
    release). ``saes[l]`` is the SAE-Lens object of layer ``l``.
    """

    def __init__(self, saes: Sequence[Transcoder], *, top_k: int | None = None) -> None:
        by_layer: dict[int, Transcoder] = {}
        for i, sae in enumerate(saes):
            layer = _checked_layer(i, sae, by_layer)
            by_layer[layer] = sae
        if not by_layer:
            raise TranscoderConfigError("a TranscoderSet needs at least one transcoder")
        n_layers = max(by_layer) + 1
        missing = sorted(set(range(n_layers)) - set(by_layer))
        if missing:
            raise TranscoderConfigError(
                f"no transcoder for layer(s) {missing}; every layer up to {n_layers - 1} needs one"
            )
        self.saes: list[Transcoder] = [by_layer[layer] for layer in range(n_layers)]
        self.top_k = top_k
        self.n_layers = n_layers
        self.d_model = self.saes[0].cfg.d_in
        folds = {_fold_ln_from_metadata(sae) for sae in self.saes} - {None}
        if len(folds) > 1:
            raise TranscoderConfigError(
                "the transcoders disagree on fold_ln (metadata.model_from_pretrained_kwargs)"
            )
        self.expects_folded_ln = folds.pop() if folds else None
        self.output_is_mlp_module_out = any(
            str(sae.cfg.metadata.get(SOURCE_HOOK_OUT_KEY) or "").endswith("mlp.hook_out")
            for sae in self.saes
        )
        self._encoders = [
            Encoder(
                W_enc=sae.W_enc.detach(),
                b_enc=sae.b_enc.detach(),
                threshold=sae.threshold.detach() if isinstance(sae, JumpReLUTranscoder) else None,
                top_k=top_k,
            )
            for sae in self.saes
        ]
        for layer, sae in enumerate(self.saes):
            if sae.cfg.d_in != self.d_model:
                raise TranscoderConfigError(
                    f"layer {layer} ({sae.cfg.metadata.hook_name!r}): d_in={sae.cfg.d_in}, but "
                    f"layer 0 has d_in={self.d_model}; every d_in must equal the model's d_model"
                )
            if sae.cfg.d_out != sae.cfg.d_in:
                raise TranscoderConfigError(
                    f"layer {layer} ({sae.cfg.metadata.hook_name_out!r}): d_out={sae.cfg.d_out} "
                    f"differs from d_in={sae.cfg.d_in}; an MLP transcoder reads and writes "
                    "vectors of the model's width d_model"
                )
        self.check_consistent()

    # ---- constructors ----------------------------------------------------------------

    @classmethod
    def from_saelens(cls, saes: Sequence[Transcoder], *, top_k: int | None = None) -> TranscoderSet:
        """A set from SAE-Lens transcoder objects, one per layer, in any order; ``top_k``:
        TopK activations (the ``top_k`` largest pre-activations per position kept as they are,
        :class:`~tl_circuits.transcoders.base.Encoder`) instead of the objects' own."""
        return cls(saes, top_k=top_k)

    @classmethod
    def from_disk(
        cls,
        paths: Sequence[str | Path],
        device: str = "cpu",
        dtype: str | None = None,
        *,
        top_k: int | None = None,
    ) -> TranscoderSet:
        """Load SAE-Lens transcoder directories with ``SAE.load_from_disk``."""
        saes = []
        for path in paths:
            if not (Path(path) / SAELENS_CFG).is_file():
                raise FileNotFoundError(f"{path}: not an SAE-Lens directory (no {SAELENS_CFG})")
            saes.append(_load_saelens_dir(Path(path), device, dtype))
        return cls(saes, top_k=top_k)

    @classmethod
    def from_pretrained(
        cls,
        release: str,
        sae_ids: Sequence[str],
        device: str = "cpu",
        dtype: str = "float32",
        **kwargs: Any,
    ) -> TranscoderSet:
        """Load an SAE-Lens release with ``SAE.from_pretrained`` (needs the hub or a cache).

        ``sae_ids`` lists one id per layer; ``kwargs`` go to ``SAE.from_pretrained``
        (e.g. ``converter=`` for a custom loader). A release that is a cross-layer
        transcoder with summed decoders is refused before anything is downloaded; Gemma
        Scope 2 transcoders get the input hook their recorded Hugging Face point names.
        """
        lossy.check_release(release)
        saes = [
            SAE.from_pretrained(release, sae_id, device=device, dtype=dtype, **kwargs)
            for sae_id in sae_ids
        ]
        for sae in saes:
            _exact_input_hook(sae)
        return cls(saes)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | None = None) -> TranscoderSet:
        """Load a set saved by :meth:`save` (or any directory of SAE-Lens directories)."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such transcoder-set directory")
        manifest = root / MANIFEST
        top_k = None
        if manifest.is_file():
            dirs, top_k = _read_manifest(root, manifest)
        else:
            dirs = sorted(p for p in root.iterdir() if (p / SAELENS_CFG).is_file())
            if not dirs:
                raise FileNotFoundError(
                    f"{root}: neither a {MANIFEST} manifest nor SAE-Lens sub-directories"
                )
        return cls.from_disk(dirs, device=device, dtype=dtype, top_k=top_k)

    def save(self, path: str | Path) -> Path:
        """Write each layer with ``SAE.save_model`` to ``path/layer_{l}`` plus a manifest."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        names = []
        for layer, sae in enumerate(self.saes):
            name = f"layer_{layer}"
            sae.save_model(root / name)
            names.append(name)
        (root / MANIFEST).write_text(
            json.dumps(
                {
                    "format": SET_FORMAT,
                    "version": SET_VERSION,
                    "layers": names,
                    "top_k": self.top_k,
                },
                indent=1,
            )
        )
        return root

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> TranscoderSet:
        """A new set on ``device`` / in ``dtype``, built from copies of the SAE-Lens objects.

        This set and its SAE-Lens objects are left unchanged (``nn.Module.to`` works in
        place, so the objects are deep-copied before they are moved).
        """
        return TranscoderSet(
            [copy.deepcopy(sae).to(device=device, dtype=dtype) for sae in self.saes],
            top_k=self.top_k,
        )

    # ---- Transcoders interface ----------------------------------------------------------

    def input_hook(self, layer: int) -> str:
        return self.saes[layer].cfg.metadata.hook_name

    def output_hook(self, layer: int) -> str:
        return self.saes[layer].cfg.metadata.hook_name_out

    def encoder(self, layer: int) -> Encoder:
        return self._encoders[layer]

    def decoder(self, source_layer: int, target_layer: int) -> Tensor:
        if target_layer != source_layer:
            raise IndexError(f"layer {source_layer}'s features only write to layer {source_layer}")
        return self.saes[source_layer].W_dec.detach()

    def b_dec(self, target_layer: int) -> Tensor:
        return self.saes[target_layer].b_dec.detach()

    def W_skip(self, layer: int) -> Tensor | None:
        sae = self.saes[layer]
        return sae.W_skip.detach() if isinstance(sae, SkipTranscoder) else None

    def target_layers(self, source_layer: int) -> range:
        return range(source_layer, source_layer + 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.saes[0].W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.saes[0].W_enc.device

    def __repr__(self) -> str:
        kinds = sorted({type(s).__name__ for s in self.saes})
        return (
            f"TranscoderSet(n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_sae={[self.d_sae(layer) for layer in range(self.n_layers)]}, "
            f"classes={kinds}" + (f", top_k={self.top_k})" if self.top_k else ")")
        )


__all__ = [
    "JumpReLUSkipTranscoder",
    "JumpReLUTranscoder",
    "SkipTranscoder",
    "Transcoder",
    "TranscoderSet",
]


def _read_manifest(root: Path, manifest: Path) -> tuple[list[Path], int | None]:
    """The layer folders and ``top_k`` a ``transcoder_set.json`` names, checked: our format
    and version, a list of relative folder names that stay inside ``root``."""
    header = read_json_object(manifest)
    if header.get("format") != SET_FORMAT or header.get("version") != SET_VERSION:
        raise TranscoderConfigError(
            f"{manifest}: format {header.get('format')!r} version {header.get('version')!r} "
            f"is not {SET_FORMAT!r} version {SET_VERSION}"
        )
    entries, top_k = header.get("layers"), header.get("top_k")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise TranscoderConfigError(
            f"{manifest}: 'layers' must be a non-empty list of folder names"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise TranscoderConfigError(f"{manifest}: 'top_k' must be an integer or null")
    inside = root.resolve()
    dirs = []
    for entry in entries:
        folder = (root / entry).resolve()
        if Path(entry).is_absolute() or not folder.is_relative_to(inside) or folder == inside:
            raise TranscoderConfigError(
                f"{manifest}: layer folder {entry!r} is not inside {root} (a manifest names "
                "folders of its own set only)"
            )
        dirs.append(root / entry)
    return dirs, top_k


def _load_saelens_dir(path: Path, device: str, dtype: str | None) -> Transcoder:
    """``SAE.load_from_disk`` with its failures (bad JSON, unknown architecture, missing
    keys, truncated weights) as TranscoderConfigError naming the folder."""
    read_json_object(path / SAELENS_CFG)  # a clear error for a cfg.json that is not JSON
    try:
        sae = SAE.load_from_disk(path, device=device, dtype=dtype)
    except Exception as exc:  # SAE-Lens raises KeyError/ValueError/SafetensorError/...
        raise TranscoderConfigError(
            f"{path}: SAE-Lens cannot load this transcoder directory ({type(exc).__name__}: {exc})"
        ) from exc
    return sae
