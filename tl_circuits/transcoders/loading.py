"""Load transcoders from any supported source, and real pretrained models with them.

    tcs = load_transcoders("mntss/clt-gemma-2-2b-426k")            # a circuit-tracer repo
    tcs = load_transcoders("gemma-scope-2b-pt-transcoders")        # an SAE-Lens release
    tcs = load_transcoders("path/to/folder", dtype="bfloat16")     # a folder, any format
    model, tcs = load_pretrained("gemma-2-2b", "gemma-scope-2b-pt-transcoders")

A source is, in this order of precedence:

1. an existing local folder, in any format :mod:`tl_circuits.transcoders.formats` reads
   (detected from its files);
2. a Hugging Face repo reference ``owner/name[//subfolder][@revision]`` (any string with a
   ``/`` that is not an existing path): the config files are downloaded first, then only
   the files the format names (``tl_circuits.transcoders.hub.download``), and the local
   snapshot is read as a folder;
3. an SAE-Lens release name: ``SAE.from_pretrained`` per layer, one SAE id per layer
   (``sae_id_template.format(layer=l)``, or the release's ``layer_{N}`` ids when they cover
   ``0..max`` exactly once).

Models: ``HookedTransformer.from_pretrained_no_processing(name)`` (or ``from_pretrained``
with ``fold_ln=True``): transcoders must be used on the model they were trained on, and
SAE-Lens's and circuit-tracer's transcoders were trained on unprocessed models.

Errors say what to change (:class:`PretrainedError` for sources that cannot be found or
fetched, :class:`TranscoderConfigError` for files that do not fit); nothing is downloaded
except by the Hugging Face loaders the names point to. docs/dictionaries.md describes every
format.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tl_circuits.errors import PretrainedError, TranscoderConfigError
from tl_circuits.model.loading import load_model, parse_dtype
from tl_circuits.transcoders import hub, lossy
from tl_circuits.transcoders.cross_layer import CFG_FILE
from tl_circuits.transcoders.formats import CT_CONFIG, GS2_CONFIG, Options, load_folder
from tl_circuits.transcoders.per_layer import MANIFEST

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_circuits.transcoders.base import Transcoders


def parse_device(device: str | torch.device | None) -> torch.device:
    """A torch device (None: the CPU); a CUDA device without CUDA is refused."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise PretrainedError(f"unknown device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PretrainedError(f"device {device!r}: CUDA is not available on this machine")
    return dev


def load_pretrained(
    model: str,
    transcoders: str,
    *,
    sae_id_template: str | None = None,
    fold_ln: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    lazy: bool = True,
    **sae_kwargs: Any,
) -> tuple[HookedTransformer, Transcoders]:
    """The model named ``model`` and its ``transcoders`` (any source of
    :func:`load_transcoders`), in ``dtype`` on ``device``, checked against each other
    (layer count, width, and the model-dependent checks of ``Transcoders.check_model``).
    ``sae_kwargs`` go to ``SAE.from_pretrained`` (e.g. ``converter=``)."""
    dtype_ = parse_dtype(dtype)
    hooked = load_model(
        model, fold_ln=fold_ln, device=device, dtype=str(dtype_).removeprefix("torch.")
    )
    loaded = load_transcoders(
        transcoders,
        n_layers=hooked.cfg.n_layers,
        sae_id_template=sae_id_template,
        device=device,
        dtype=dtype_,
        lazy=lazy,
        **sae_kwargs,
    )
    if loaded.d_model != hooked.cfg.d_model:
        raise TranscoderConfigError(
            f"transcoders {transcoders!r} have d_model={loaded.d_model} but {model} has "
            f"d_model={hooked.cfg.d_model}: they belong to another model"
        )
    loaded.check_model(hooked)
    return hooked, loaded


def load_transcoders(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    lazy: bool = True,
    n_layers: int | None = None,
    sae_id_template: str | None = None,
    **sae_kwargs: Any,
) -> Transcoders:
    """Transcoders from ``source``: a local folder, a Hugging Face repo reference or an
    SAE-Lens release (module docstring; formats in docs/dictionaries.md).

    - ``device``: torch device or name (default CPU); ``dtype``: torch dtype or name
      (``"float32"``, ``"bfloat16"``, ``"float16"``); None keeps the files' dtype (an
      SAE-Lens release: float32, SAE-Lens's default).
    - ``lazy``: cross-layer transcoders read each layer's files on first use.
    - ``n_layers``: the expected layer count (e.g. the model's): a folder or repo with
      another count is refused naming the missing file; for a release, the layers to load
      (None: inferred from its ``layer_{N}`` ids).
    - ``sae_id_template`` and ``sae_kwargs``: for a release, ``SAE.from_pretrained``.
    """
    device_ = parse_device(device)
    dtype_ = parse_dtype(dtype)
    options = Options(device=device_, dtype=dtype_, lazy=lazy, n_layers=n_layers)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_folder(path, options)
    if path.exists():
        raise PretrainedError(f"{path} is a file; give the folder that holds the transcoders")
    if hub.looks_like_repo_ref(text):
        return load_repo(hub.parse_repo_ref(text), options)
    entry = release_entry(text)
    if entry is None:
        raise PretrainedError(
            f"transcoders {text!r}: not a directory and not an SAE-Lens release (releases are "
            "listed in sae_lens's pretrained_saes.yaml), nor a Hugging Face repo id "
            "('owner/name[//subfolder][@revision]')"
        )
    lossy.check_release(text)
    ids = release_sae_ids(text, n_layers, sae_id_template)
    release_dtype = str(dtype_ or torch.float32).removeprefix("torch.")
    from tl_circuits.transcoders.per_layer import TranscoderSet

    try:
        return TranscoderSet.from_pretrained(
            text, ids, device=str(device_), dtype=release_dtype, **sae_kwargs
        )
    except OSError as exc:
        raise PretrainedError(
            f"could not load release {text!r} from the Hugging Face hub or its cache: {exc}"
        ) from exc


#: the configuration files whose presence tells a repo's format, fetched first; the first
#: present decides, in the order of ``formats.detect``
_CONFIG_FILES = (MANIFEST, CFG_FILE, CT_CONFIG, GS2_CONFIG)


def load_repo(ref: hub.RepoRef, options: Options) -> Transcoders:
    """Transcoders from a Hugging Face repo: its config files first, then the files the
    config names or the format implies, then read as a local folder."""
    try:
        root = hub.download(
            ref.repo_id,
            revision=ref.revision,
            allow_patterns=[ref.pattern(name) for name in _CONFIG_FILES],
        )
    except PretrainedError as exc:
        raise PretrainedError(f"{exc} (and there is no local folder {str(ref)!r})") from exc
    folder = root / ref.subfolder if ref.subfolder else root
    present = [name for name in _CONFIG_FILES if (folder / name).is_file()]
    if not present:
        raise PretrainedError(repo_without_config(ref))
    patterns = _files_to_fetch(ref, folder, present[0])
    if patterns:
        root = hub.download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)
        folder = root / ref.subfolder if ref.subfolder else root
    return load_folder(folder, options)


def _files_to_fetch(ref: hub.RepoRef, folder: Path, config: str) -> list[str]:
    """``allow_patterns`` for the weights of a repo whose config file is ``config``."""
    if config != CT_CONFIG:  # our formats and Gemma Scope 2: the whole folder
        return [ref.pattern("*")]
    from tl_circuits.transcoders.formats import read_yaml

    cfg = read_yaml(folder / CT_CONFIG)
    listed = cfg.get("transcoders")
    if isinstance(listed, list):  # hf:// entries are fetched while reading the folder
        return [ref.pattern(p) for p in listed if isinstance(p, str) and "://" not in p]
    if cfg.get("model_kind") == "cross_layer_transcoder":
        return [ref.pattern("W_enc_*.safetensors"), ref.pattern("W_dec_*.safetensors")]
    return [ref.pattern("layer_*.safetensors")]


def repo_without_config(ref: hub.RepoRef) -> str:
    """The error for a repo (folder) without a configuration file we know."""
    message = (
        f"Hugging Face repo {str(ref)!r} has none of {list(_CONFIG_FILES)}: not a "
        "transcoder repo in a format tl_circuits reads (docs/dictionaries.md)"
    )
    try:
        from sae_lens.loading.pretrained_saes_directory import get_releases_for_repo_id

        releases = get_releases_for_repo_id(ref.repo_id)
    except Exception:  # the directory is a hint only
        releases = []
    if releases:
        message += (
            f"; SAE-Lens knows it as release(s) {releases}: load_transcoders({releases[0]!r})"
        )
    return message


# ---- SAE-Lens releases ------------------------------------------------------------------


def release_entry(name: str) -> Any | None:
    """SAE-Lens's directory entry of release ``name`` (None: not a release)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory().get(name)


def release_sae_ids(name: str, n_layers: int | None, template: str | None = None) -> list[str]:
    """One SAE id per layer of release ``name``: ``template.format(layer=l)`` if given, else
    the release's ids when it has exactly one per layer (``layer_{l}`` in the id). With
    ``n_layers`` None the layers are ``0..max`` of the ids found, which must cover that range
    exactly once."""
    release = release_entry(name)
    if release is None:
        raise PretrainedError(f"{name!r} is not an SAE-Lens release")
    available = list(release.saes_map)
    if template is not None:
        if "{layer}" not in template:
            raise PretrainedError(f"SAE id template {template!r} has no '{{layer}}' placeholder")
        if n_layers is None:
            regex = re.compile(
                "^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$"
            )
            layers = sorted(int(m.group(1)) for i in available if (m := regex.match(i)))
            if not layers or layers != list(range(layers[-1] + 1)):
                raise PretrainedError(
                    f"release {name!r}: the ids matching {template!r} do not cover layers "
                    f"0..max exactly once (found layers {layers[:8]}); pass n_layers"
                )
            n_layers = len(layers)
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
    if n_layers is None:
        n_layers = max(by_layer) + 1 if by_layer else 0
    if (
        n_layers == 0
        or sorted(by_layer) != list(range(n_layers))
        or any(len(v) > 1 for v in by_layer.values())
    ):
        raise PretrainedError(
            f"release {name!r} does not have exactly one SAE per layer 0..{n_layers - 1}; "
            f"choose with an SAE id template (its ids look like {available[:3]})"
        )
    return [by_layer[layer][0] for layer in range(n_layers)]
