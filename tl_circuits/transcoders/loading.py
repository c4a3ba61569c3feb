"""Load real pretrained models and transcoders: TransformerLens names, SAE-Lens releases,
local folders.

    model, transcoders = load_pretrained("gemma-2-2b", "gemma-scope-2b-pt-transcoders")

- Models: ``HookedTransformer.from_pretrained_no_processing(name)`` (or
  ``from_pretrained`` with ``fold_ln=True``): transcoders must be used on the model they
  were trained on, and SAE-Lens's transcoder releases were trained on unprocessed models.
- Transcoders: a local folder (a :meth:`TranscoderSet.save` folder or SAE-Lens
  directories, or a cross-layer transcoder in the CLT format) or an SAE-Lens release
  (``SAE.from_pretrained`` per layer; the Hugging Face hub or its local cache). A release's
  SAE id per layer is ``sae_id_template.format(layer=l)``, or found in the release's
  directory entry when it has exactly one SAE per layer.

Errors say what to change (:class:`PretrainedError`); nothing is downloaded except by the
Hugging Face loaders the names point to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_circuits.errors import PretrainedError
from tl_circuits.model.loading import load_model, torch_dtype

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_circuits.transcoders.base import Transcoders


def load_pretrained(
    model: str,
    transcoders: str,
    *,
    sae_id_template: str | None = None,
    fold_ln: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    **sae_kwargs: Any,
) -> tuple[HookedTransformer, Transcoders]:
    """The model named ``model`` and its ``transcoders`` (folder or release; see the
    module docstring). ``sae_kwargs`` go to ``SAE.from_pretrained`` (e.g. ``converter=``)."""
    hooked = load_model(model, fold_ln=fold_ln, device=device, dtype=dtype)
    loaded = load_transcoders(
        transcoders,
        hooked.cfg.n_layers,
        sae_id_template=sae_id_template,
        device=device,
        dtype=dtype,
        **sae_kwargs,
    )
    return hooked, loaded


def release_entry(name: str) -> Any | None:
    """SAE-Lens's directory entry of release ``name`` (None: not a release)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory().get(name)


def release_sae_ids(name: str, n_layers: int, template: str | None = None) -> list[str]:
    """One SAE id per layer of release ``name``: ``template.format(layer=l)`` if given,
    else the release's ids when it has exactly one per layer (``layer_{l}`` in the id)."""
    release = release_entry(name)
    if release is None:
        raise PretrainedError(f"{name!r} is not an SAE-Lens release")
    available = list(release.saes_map)
    if template is not None:
        if "{layer}" not in template:
            raise PretrainedError(f"SAE id template {template!r} has no '{{layer}}' placeholder")
        ids = [template.format(layer=layer) for layer in range(n_layers)]
        missing = [i for i in ids if i not in available]
        if missing:
            raise PretrainedError(
                f"release {name!r} has no SAE ids {missing[:3]}...; it has e.g. {available[:3]}"
            )
        return ids
    by_layer: dict[int, list[str]] = {}
    for sae_id in available:
        match = re.search(r"layer_(\d+)", sae_id)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(sae_id)
    if sorted(by_layer) != list(range(n_layers)) or any(len(v) > 1 for v in by_layer.values()):
        raise PretrainedError(
            f"release {name!r} does not have exactly one SAE per layer 0..{n_layers - 1}; "
            f"choose with an SAE id template (its ids look like {available[:3]})"
        )
    return [by_layer[layer][0] for layer in range(n_layers)]


def load_transcoders(
    spec: str,
    n_layers: int,
    *,
    sae_id_template: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    **sae_kwargs: Any,
) -> Transcoders:
    """Transcoders from a local folder or an SAE-Lens release (module docstring)."""
    from tl_circuits.transcoders import CrossLayerTranscoder, TranscoderSet
    from tl_circuits.transcoders.cross_layer import CFG_FILE, CLT_FORMAT

    dtype_ = torch_dtype(dtype)
    path = Path(spec)
    if path.is_dir():
        cfg = path / CFG_FILE
        if cfg.is_file() and json.loads(cfg.read_text()).get("format") == CLT_FORMAT:
            return CrossLayerTranscoder.load(path, device=device, dtype=dtype_)
        return TranscoderSet.load(path, device=device).to(dtype=dtype_)
    if release_entry(spec) is None:
        raise PretrainedError(
            f"transcoders {spec!r}: not a directory and not an SAE-Lens release (releases "
            "are listed in sae_lens's pretrained_saes.yaml)"
        )
    ids = release_sae_ids(spec, n_layers, sae_id_template)
    try:
        return TranscoderSet.from_pretrained(spec, ids, device=device, dtype=dtype, **sae_kwargs)
    except OSError as exc:
        raise PretrainedError(
            f"could not load release {spec!r} from the Hugging Face hub or its cache: {exc}"
        ) from exc
