"""Saving, loading and exporting attribution graphs (DESIGN.md §6).

Lossless format (:func:`save_graph` / :func:`load_graph`)
---------------------------------------------------------
Nothing is ever pickled: tensors go to safetensors, everything else to JSON. Two layouts,
chosen by the path given to :func:`save_graph`:

- **directory** (default; any path not ending in ``.safetensors``)::

      path/
        graph.json            header: format, version, targets' scalar fields,
                              token_strings, info, adjacency layout
        tensors.safetensors   every tensor (below)

- **single file** (path ends in ``.safetensors``): the same tensors, with the header JSON
  stored as the string value of the safetensors metadata key ``"tl_circuits.graph"``.

:func:`load_graph` accepts either (a directory, or a ``.safetensors`` file).

Tensors (names in the safetensors file):

- ``nodes.{kind,layer,pos,feature,activation}`` and ``excluded.{...}``: the node tables
- ``row_values``, ``constants``, ``tokens``
- ``targets.{i}.vector``: the read-out vector of target ``i``
- the adjacency, either ``adjacency`` (dense, when mostly nonzero) or, when that is
  smaller on disk, ``adjacency.index`` (int64 flat indices ``row * n + col``, ascending)
  and ``adjacency.values`` (same dtype as the adjacency). Stored entries are those whose
  bits are not +0.0 (so ``-0.0`` survives); the dense tensor is rebuilt bit for bit.
- files written before head loadings became a value of their own may also hold
  ``head_loadings.*`` tensors and a ``"head_loadings"`` header entry; both are ignored.

Tensors keep their dtypes and are loaded on the CPU. The header is Python's JSON
(``NaN`` allowed, e.g. for the probability of a non-logit target); ``info`` must be
JSON-able and round-trips as JSON does (tuples come back as lists).

The frontend JSON (Neuronpedia / circuit-tracer) is :mod:`tl_circuits.graph.frontend`'s;
head loadings are saved beside a graph by :meth:`HeadLoadings.save
<tl_circuits.attention.heads.loadings.HeadLoadings.save>`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.causal_adjacency import CausalAdjacency, row_groups
from tl_circuits.graph.nodes import NodeTable, Target
from tl_circuits.storage import read_safetensors, write_safetensors, write_text

if TYPE_CHECKING:
    from tl_circuits.graph.graph import AttributionGraph

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "check_graph", "load_graph", "save_graph"]

FORMAT_NAME = "tl_circuits.graph"
FORMAT_VERSION = 1
#: file names of the directory layout
HEADER_FILE = "graph.json"
TENSOR_FILE = "tensors.safetensors"
#: safetensors metadata key holding the header in the single-file layout
METADATA_KEY = "tl_circuits.graph"

_COLUMNS = ("kind", "layer", "pos", "feature", "activation")
_TARGET_KINDS = ("logit", "logit_diff", "direction")


def save_graph(graph: AttributionGraph, path: str | Path) -> Path:
    """Write ``graph`` losslessly (safetensors + JSON, never pickle); return the path.

    ``path`` ending in ``.safetensors`` (and not an existing directory) gives one file;
    any other path a directory holding ``graph.json`` and ``tensors.safetensors`` (created
    if needed; other files in it are left alone). ``graph.context`` is not saved.
    """
    path = Path(path)
    tensors, header = _encode(graph)
    if path.suffix == ".safetensors" and not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(tensors, path, {METADATA_KEY: _dumps_header(header)})
    else:
        if path.exists() and not path.is_dir():
            raise TLCircuitsError(
                f"cannot save a graph directory at {path}: it is a file "
                "(use a path ending in .safetensors for one file)"
            )
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(
            tensors, path / TENSOR_FILE, {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
        )
        write_text(path / HEADER_FILE, _dumps_header(header, indent=1))
    return path


def load_graph(path: str | Path) -> AttributionGraph:
    """Read a graph written by :func:`save_graph` (either layout); ``context`` is None.

    Raises ``FileNotFoundError`` for a missing path or file, and
    :class:`~tl_circuits.errors.TLCircuitsError` for anything that is not a graph of a
    supported format version.
    """
    path = Path(path)
    if path.is_dir():
        header_path, tensor_path = path / HEADER_FILE, path / TENSOR_FILE
        if not header_path.is_file():
            if not any(path.iterdir()):
                raise FileNotFoundError(f"{path} is an empty directory, not a saved graph")
            raise TLCircuitsError(
                f"{path} is not a saved tl_circuits graph: it has no {HEADER_FILE}"
            )
        try:
            header = json.loads(header_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TLCircuitsError(f"{header_path} is not valid JSON: {e}") from e
        _check_header(header, header_path)
        if not tensor_path.is_file():
            raise FileNotFoundError(f"graph directory {path} lacks {TENSOR_FILE}")
        source = tensor_path
    elif path.is_file():
        source = path
        header = None
    else:
        raise FileNotFoundError(f"no saved graph at {path}")

    tensors, metadata = read_safetensors(source)

    if header is None:
        if METADATA_KEY not in metadata:
            raise TLCircuitsError(
                f"{source} is not a saved tl_circuits graph: its "
                f"safetensors metadata has no {METADATA_KEY!r} entry"
            )
        try:
            header = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise TLCircuitsError(
                f"{source}: the {METADATA_KEY!r} metadata is not valid JSON: {e}"
            ) from e
        _check_header(header, source)
    return _decode(tensors, header, source)


# ---- encoding ----------------------------------------------------------------------------


def _encode(graph: AttributionGraph) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the JSON header of ``graph``."""
    check_graph(graph)
    tensors: dict[str, Tensor] = {}
    for prefix, table in (("nodes", graph.nodes), ("excluded", graph.excluded)):
        for col in _COLUMNS:
            tensors[f"{prefix}.{col}"] = getattr(table, col)
    tensors["row_values"] = graph.row_values
    tensors["constants"] = graph.constants
    tensors["tokens"] = graph.tokens
    for i, t in enumerate(graph.targets):
        tensors[f"targets.{i}.vector"] = t.vector
    adjacency_tensors, adjacency_header = _encode_adjacency(graph)
    tensors.update(adjacency_tensors)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "adjacency": adjacency_header,
        "targets": [_target_header(t) for t in graph.targets],
        "token_strings": [str(s) for s in graph.token_strings],
        "info": graph.info,
    }
    try:
        json.dumps(header)
    except (TypeError, ValueError) as e:
        raise TLCircuitsError(f"graph.info must be JSON-able to be saved: {e}") from e
    return tensors, header


def _encode_adjacency(graph: AttributionGraph) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The adjacency's tensors (sparse or dense, whichever is smaller) and header entry.

    Stored entries (nonzero, or -0.0) are read group by group: a full build's causal
    blocks are never made dense unless the dense layout is the smaller file."""
    n = graph.n_nodes
    indices, values = [], []
    for g in row_groups(graph.edges):
        v = g.values.detach().cpu()
        stored = (v != 0) | torch.signbit(v) if v.is_floating_point() else v != 0
        r, c = stored.nonzero(as_tuple=True)
        indices.append(g.rows.cpu()[r] * n + g.cols.cpu()[c])
        values.append(v[r, c])
    flat_index, order = torch.sort(torch.cat(indices))
    dtype = graph.row_values.dtype if not values else values[0].dtype
    if int(flat_index.numel()) * (8 + dtype.itemsize) < n * n * dtype.itemsize:
        layout = "sparse"
        tensors = {"adjacency.index": flat_index, "adjacency.values": torch.cat(values)[order]}
    else:
        layout = "dense"
        tensors = {"adjacency": graph.adjacency.detach().cpu()}
    return tensors, {"layout": layout, "shape": [n, n], "dtype": _dtype_name(dtype)}


def _target_header(t: Target) -> dict[str, Any]:
    """A target's scalar fields (its vector is a tensor)."""
    return {
        "kind": t.kind,
        "label": t.label,
        "pos": int(t.pos),
        "token": int(t.token),
        "tokens": [int(x) for x in t.tokens],
        "probability": float(t.probability),
        "weight": float(t.weight),
    }


def check_graph(graph: AttributionGraph) -> None:
    """Raise :class:`~tl_circuits.errors.TLCircuitsError` unless ``graph``'s tables, edges,
    row values and targets agree in size (what saving and exporting rely on)."""
    n = len(graph.nodes)
    for prefix, table in (("nodes", graph.nodes), ("excluded", graph.excluded)):
        m = len(table)
        for col in _COLUMNS:
            v = getattr(table, col)
            if not isinstance(v, Tensor) or v.ndim != 1 or v.shape[0] != m:
                raise TLCircuitsError(
                    f"graph.{prefix}.{col} must be a 1-d tensor of length "
                    f"{m}, got {getattr(v, 'shape', type(v))}"
                )
    edges = graph.edges
    shape = (edges.n_nodes,) * 2 if isinstance(edges, CausalAdjacency) else tuple(edges.shape)
    if shape != (n, n):
        raise TLCircuitsError(
            f"graph.adjacency must be [{n}, {n}] (one row and column per node), got {shape}"
        )
    for name in ("row_values", "constants"):
        v = getattr(graph, name)
        if tuple(v.shape) != (n,):
            raise TLCircuitsError(f"graph.{name} must have shape [{n}], got {tuple(v.shape)}")
    n_targets = graph.nodes.count("target")
    if n_targets != len(graph.targets):
        raise TLCircuitsError(
            f"graph has {n_targets} target nodes but {len(graph.targets)} Target objects"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dumps_header(header: dict[str, Any], indent: int | None = None) -> str:
    return json.dumps(header, indent=indent, ensure_ascii=True)


# ---- decoding ----------------------------------------------------------------------------


def _check_header(header: Any, source: Path) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise TLCircuitsError(
            f"{source} is not a saved tl_circuits graph: format is "
            f"{found!r}, expected {FORMAT_NAME!r}"
        )
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise TLCircuitsError(
            f"{source}: unsupported {FORMAT_NAME} version {version!r} "
            f"(this tl_circuits reads version {FORMAT_VERSION})"
        )


def _decode(tensors: dict[str, Tensor], header: dict[str, Any], source: Path) -> AttributionGraph:
    """The graph held by ``tensors`` and ``header`` (read from ``source``)."""
    from tl_circuits.graph.graph import AttributionGraph

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise TLCircuitsError(f"{source}: saved graph lacks the tensor {name!r}")
        return tensors[name]

    try:
        adjacency_meta = header["adjacency"]
        target_meta = header["targets"]
        token_strings = header["token_strings"]
        info = header["info"]
    except (KeyError, TypeError) as e:
        raise TLCircuitsError(f"{source}: graph header lacks the field {e}") from e
    nodes = NodeTable(*(get(f"nodes.{c}") for c in _COLUMNS))
    targets = _decode_targets(target_meta, get, source)
    if nodes.count("target") != len(targets):
        raise TLCircuitsError(
            f"{source}: {nodes.count('target')} target nodes but {len(targets)} targets"
        )
    return AttributionGraph(
        nodes=nodes,
        edges=_decode_adjacency(adjacency_meta, get, len(nodes), source),
        row_values=get("row_values"),
        constants=get("constants"),
        targets=targets,
        tokens=get("tokens"),
        token_strings=list(token_strings),
        excluded=NodeTable(*(get(f"excluded.{c}") for c in _COLUMNS)),
        info=info,
        context=None,
    )


def _decode_adjacency(meta: Any, get: Callable[[str], Tensor], n: int, source: Path) -> Tensor:
    """The dense ``[n, n]`` adjacency from its header entry and tensors."""
    try:
        layout, shape = meta["layout"], meta["shape"]
    except (KeyError, TypeError) as e:
        raise TLCircuitsError(f"{source}: graph header lacks the field {e}") from e
    if list(shape) != [n, n]:
        raise TLCircuitsError(f"{source}: adjacency shape {shape} does not match {n} nodes")
    if layout == "dense":
        adjacency = get("adjacency")
        if tuple(adjacency.shape) != (n, n):
            raise TLCircuitsError(
                f"{source}: adjacency has shape {tuple(adjacency.shape)}, expected {(n, n)}"
            )
        return adjacency
    if layout != "sparse":
        raise TLCircuitsError(f"{source}: unknown adjacency layout {layout!r}")
    index, values = get("adjacency.index"), get("adjacency.values")
    if (
        index.ndim != 1
        or values.shape != index.shape
        or index.dtype != torch.int64
        or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= n * n))
    ):
        raise TLCircuitsError(
            f"{source}: malformed sparse adjacency "
            f"(index {tuple(index.shape)}, values {tuple(values.shape)})"
        )
    adjacency = torch.zeros(n * n, dtype=values.dtype)
    adjacency[index] = values
    return adjacency.reshape(n, n)


def _decode_targets(meta: Any, get: Callable[[str], Tensor], source: Path) -> list[Target]:
    """The targets from their header entries and vectors."""
    targets = []
    for i, t in enumerate(meta):
        if t.get("kind") not in _TARGET_KINDS:
            raise TLCircuitsError(f"{source}: target {i} has unknown kind {t.get('kind')!r}")
        targets.append(
            Target(
                kind=t["kind"],
                label=t["label"],
                pos=int(t["pos"]),
                vector=get(f"targets.{i}.vector"),
                token=int(t["token"]),
                tokens=tuple(int(x) for x in t["tokens"]),
                probability=float(t["probability"]),
                weight=float(t["weight"]),
            )
        )
    return targets
