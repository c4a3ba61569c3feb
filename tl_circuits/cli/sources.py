"""Where the CLI's model and transcoders come from, as a JSON-able record.

A :class:`ModelSource` names a model and its transcoders: the embedded default (no
network), or a TransformerLens model name with transcoders from a local directory
(SAE-Lens per-layer directories, a :meth:`TranscoderSet.save` folder, or a cross-layer
transcoder folder) or an SAE-Lens release (``SAE.from_pretrained``: the Hugging Face hub or
its local cache). ``trace`` stores the record in the graph's ``info["source"]`` so that
``heads`` and ``qk`` rebuild the same replacement model from a graph file.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tl_circuits.errors import TLCircuitsError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_circuits.transcoders.base import Transcoders

DEFAULT = "default"
DEFAULT_TRANSCODERS = ("per_layer", "cross_layer")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class SourceError(TLCircuitsError):
    """The model or transcoders asked for cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """A model and its transcoders (see the module docstring).

    - ``model``: ``"default"`` or a TransformerLens model name (``gemma-2-2b``)
    - ``transcoders``: for the default, ``"per_layer"`` or ``"cross_layer"``; otherwise a
      local directory or an SAE-Lens release name
    - ``sae_id_template``: for a release, the SAE id of layer ``l`` as
      ``template.format(layer=l)`` (None: the release's ids if it has one per layer)
    - ``fold_ln``: load the model with LayerNorm folded (must match how the transcoders
      were trained; SAE-Lens transcoder releases are trained on unprocessed models)
    """

    model: str = DEFAULT
    transcoders: str | None = None
    sae_id_template: str | None = None
    fold_ln: bool = False
    device: str = "cpu"
    dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ModelSource:
        unknown = set(record) - set(cls.__dataclass_fields__)
        if unknown:
            raise SourceError(f"unknown model-source fields {sorted(unknown)} in {record}")
        return cls(**record)

    def describe(self) -> str:
        if self.model == DEFAULT:
            return f"embedded default model, {self.transcoders or 'per_layer'} transcoders"
        return f"{self.model} with transcoders {self.transcoders}"


def source_from_args(args: Any) -> ModelSource:
    """The :class:`ModelSource` of parsed ``--model/--transcoders/...`` options."""
    model, transcoders = args.model, args.transcoders
    if model is None:
        release = _release(transcoders) if transcoders is not None else None
        if release is not None:
            model = release.model  # an SAE-Lens release names its model
        elif transcoders is not None and transcoders not in DEFAULT_TRANSCODERS:
            raise SourceError(
                f"--transcoders {transcoders!r} needs --model: only SAE-Lens releases name "
                "their model (the default model takes 'per_layer' or 'cross_layer')"
            )
        else:
            model = DEFAULT
    if args.dtype not in DTYPES:
        raise SourceError(f"unknown --dtype {args.dtype!r}; choose from {sorted(DTYPES)}")
    template = getattr(args, "sae_id_template", None)
    if template is not None and "{layer}" not in template:
        raise SourceError(f"--sae-id-template {template!r} has no '{{layer}}' placeholder")
    return ModelSource(
        model=model,
        transcoders=transcoders
        if transcoders is not None
        else ("per_layer" if model == DEFAULT else None),
        sae_id_template=template,
        fold_ln=bool(getattr(args, "fold_ln", False)),
        device=args.device,
        dtype=args.dtype,
    )


def load_source(source: ModelSource) -> tuple[HookedTransformer, Transcoders]:
    """Load the model and transcoders ``source`` names (clear errors otherwise)."""
    if source.device.startswith("cuda") and not torch.cuda.is_available():
        raise SourceError(f"--device {source.device}: CUDA is not available on this machine")
    if source.model == DEFAULT:
        return _load_default(source)
    if source.transcoders is None:
        raise SourceError(
            f"model {source.model!r} needs --transcoders (a local directory or an SAE-Lens "
            "release); only the embedded default model ships with its own"
        )
    model = load_model(source)
    transcoders = _load_transcoders(source, model.cfg.n_layers)
    return model, transcoders


def _load_default(source: ModelSource) -> tuple[HookedTransformer, Transcoders]:
    from tl_circuits.default import load_default_model, load_default_transcoders

    kind = source.transcoders or "per_layer"
    model = load_default_model(device=source.device)
    if kind in DEFAULT_TRANSCODERS:
        transcoders = load_default_transcoders(kind, device=source.device)
    else:
        transcoders = _load_transcoders(source, model.cfg.n_layers)
    return model.to(DTYPES[source.dtype]), transcoders.to(
        device=source.device, dtype=DTYPES[source.dtype]
    )


def load_model(source: ModelSource) -> HookedTransformer:
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(source.model)
    except ValueError as exc:
        raise SourceError(
            f"unknown model {source.model!r}: not a TransformerLens model name "
            "(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES), and not "
            "'default'"
        ) from exc
    load = (
        HookedTransformer.from_pretrained
        if source.fold_ln
        else HookedTransformer.from_pretrained_no_processing
    )
    try:
        return load(source.model, device=source.device, dtype=DTYPES[source.dtype])
    except OSError as exc:  # no network and not in the Hugging Face cache
        raise SourceError(
            f"could not load {source.model!r} from the Hugging Face hub or its cache: {exc}"
        ) from exc


def _release(name: str) -> Any | None:
    """The SAE-Lens directory entry of release ``name`` (None: not a release)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory().get(name)


def release_sae_ids(name: str, n_layers: int, template: str | None = None) -> list[str]:
    """One SAE id per layer of release ``name``: ``template.format(layer=l)`` if given,
    else the release's ids when it has exactly one per layer (``layer_{l}`` in the id)."""
    release = _release(name)
    if release is None:
        raise SourceError(f"{name!r} is not an SAE-Lens release")
    available = list(release.saes_map)
    if template is not None:
        ids = [template.format(layer=layer) for layer in range(n_layers)]
        missing = [i for i in ids if i not in available]
        if missing:
            raise SourceError(
                f"release {name!r} has no SAE ids {missing[:3]}...; it has e.g. {available[:3]}"
            )
        return ids
    by_layer: dict[int, list[str]] = {}
    for sae_id in available:
        match = re.search(r"layer_(\d+)", sae_id)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(sae_id)
    if sorted(by_layer) != list(range(n_layers)) or any(len(v) > 1 for v in by_layer.values()):
        raise SourceError(
            f"release {name!r} does not have exactly one SAE per layer 0..{n_layers - 1}; "
            f"choose with --sae-id-template (its ids look like {available[:3]})"
        )
    return [by_layer[layer][0] for layer in range(n_layers)]


def _load_transcoders(source: ModelSource, n_layers: int) -> Transcoders:
    from tl_circuits.transcoders import CrossLayerTranscoder, TranscoderSet
    from tl_circuits.transcoders.cross_layer import CFG_FILE, CLT_FORMAT

    name = source.transcoders
    assert name is not None
    path = Path(name)
    dtype = DTYPES[source.dtype]
    if path.is_dir():
        cfg = path / CFG_FILE
        if cfg.is_file() and json.loads(cfg.read_text()).get("format") == CLT_FORMAT:
            return CrossLayerTranscoder.load(path, device=source.device, dtype=dtype)
        return TranscoderSet.load(path, device=source.device)
    if _release(name) is None:
        raise SourceError(
            f"transcoders {name!r}: not a directory and not an SAE-Lens release (releases "
            "are listed in sae_lens's pretrained_saes.yaml)"
        )
    ids = release_sae_ids(name, n_layers, source.sae_id_template)
    try:
        return TranscoderSet.from_pretrained(name, ids, device=source.device, dtype=source.dtype)
    except OSError as exc:
        raise SourceError(
            f"could not load release {name!r} from the Hugging Face hub or its cache: {exc}"
        ) from exc
