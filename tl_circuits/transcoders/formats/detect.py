"""Which format a folder holds (:func:`detect`) and reading it (:func:`load_folder`)."""

from __future__ import annotations

from pathlib import Path

from tl_circuits.errors import TranscoderConfigError
from tl_circuits.transcoders.base import Transcoders
from tl_circuits.transcoders.cross_layer import CFG_FILE, CLT_FORMAT, CrossLayerTranscoder
from tl_circuits.transcoders.formats.circuit_tracer import load_circuit_tracer
from tl_circuits.transcoders.formats.files import (
    CT_CONFIG,
    GS2_CLT_FILE,
    GS2_CONFIG,
    GS2_PARAMS,
    GS_PARAMS,
    Options,
    read_json,
)
from tl_circuits.transcoders.formats.gemma_scope import gs2_clt_from_folder, gs2_set
from tl_circuits.transcoders.per_layer import MANIFEST, SAELENS_CFG, TranscoderSet


def detect(root: Path) -> str:
    """The name of the format of folder ``root`` (module docstring); TranscoderConfigError
    when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if (root / MANIFEST).is_file():
        return "tl_circuits.transcoder_set"
    if (root / CFG_FILE).is_file():
        cfg = read_json(root / CFG_FILE)
        return "tl_circuits.clt" if cfg.get("format") == CLT_FORMAT else "saelens"
    if (root / CT_CONFIG).is_file():
        return "circuit_tracer"
    if (root / GS2_CONFIG).is_file():
        if (root / GS2_PARAMS).is_file():
            return "gemma_scope_2"
        if any(GS2_CLT_FILE.match(p.name) for p in root.iterdir()):
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
        loaded = gs2_set([root], options)
    elif kind == "gemma_scope_2_dirs":
        loaded = gs2_set(sorted(p for p in root.iterdir() if p.is_dir()), options)
    else:
        assert kind == "gemma_scope_2_clt"
        loaded = gs2_clt_from_folder(root, options)
    if options.n_layers is not None and loaded.n_layers != options.n_layers:
        raise TranscoderConfigError(
            f"{root}: {kind} transcoders for {loaded.n_layers} layers, but {options.n_layers} "
            f"were asked for (a layer is missing or extra: layer {loaded.n_layers} "
            f"{'is missing' if loaded.n_layers < options.n_layers else 'is one too many'})"
        )
    return loaded
