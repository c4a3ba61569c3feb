"""Where a model and its transcoders come from, as a JSON-able record.

A :class:`ModelSource` names a model and its transcoders: the embedded default (no
network), or a TransformerLens model name with transcoders from any source
``load_transcoders`` reads: a local directory in any supported format, a Hugging Face repo
id of a circuit-tracer-format repo (``owner/name[//subfolder][@revision]``), or an SAE-Lens
release (the Hugging Face hub or its local cache); see docs/dictionaries.md.

One record, read by every place that loads a model by name: ``tl-circuits trace`` stores it
in the graph's ``info["source"]`` so that ``heads`` and ``qk`` rebuild the same replacement
model from a graph file, and :func:`~tl_circuits.batch.runner.trace_many` sends it to each
of its workers, which load it once (:func:`load_source`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tl_circuits.errors import PretrainedError, TLCircuitsError
from tl_circuits.model.loading import DTYPES, check_device
from tl_circuits.transcoders.loading import release_entry

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_circuits.transcoders.base import Transcoders

DEFAULT = "default"
DEFAULT_TRANSCODERS = ("per_layer", "cross_layer")


class SourceError(TLCircuitsError):
    """The model or transcoders asked for cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """A model and its transcoders (see the module docstring).

    - ``model``: ``"default"`` or a TransformerLens model name (``gemma-2-2b``)
    - ``transcoders``: for the default, ``"per_layer"`` or ``"cross_layer"``; otherwise a
      local directory, a Hugging Face repo id or an SAE-Lens release name
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

    def __post_init__(self) -> None:
        if self.model == DEFAULT and self.fold_ln:
            raise SourceError(
                "--fold-ln does not apply to the embedded default model: its transcoders were "
                "trained on the unfolded model, so they do not fit a folded one; drop --fold-ln "
                "(it is for --model with transcoders trained on a folded model)"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ModelSource:
        if not isinstance(record, dict):
            raise SourceError(f"the graph's model-source record is not an object: {record!r:.80}")
        unknown = set(record) - set(cls.__dataclass_fields__)
        if unknown:
            raise SourceError(f"unknown model-source fields {sorted(unknown)} in {record}")
        wrong = [
            k
            for k, v in record.items()
            if not (isinstance(v, bool) if k == "fold_ln" else isinstance(v, str) or v is None)
        ]
        if wrong:
            raise SourceError(f"model-source fields {sorted(wrong)} have wrong types in {record}")
        return cls(**record)

    def describe(self) -> str:
        if self.model == DEFAULT:
            return f"embedded default model, {self.transcoders or 'per_layer'} transcoders"
        return f"{self.model} with transcoders {self.transcoders}"


def resolve_source(
    model: str | None = None,
    transcoders: str | None = None,
    *,
    sae_id_template: str | None = None,
    fold_ln: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    check_here: bool = True,
) -> ModelSource:
    """The :class:`ModelSource` of a model name and a transcoder source, as the command
    line's ``--model/--transcoders/...`` give them: no model and an SAE-Lens release take
    the release's model; no model and no transcoders (or ``per_layer``/``cross_layer``) the
    embedded default. ``check_here``: check that this machine has ``device`` (off where the
    model loads elsewhere, on a Ray worker)."""
    if model is None:
        release = release_entry(transcoders) if transcoders is not None else None
        if release is not None:
            model = release.model  # an SAE-Lens release names its model
        elif transcoders is not None and transcoders not in DEFAULT_TRANSCODERS:
            raise SourceError(
                f"--transcoders {transcoders!r} needs --model: only SAE-Lens releases name "
                "their model (folders and Hugging Face repos need --model; the default model "
                "takes 'per_layer' or 'cross_layer')"
            )
        else:
            model = DEFAULT
    if dtype not in DTYPES:
        raise SourceError(f"unknown --dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if check_here:
        device = check_source_device(device)
    if sae_id_template is not None and "{layer}" not in sae_id_template:
        raise SourceError(f"--sae-id-template {sae_id_template!r} has no '{{layer}}' placeholder")
    return ModelSource(
        model=model,
        transcoders=transcoders
        if transcoders is not None
        else ("per_layer" if model == DEFAULT else None),
        sae_id_template=sae_id_template,
        fold_ln=fold_ln,
        device=device,
        dtype=dtype,
    )


def check_source_device(device: str) -> str:
    """``device`` if this machine has it (SourceError otherwise)."""
    try:
        return check_device(device)
    except PretrainedError as exc:
        raise SourceError(f"--device: {exc}") from None


def load_source(source: ModelSource) -> tuple[HookedTransformer, Transcoders]:
    """Load the model and transcoders ``source`` names (clear errors otherwise)."""
    from tl_circuits.transcoders.loading import load_pretrained

    check_source_device(source.device)
    if source.model == DEFAULT:
        return _load_default(source)
    if source.transcoders is None:
        raise SourceError(
            f"model {source.model!r} needs --transcoders (a local directory, a Hugging Face "
            "repo id or an SAE-Lens release); only the embedded default model ships with its own"
        )
    return load_pretrained(
        source.model,
        source.transcoders,
        sae_id_template=source.sae_id_template,
        fold_ln=source.fold_ln,
        device=source.device,
        dtype=source.dtype,
    )


def _load_default(source: ModelSource) -> tuple[HookedTransformer, Transcoders]:
    from tl_circuits.default import load_default_model, load_default_transcoders
    from tl_circuits.transcoders.loading import load_transcoders

    kind = source.transcoders or "per_layer"
    dtype = DTYPES[source.dtype]
    model = load_default_model(device=source.device)
    if model.cfg.dtype != dtype:
        model = model.to(dtype)
    if kind in DEFAULT_TRANSCODERS:
        transcoders = load_default_transcoders(kind, device=source.device)
        if transcoders.dtype != dtype:
            transcoders = transcoders.to(dtype=dtype)
    else:
        transcoders = load_transcoders(
            kind, n_layers=model.cfg.n_layers, device=source.device, dtype=source.dtype
        )
    return model, transcoders
