"""Options shared by several commands."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from tl_circuits.batch.trace import strongest_edges
from tl_circuits.cli.sources import (
    DEFAULT,
    ModelSource,
    SourceError,
    load_source,
    source_from_args,
)
from tl_circuits.model.loading import DTYPES


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--transcoders``, ``--sae-id-template``, ``--fold-ln``, ``--device``,
    ``--dtype``."""
    group = parser.add_argument_group("model and transcoders (default: the embedded model)")
    group.add_argument(
        "--model",
        help="TransformerLens model name (e.g. gemma-2-2b); default: the embedded default "
        "model, or the model an SAE-Lens release names",
    )
    group.add_argument(
        "--transcoders",
        help="'per_layer' or 'cross_layer' for the default model; otherwise a local "
        "directory in any supported format (SAE-Lens, TranscoderSet, our CLT, circuit-tracer, "
        "Gemma Scope 2), a Hugging Face repo id of a circuit-tracer-format repo "
        "(owner/name[//subfolder][@revision], e.g. mntss/clt-gemma-2-2b-426k) or an SAE-Lens "
        "release name (e.g. gemma-scope-2b-pt-transcoders); see docs/dictionaries.md",
    )
    group.add_argument(
        "--sae-id-template",
        help="SAE id of each layer in a release, with {layer} (e.g. 'layer_{layer}'); needed "
        "when the release has several SAEs per layer",
    )
    group.add_argument(
        "--fold-ln",
        action="store_true",
        help="load the model with LayerNorm folded (only if the transcoders were trained so; "
        "refused for the embedded default model, whose transcoders were trained unfolded)",
    )
    group.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    group.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="(default: %(default)s)"
    )


def graph_source(graph_info: dict[str, Any], args: argparse.Namespace) -> ModelSource:
    """The model source of a saved graph: ``--model``/``--transcoders`` if given, else the
    record ``trace`` stored in the graph."""
    if args.model is not None or args.transcoders is not None:
        return source_from_args(args)
    record = graph_info.get("source")
    if record is None:
        raise SourceError(
            "this graph does not say which model built it (it was not written by "
            "`tl-circuits trace`); pass --model and --transcoders"
        )
    source = ModelSource.from_json(record)
    if source.model != DEFAULT and source.transcoders is not None:
        recorded = Path(source.transcoders).expanduser()
        if recorded.is_absolute() or recorded.exists() or source.transcoders.startswith("."):
            # a graph file is data: it must not choose which local files are read
            raise SourceError(
                f"this graph records transcoders in the local folder {source.transcoders!r}; "
                "a graph file does not choose which files are read: pass --model "
                f"{source.model} --transcoders {source.transcoders} to load them"
            )
    print(f"using the model and transcoders the graph records: {source.describe()}")
    return ModelSource(**{**source.to_json(), "device": args.device, "dtype": args.dtype})


def load_graph_dir(path: Path) -> Any:
    """Load a graph folder written by ``trace`` (``OUT/graph`` or ``OUT/pruned``) or the
    ``OUT`` folder itself (its pruned graph)."""
    from tl_circuits.graph import AttributionGraph
    from tl_circuits.graph.files import saved_graph_id

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such graph (write one with `tl-circuits trace`)")
    if not (path / "pruned").is_dir():
        return AttributionGraph.load(path)
    pruned = AttributionGraph.load(path / "pruned")
    expected = pruned.info.get("full_graph_id")
    if expected is not None and (path / "graph").is_dir():
        if saved_graph_id(path / "graph") != expected:  # the header's id: no full load
            raise SourceError(
                f"{path}: graph/ and pruned/ come from different runs of `tl-circuits trace` "
                "(an interrupted run?); run trace again into this folder"
            )
    return pruned


def check_output_dir(path: Path, flag: str) -> Path:
    """Refuse, before any work, an output folder that cannot be written: ``path`` is a file,
    or it (or, if it does not exist yet, the nearest folder above it, where it would be
    created) is not a writable folder (permissions, a read-only file system)."""
    if path.exists() and not path.is_dir():
        raise SourceError(f"{flag} {path}: exists and is not a folder; choose another path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SourceError(f"{flag} {path}: cannot create it, {probe} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".tl_circuits_probe_"):
            pass
    except OSError as exc:
        where = "" if probe == path else f" (it would be created in {probe})"
        reason = exc.strerror or type(exc).__name__
        raise SourceError(f"{flag} {path}: cannot write there{where}: {reason}") from None
    return path


__all__ = [
    "add_source_options",
    "check_output_dir",
    "graph_source",
    "load_graph_dir",
    "load_source",
    "strongest_edges",
]

