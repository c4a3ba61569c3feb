"""Lossy conversions of cross-layer transcoders that tl_circuits refuses.

SAE-Lens can load a cross-layer transcoder one layer at a time as per-layer transcoders by
summing each feature's decoders over all the layers it writes to (the
``mntss_clt_layer_transcoder`` loader of the ``*-clt-as-per-layer`` releases, and the
``gemma_3`` loader on a ``clt`` folder). SAE-Lens warns that the result is only for finding
feature activations, not for reconstruction: the summed decoder writes every layer's
contribution into the source layer's MLP output. A graph built on it would be a graph of a
different model, so it is refused, pointing to the CLT itself
(``load_transcoders("owner/name")``), which tl_circuits loads exactly.

Provenance is read from SAE-Lens's release directory: the release's ``conversion_func`` and
SAE paths, and for SAE objects the ``neuronpedia_id`` SAE-Lens copies from the directory
into ``cfg.metadata`` (e.g. ``gemma-2-2b/0-clt-hp``).
"""

from __future__ import annotations

from typing import Any

from tl_circuits.errors import TranscoderConfigError

#: SAE-Lens loaders that sum a CLT's decoders into one per layer
_SUMMING_LOADERS = ("mntss_clt_layer_transcoder",)


def _directory() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _clt_folder(entry: Any) -> str | None:
    """The CLT folder of a ``gemma_3`` release whose SAE paths lie in a ``clt`` folder."""
    if entry.conversion_func != "gemma_3":
        return None
    for path in entry.saes_map.values():
        parts = str(path).split("/")
        if "clt" in parts[0].lower():
            return "/".join(parts[:-1]) or parts[0]
    return None


def is_lossy_release(entry: Any) -> bool:
    """True for a release whose SAEs are a CLT's layers with summed decoders."""
    return (
        entry.conversion_func in _SUMMING_LOADERS
        or entry.release.endswith("clt-as-per-layer")
        or _clt_folder(entry) is not None
    )


def lossy_message(entry: Any, what: str | None = None) -> str:
    """The refusal of release ``entry`` (or of ``what``, SAE objects that came from it)."""
    folder = _clt_folder(entry)
    source = entry.repo_id + (f"//{folder}" if folder else "")
    subject = (
        f"SAE-Lens release {entry.release!r} is"
        if what is None
        else f"{what} comes from SAE-Lens release {entry.release!r},"
    )
    return (
        f"{subject} a cross-layer transcoder loaded as per-layer transcoders with each "
        "feature's decoders summed over the layers it writes to (SAE-Lens: 'not for "
        "reconstruction'); its replacement model and graphs would not be the CLT's. Load the "
        f"CLT itself: load_transcoders({source!r})"
    )


def check_release(release: str) -> None:
    """Raise TranscoderConfigError if SAE-Lens release ``release`` is a lossy conversion."""
    entry = _directory().get(release)
    if entry is not None and is_lossy_release(entry):
        raise TranscoderConfigError(lossy_message(entry))


def check_metadata(metadata: Any, where: str) -> None:
    """Raise TranscoderConfigError if an SAE's metadata shows it came from a lossy release
    (its ``neuronpedia_id`` is one of such a release's). Reads SAE-Lens's directory only when
    the SAE has a neuronpedia id that could be a CLT's (contains ``clt``)."""
    npid = metadata.get("neuronpedia_id") if metadata is not None else None
    if not isinstance(npid, str) or "clt" not in npid.lower():
        return
    for entry in _directory().values():
        if is_lossy_release(entry) and npid in entry.neuronpedia_id.values():
            raise TranscoderConfigError(lossy_message(entry, f"{where} (neuronpedia id {npid!r})"))
