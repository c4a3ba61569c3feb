"""Saving, loading and exporting attribution graphs (DESIGN.md §6).

Lossless format (:func:`save_graph` / :func:`load_graph`), version 2
-------------------------------------------------------------------
Nothing is ever pickled: tensors go to safetensors, everything else to JSON. Two layouts,
chosen by the path given to :func:`save_graph`:

- **directory** (default; any path not ending in ``.safetensors``)::

      path/
        graph.json                     header (below), written last
        tensors.<id[:32]>.safetensors  every tensor; metadata: format, version, graph_id
        (other files, e.g. head_loadings.safetensors, are left alone)

  The tensor file is content-addressed (named by the graph's id). A save writes it first
  (atomically: a temporary file renamed into place), then replaces ``graph.json``
  (atomically), then removes tensor files no header names and temporary files left by an
  interrupted save. A save killed at any point therefore leaves either the old graph or
  the new one, each complete: ``graph.json`` only ever names a tensor file that was fully
  written before it.
- **single file** (path ends in ``.safetensors``): the same tensors, with the header JSON
  stored as the string value of the safetensors metadata key ``"tl_circuits.graph"``, its
  sha256 under ``"tl_circuits.graph.sha256"`` and the id under ``"graph_id"`` (written
  atomically as a whole).

:func:`load_graph` accepts either (a directory, or a ``.safetensors`` file).

Header (JSON object): ``format`` (``"tl_circuits.graph"``), ``version`` (2), ``adjacency``
(``edges``, ``layout``, ``shape``, ``dtype``), ``targets`` (scalar fields of each target:
``kind``, ``label``, ``pos``, ``token``, ``tokens``, ``probability``, ``weight``, ``bias``),
``token_strings``, ``info``, and the seal: ``tensors_digest`` (sha256 over every tensor's
name, dtype, shape and bytes, in name order), ``id`` (sha256 of ``tensors_digest`` and the
header without its seal fields: the graph's content id, the same for the same graph) and,
in the directory layout, ``tensor_file`` and ``tensors_sha256`` (the sha256 of the tensor
file's bytes). Loading checks all of them: the tensor file's bytes against
``tensors_sha256`` (one flipped bit is caught), its ``graph_id`` metadata against ``id``
(the two files belong together), the header against ``id`` (single file: the tensors
against ``tensors_digest``). :func:`graph_id` gives the id of a graph in memory;
:meth:`HeadLoadings.save <tl_circuits.attention.heads.loadings.HeadLoadings.save>` records
it and ``HeadLoadings.load(..., graph=...)`` refuses loadings of another graph.

Tensors (names in the safetensors file):

- ``nodes.{kind,layer,pos,feature,activation}`` and ``excluded.{...}``: the node tables
- ``row_values``, ``constants``, ``tokens``
- ``targets.{i}.vector``: the read-out vector of target ``i``
- the edges. ``adjacency.edges`` says what the loaded graph's ``edges`` are:

  - ``"causal"``: a :class:`~tl_circuits.graph.causal_adjacency.CausalAdjacency` over
    ``causal_groups(kind, layer, pos)`` of the nodes (a full build). Layout ``"blocks"``:
    ``edges.block.{g}``, the dense ``[rows, cols]`` block of group ``g``; or ``"sparse"``;
  - ``"dense"``: a dense ``[n, n]`` tensor (hand-made and pruned graphs). Layout
    ``"dense"``: ``adjacency``; or ``"sparse"``.

  ``"sparse"``: ``adjacency.index`` (int64 flat indices ``row * n + col``, strictly
  ascending) and ``adjacency.values``. Stored entries are those whose bits are not +0.0
  (so ``-0.0`` survives); every layout is rebuilt bit for bit. The smaller layout is
  written.

Loading never builds more than the stored layout: a causal graph comes back as blocks (the
dense view is built on first use of ``graph.adjacency``), and any allocation larger than
the file (blocks or a dense matrix filled from sparse entries) is checked against
``max_memory_bytes`` (default: half the available host memory) first. Sparse entries
outside the causal sets of a causal graph (edges that cannot exist) are refused.

Loading checks meaning as well as structure (the same checks :func:`save_graph` runs):
tensor dtypes and lengths, node kinds in range, feature and error layers in
``[0, n_layers)``, token layer -1, target layer ``n_layers`` (``info["n_layers"]``, else the
targets' layer), positions in ``[0, n_pos)`` with ``n_pos = len(tokens) =
len(token_strings)``, token ids in ``[0, d_vocab)`` when ``info["d_vocab"]`` is known,
targets' positions and finite vectors of length ``info["d_model"]`` (when known), finite
activations, row values, constants and edges, typed header fields, ``info`` a dict. Every failure
raises :class:`~tl_circuits.errors.TLCircuitsError` naming the file and the problem
(``FileNotFoundError`` for a missing path).

**Version 1** (still read): the directory layout's tensor file is ``tensors.safetensors``,
the header has no seal, no ``adjacency.edges`` and no target ``bias``. A sparse version-1
adjacency is loaded as causal blocks when its entries fit them, else densified (within the
memory check); every meaning check above applies.

Tensors keep their dtypes and are loaded on the CPU. The header is Python's JSON
(``NaN`` allowed, e.g. for the probability of a non-logit target); ``info`` must be
JSON-able and round-trips as JSON does (tuples come back as lists).

The frontend JSON (Neuronpedia / circuit-tracer) is :mod:`tl_circuits.graph.frontend`'s;
head loadings are saved beside a graph by :meth:`HeadLoadings.save
<tl_circuits.attention.heads.loadings.HeadLoadings.save>`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.causal_adjacency import (
    CausalAdjacency,
    RowGroup,
    causal_group_sizes,
    causal_groups,
    row_groups,
)
from tl_circuits.graph.nodes import ERROR, FEATURE, KINDS, TARGET, TOKEN, NodeTable, Target
from tl_circuits.storage import (
    read_safetensors,
    remove_dead_temporaries,
    sha256_file,
    write_safetensors,
    write_text,
)

if TYPE_CHECKING:
    from tl_circuits.graph.graph import AttributionGraph

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "check_graph",
    "check_graph_contents",
    "graph_id",
    "load_graph",
    "save_graph",
    "saved_graph_id",
    "tensor_path",
]

FORMAT_NAME = "tl_circuits.graph"
FORMAT_VERSION = 2
#: versions :func:`load_graph` reads
READ_VERSIONS = (1, 2)
#: file names of the directory layout
HEADER_FILE = "graph.json"
#: version 1's tensor file (version 2: ``tensors.<id[:32]>.safetensors``, :func:`tensor_path`)
TENSOR_FILE = "tensors.safetensors"
_TENSOR_FILE_RE = re.compile(r"tensors\.[0-9a-f]{32}\.safetensors")
#: safetensors metadata key holding the header in the single-file layout
METADATA_KEY = "tl_circuits.graph"
#: single-file layout, version 2: the sha256 of that header text (every byte of it counts)
HEADER_SHA_KEY = "tl_circuits.graph.sha256"
#: header fields outside the content id
_SEAL = ("format", "version", "id", "tensors_digest", "tensor_file", "tensors_sha256")
_HEX64 = re.compile(r"[0-9a-f]{64}")

_COLUMNS = ("kind", "layer", "pos", "feature", "activation")
_TARGET_KINDS = ("logit", "logit_diff", "direction")


# ---- saving ------------------------------------------------------------------------------


def save_graph(graph: AttributionGraph, path: str | Path) -> Path:
    """Write ``graph`` losslessly (safetensors + JSON, never pickle); return the path.

    ``path`` ending in ``.safetensors`` (and not an existing directory) gives one file;
    any other path a directory holding ``graph.json`` and the tensor file (created if
    needed; other files in it are left alone). The write is all or nothing (module doc).
    ``graph.context`` is not saved.
    """
    path = Path(path)
    tensors, header = _encode(graph)
    if path.suffix == ".safetensors" and not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_single(path, tensors, header)
    else:
        if path.exists() and not path.is_dir():
            raise TLCircuitsError(
                f"cannot save a graph directory at {path}: it is a file "
                "(use a path ending in .safetensors for one file)"
            )
        path.mkdir(parents=True, exist_ok=True)
        _write_directory(path, tensors, header)
    return path


def graph_id(graph: AttributionGraph) -> str:
    """The content id :func:`save_graph` records for ``graph`` (hex sha256; equal graphs,
    equal ids)."""
    tensors, header = _encode(graph)
    return _content_id(header, _tensor_digest(tensors))


def saved_graph_id(path: str | Path) -> str | None:
    """The id recorded in the graph folder or file ``path`` (None for version 1 files or
    when ``path`` holds no readable graph header). Not a check of the graph: that is
    :func:`load_graph`'s."""
    path = Path(path)
    try:
        if path.is_dir():
            header = json.loads((path / HEADER_FILE).read_text(encoding="utf-8"))
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = json.loads((f.metadata() or {})[METADATA_KEY])
    except Exception:
        return None
    found = header.get("id") if isinstance(header, dict) else None
    return found if isinstance(found, str) and _HEX64.fullmatch(found) else None


def tensor_path(path: str | Path) -> Path:
    """The tensor file of the graph folder ``path`` (the one its header names)."""
    path = Path(path)
    header = _read_header_file(path / HEADER_FILE)
    if header.get("version") == 1:
        return path / TENSOR_FILE
    name = header.get("tensor_file")
    if not isinstance(name, str) or not _TENSOR_FILE_RE.fullmatch(name):
        raise TLCircuitsError(f"{path / HEADER_FILE}: bad tensor_file {name!r}")
    return path / name


def _canonical(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


def _content_id(header: dict[str, Any], digest: str) -> str:
    body = {k: v for k, v in header.items() if k not in _SEAL}
    text = f"{FORMAT_NAME}/{FORMAT_VERSION}\n{digest}\n{_canonical(body)}"
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _tensor_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(_canonical([name, _dtype_name(t.dtype), list(t.shape)]).encode() + b"\n")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _write_single(path: Path, tensors: dict[str, Tensor], header: dict[str, Any]) -> None:
    digest = _tensor_digest(tensors)
    gid = _content_id(header, digest)
    header = {**_base(header), "id": gid, "tensors_digest": digest}
    text = _dumps_header(header)
    metadata = {
        METADATA_KEY: text,
        HEADER_SHA_KEY: hashlib.sha256(text.encode("ascii")).hexdigest(),
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "graph_id": gid,
    }
    write_safetensors(
        tensors, path, metadata
    )  # also removes its dead writers' temporaries


def _write_directory(path: Path, tensors: dict[str, Tensor], header: dict[str, Any]) -> None:
    """Tensor file first, header last, then remove what no header names (module doc)."""
    digest = _tensor_digest(tensors)
    gid = _content_id(header, digest)
    name = f"tensors.{gid[:32]}.safetensors"
    old = _named_tensor_file(path)
    try:
        meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "graph_id": gid}
        write_safetensors(tensors, path / name, meta)
        sealed = {
            **_base(header),
            "id": gid,
            "tensors_digest": digest,
            "tensor_file": name,
            "tensors_sha256": sha256_file(path / name),
        }
        write_text(path / HEADER_FILE, _dumps_header(sealed, indent=1))
    except BaseException:
        if name != old:
            (path / name).unlink(missing_ok=True)
        raise
    _clean_folder(path, keep=name)


def _base(header: dict[str, Any]) -> dict[str, Any]:
    """``format`` and ``version`` first, then the header's content."""
    body = {k: v for k, v in header.items() if k not in _SEAL}
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **body}


def _named_tensor_file(path: Path) -> str | None:
    try:
        return tensor_path(path).name
    except Exception:
        return None


def _clean_folder(path: Path, keep: str) -> None:
    """Remove tensor files other than ``keep`` and the temporary files of saves that were
    killed (those of running writers stay)."""
    for entry in path.iterdir():
        name = entry.name
        stale = name == TENSOR_FILE or (_TENSOR_FILE_RE.fullmatch(name) and name != keep)
        if stale and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
    remove_dead_temporaries(path, lambda name: name == HEADER_FILE or _is_tensor_name(name))


def _is_tensor_name(name: str) -> bool:
    """A tensor file's name, possibly cut short in a temporary file's name."""
    return name == TENSOR_FILE or name.startswith("tensors.")


# ---- encoding ----------------------------------------------------------------------------


def _encode(graph: AttributionGraph) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the (unsealed) JSON header of ``graph``."""
    check_graph(graph)
    check_graph_contents(graph)
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
    except (TypeError, ValueError, RecursionError) as e:
        raise TLCircuitsError(f"graph.info must be JSON-able to be saved: {e}") from e
    return {k: v.detach().cpu() for k, v in tensors.items()}, header


def _is_causal(edges: CausalAdjacency, nodes: NodeTable) -> bool:
    """Whether ``edges``' groups are exactly ``causal_groups`` of ``nodes``."""
    expected = causal_groups(nodes.kind.cpu(), nodes.layer.cpu(), nodes.pos.cpu())
    return len(expected) == len(edges.groups) and all(
        torch.equal(r, g.rows.cpu()) and torch.equal(c, g.cols.cpu())
        for (r, c), g in zip(expected, edges.groups, strict=True)
    )


def _encode_adjacency(graph: AttributionGraph) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The edges' tensors (the smallest layout of their kind) and header entry.

    Stored entries (nonzero, or -0.0) are read group by group: a full build's causal
    blocks are never made dense."""
    n = graph.n_nodes
    causal = isinstance(graph.edges, CausalAdjacency) and _is_causal(graph.edges, graph.nodes)
    groups = row_groups(graph.edges)

    def stored(v: Tensor) -> Tensor:
        return (v != 0) | torch.signbit(v) if v.is_floating_point() else v != 0

    _check_finite_edges(groups, "graph")
    dtype = groups[0].values.dtype if groups else graph.row_values.dtype
    n_stored = sum(int(stored(g.values).sum()) for g in groups)  # counted first: no copies
    sparse_bytes = n_stored * (8 + dtype.itemsize)
    if causal:
        full_bytes = sum(g.values.numel() for g in groups) * dtype.itemsize
    else:
        full_bytes = n * n * dtype.itemsize
    if sparse_bytes < full_bytes:
        layout = "sparse"
        indices, values = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=dtype)]
        for g in groups:
            v = g.values.detach().cpu()
            r, c = stored(v).nonzero(as_tuple=True)
            indices.append(g.rows.cpu()[r] * n + g.cols.cpu()[c])
            values.append(v[r, c])
        flat_index, order = torch.sort(torch.cat(indices))
        tensors = {"adjacency.index": flat_index, "adjacency.values": torch.cat(values)[order]}
    elif causal:
        layout = "blocks"
        tensors = {f"edges.block.{i}": g.values.detach().cpu() for i, g in enumerate(groups)}
    else:
        layout = "dense"
        tensors = {"adjacency": graph.adjacency.detach().cpu()}
    meta = {
        "edges": "causal" if causal else "dense",
        "layout": layout,
        "shape": [n, n],
        "dtype": _dtype_name(dtype),
    }
    return tensors, meta


def _check_finite_edges(groups: list[RowGroup], where: str) -> None:
    for g in groups:
        bad = ~torch.isfinite(g.values)
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise TLCircuitsError(
                f"{where}: edges must be finite, got {float(g.values[r, c])!r} at "
                f"adjacency[{int(g.rows[r])}, {int(g.cols[c])}]"
            )


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
        "bias": float(t.bias),
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


def _info_int(info: dict[str, Any], key: str, where: str) -> int | None:
    if key not in info or info[key] is None:
        return None
    v = info[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise TLCircuitsError(f"{where}: info[{key!r}] must be a positive integer, got {v!r}")
    return v


def check_graph_contents(graph: AttributionGraph, where: str = "graph") -> None:
    """Raise :class:`~tl_circuits.errors.TLCircuitsError` (message starting with
    ``where``) unless ``graph`` means something: node kinds, layers and positions in range,
    token ids in the vocabulary, targets' positions and vectors, finite values (module doc).
    :func:`save_graph` and :func:`load_graph` both run it (after :func:`check_graph`)."""
    if not isinstance(graph.info, dict):
        raise TLCircuitsError(f"{where}: info must be a dict, got {type(graph.info).__name__}")
    info = graph.info
    n_layers = _info_int(info, "n_layers", where)
    d_model = _info_int(info, "d_model", where)
    d_vocab = _info_int(info, "d_vocab", where)
    tokens = graph.tokens
    if not isinstance(tokens, Tensor) or tokens.ndim != 1 or _is_float(tokens):
        raise TLCircuitsError(f"{where}: tokens must be a 1-d integer tensor")
    n_pos = len(tokens)
    strings = graph.token_strings
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise TLCircuitsError(f"{where}: token_strings must be a list of strings")
    if len(strings) != n_pos:
        raise TLCircuitsError(
            f"{where}: {len(strings)} token_strings for {n_pos} tokens (one per position)"
        )
    if n_pos and (int(tokens.min()) < 0 or (d_vocab is not None and int(tokens.max()) >= d_vocab)):
        raise TLCircuitsError(
            f"{where}: token ids must lie in [0, {d_vocab if d_vocab else 'd_vocab'}), "
            f"got {int(tokens.min())}..{int(tokens.max())}"
        )
    target_layers = graph.nodes.layer[graph.nodes.kind == TARGET]
    if n_layers is None and len(target_layers):
        n_layers = int(target_layers[0])
    for prefix, table in (("nodes", graph.nodes), ("excluded", graph.excluded)):
        _check_table(table, f"{where}: {prefix}", n_layers, n_pos)
    for name in ("row_values", "constants"):
        v = getattr(graph, name)
        if not _is_float(v):
            raise TLCircuitsError(f"{where}: {name} must be a float tensor, got {v.dtype}")
        _finite(v, f"{where}: {name}")
    for i, t in enumerate(graph.targets):
        _check_target(t, f"{where}: target {i}", n_pos, d_model, d_vocab)
    if d_model is None and graph.targets:
        lengths = {int(t.vector.shape[0]) for t in graph.targets}
        if len(lengths) > 1:
            raise TLCircuitsError(f"{where}: target vectors differ in length {sorted(lengths)}")


def _is_float(t: Tensor) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _finite(v: Tensor, what: str) -> None:
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0]) if bad.ndim else 0
        raise TLCircuitsError(f"{what} must be finite, got {float(v.reshape(-1)[i])!r} at {i}")


def _check_table(table: NodeTable, what: str, n_layers: int | None, n_pos: int) -> None:
    kind, layer, pos, feature = table.kind, table.layer, table.pos, table.feature
    for col in ("kind", "layer", "pos", "feature"):
        if _is_float(getattr(table, col)) or getattr(table, col).dtype == torch.bool:
            raise TLCircuitsError(f"{what}.{col} must be an integer tensor")
    if not _is_float(table.activation):
        raise TLCircuitsError(f"{what}.activation must be a float tensor")
    if not len(table):
        return
    if int(kind.min()) < 0 or int(kind.max()) >= len(KINDS):
        raise TLCircuitsError(f"{what}.kind must lie in [0, {len(KINDS)}) ({', '.join(KINDS)})")
    if int(pos.min()) < 0 or int(pos.max()) >= n_pos:
        i = int(((pos < 0) | (pos >= n_pos)).nonzero()[0, 0])
        raise TLCircuitsError(
            f"{what}.pos[{i}] = {int(pos[i])} is outside the prompt's positions [0, {n_pos})"
        )
    layered = (kind == FEATURE) | (kind == ERROR)
    top = n_layers if n_layers is not None else None
    bad = layered & ((layer < 0) | (layer >= top if top is not None else False))
    bad |= (kind == TOKEN) & (layer != -1)
    if top is not None:
        bad |= (kind == TARGET) & (layer != top)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        k = KINDS[int(kind[i])]
        expected = {"token": "-1", "target": f"n_layers = {top}"}.get(k, f"in [0, {top})")
        raise TLCircuitsError(
            f"{what}.layer[{i}] = {int(layer[i])} for {'an' if k == 'error' else 'a'} {k} "
            f"node (expected {expected})"
        )
    if bool(((kind == FEATURE) & (feature < 0)).any()):
        raise TLCircuitsError(f"{what}.feature must be >= 0 for feature nodes")
    _finite(table.activation, f"{what}.activation")


def _check_target(t: Target, what: str, n_pos: int, d_model: int | None, d_vocab: int | None):
    if t.kind not in _TARGET_KINDS:
        raise TLCircuitsError(f"{what} has unknown kind {t.kind!r} (one of {_TARGET_KINDS})")
    if not 0 <= t.pos < n_pos:
        raise TLCircuitsError(f"{what}: pos {t.pos} outside the prompt's positions [0, {n_pos})")
    v = t.vector
    if not _is_float(v) or v.ndim != 1:
        raise TLCircuitsError(f"{what}: vector must be a 1-d float tensor")
    if d_model is not None and v.shape[0] != d_model:
        raise TLCircuitsError(f"{what}: vector has length {v.shape[0]}, d_model is {d_model}")
    _finite(v, f"{what}: vector")
    if not math.isfinite(t.weight) or not math.isfinite(t.bias):
        raise TLCircuitsError(f"{what}: weight and bias must be finite")
    ids = ([t.token] if t.kind == "logit" else []) + list(t.tokens)
    if d_vocab is not None and any(not 0 <= x < d_vocab for x in ids):
        raise TLCircuitsError(f"{what}: token ids {ids} outside [0, {d_vocab})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dumps_header(header: dict[str, Any], indent: int | None = None) -> str:
    return json.dumps(header, indent=indent, ensure_ascii=True)


# ---- loading -----------------------------------------------------------------------------


def load_graph(path: str | Path, *, max_memory_bytes: int | None = None) -> AttributionGraph:
    """Read a graph written by :func:`save_graph` (either layout, version 1 or 2);
    ``context`` is None.

    ``max_memory_bytes`` bounds what loading allocates beyond the tensors in the file
    (causal blocks or a dense matrix filled from sparse entries; default: half the
    available host memory); a file claiming more is refused before anything is allocated.
    Raises ``FileNotFoundError`` for a missing path, and
    :class:`~tl_circuits.errors.TLCircuitsError` naming the file and the problem for
    anything that is not a complete, intact, meaningful graph (module doc).
    """
    if max_memory_bytes is not None and (
        isinstance(max_memory_bytes, bool)
        or not isinstance(max_memory_bytes, int)
        or max_memory_bytes <= 0
    ):
        raise TLCircuitsError(
            f"max_memory_bytes must be a positive integer, got {max_memory_bytes!r}"
        )
    path = Path(path)
    if path.is_dir():
        header_path = path / HEADER_FILE
        if not header_path.is_file():
            if not any(path.iterdir()):
                raise FileNotFoundError(f"{path} is an empty directory, not a saved graph")
            raise TLCircuitsError(
                f"{path} is not a saved tl_circuits graph: it has no {HEADER_FILE}"
            )
        header = _read_header_file(header_path)
        _check_header(header, header_path)
        if header["version"] == 1:
            source = path / TENSOR_FILE
            if not source.is_file():
                raise TLCircuitsError(f"graph directory {path} lacks {TENSOR_FILE}")
            tensors, _ = read_safetensors(source)
        else:
            _check_seal(header, header_path, directory=True)
            source = path / header["tensor_file"]
            if not source.is_file():
                raise TLCircuitsError(
                    f"{header_path} names the tensor file {source.name}, which is missing: "
                    "the graph folder is incomplete"
                )
            if sha256_file(source) != header["tensors_sha256"]:
                raise TLCircuitsError(
                    f"{source} is corrupted: its sha256 differs from the one {HEADER_FILE} records"
                )
            tensors, metadata = read_safetensors(source)
            if metadata.get("graph_id") != header["id"]:
                raise TLCircuitsError(
                    f"{source} and {header_path} do not belong together (graph ids "
                    f"{metadata.get('graph_id')!r} and {header['id']!r})"
                )
            _check_content_id(header, header["tensors_digest"], header_path)
    elif path.is_file():
        source = path
        tensors, metadata = read_safetensors(source)
        if METADATA_KEY not in metadata:
            raise TLCircuitsError(
                f"{source} is not a saved tl_circuits graph: its "
                f"safetensors metadata has no {METADATA_KEY!r} entry"
            )
        text = metadata[METADATA_KEY]
        header = _parse_header(text, f"{source}: the {METADATA_KEY!r} metadata")
        _check_header(header, source)
        if header["version"] == 2:
            expected = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
            if set(metadata) != {METADATA_KEY, HEADER_SHA_KEY, "graph_id", *expected} or any(
                metadata[k] != v for k, v in expected.items()
            ):
                raise TLCircuitsError(
                    f"{source} is corrupted: its safetensors metadata has keys "
                    f"{sorted(metadata)[:8]} (format {metadata.get('format')!r}, version "
                    f"{metadata.get('version')!r})"
                )
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            if metadata.get(HEADER_SHA_KEY) != digest:
                raise TLCircuitsError(
                    f"{source} is corrupted: its header differs from the sha256 recorded "
                    f"beside it ({HEADER_SHA_KEY!r})"
                )
            _check_seal(header, source, directory=False)
            if metadata.get("graph_id") != header["id"]:
                raise TLCircuitsError(
                    f"{source}: metadata graph_id {metadata.get('graph_id')!r} differs from "
                    f"the header's id {header['id']!r}"
                )
            if _tensor_digest(tensors) != header["tensors_digest"]:
                raise TLCircuitsError(
                    f"{source} is corrupted: its tensors differ from the digest its header records"
                )
            _check_content_id(header, header["tensors_digest"], source)
    else:
        raise FileNotFoundError(f"no saved graph at {path}")
    if max_memory_bytes is None:
        from tl_circuits.model.devices import available_memory_bytes

        max_memory_bytes = available_memory_bytes("cpu") // 2
    return _decode(tensors, header, source, max_memory_bytes)


def _parse_header(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise TLCircuitsError(f"{what} is not valid JSON: {type(e).__name__}: {e}") from e


def _read_header_file(header_path: Path) -> Any:
    try:
        text = header_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TLCircuitsError(f"{header_path} is not valid JSON (not UTF-8): {e}") from e
    return _parse_header(text, str(header_path))


def _check_header(header: Any, source: Path) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise TLCircuitsError(
            f"{source} is not a saved tl_circuits graph: format is "
            f"{found!r}, expected {FORMAT_NAME!r}"
        )
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READ_VERSIONS:
        raise TLCircuitsError(
            f"{source}: unsupported {FORMAT_NAME} version {version!r} "
            f"(this tl_circuits reads versions {', '.join(map(str, READ_VERSIONS))})"
        )


def _check_seal(header: dict[str, Any], source: Path, directory: bool) -> None:
    fields = ("id", "tensors_digest") + (("tensors_sha256",) if directory else ())
    for key in fields:
        v = header.get(key)
        if not isinstance(v, str) or not _HEX64.fullmatch(v):
            raise TLCircuitsError(
                f"{source}: header field {key!r} must be a sha256 hex string, got {v!r}"
            )
    if directory:
        expected = f"tensors.{header['id'][:32]}.safetensors"
        if header.get("tensor_file") != expected:
            raise TLCircuitsError(
                f"{source}: header field 'tensor_file' is {header.get('tensor_file')!r}, "
                f"expected {expected!r} (named by the graph id)"
            )


def _check_content_id(header: dict[str, Any], digest: str, source: Path) -> None:
    try:
        found = _content_id(header, digest)
    except (TypeError, ValueError, RecursionError) as e:
        raise TLCircuitsError(f"{source}: header cannot be checked: {e}") from e
    if found != header["id"]:
        raise TLCircuitsError(
            f"{source} was modified or corrupted: its content does not match its id {header['id']}"
        )


class _Where:
    """The header field or tensor being decoded (for errors the checks did not foresee)."""

    field = "header"


def _decode(
    tensors: dict[str, Tensor], header: dict[str, Any], source: Path, limit: int
) -> AttributionGraph:
    where = _Where()
    try:
        return _decode_checked(tensors, header, source, limit, where)
    except TLCircuitsError:
        raise
    except (
        TypeError,
        KeyError,
        ValueError,
        OverflowError,
        RecursionError,
        IndexError,
        AttributeError,
        RuntimeError,
    ) as e:
        raise TLCircuitsError(
            f"{source}: malformed saved graph at {where.field}: {type(e).__name__}: {e}"
        ) from e


def _decode_checked(
    tensors: dict[str, Tensor], header: dict[str, Any], source: Path, limit: int, where: _Where
) -> AttributionGraph:
    """The graph held by ``tensors`` and ``header`` (read from ``source``), checked."""
    from tl_circuits.graph.graph import AttributionGraph

    def get(name: str) -> Tensor:
        where.field = f"tensor {name!r}"
        if name not in tensors:
            raise TLCircuitsError(f"{source}: saved graph lacks the tensor {name!r}")
        return tensors[name]

    for key in ("adjacency", "targets", "token_strings", "info"):
        if key not in header:
            raise TLCircuitsError(f"{source}: graph header lacks the field {key!r}")
    where.field = "info"
    info = header["info"]
    if not isinstance(info, dict):
        raise TLCircuitsError(
            f"{source}: header field 'info' must be a JSON object, got {type(info).__name__}"
        )
    where.field = "token_strings"
    token_strings = header["token_strings"]
    if not isinstance(token_strings, list) or not all(isinstance(s, str) for s in token_strings):
        raise TLCircuitsError(f"{source}: header field 'token_strings' must be a list of strings")
    nodes = _decode_table(get, "nodes", source)
    excluded = _decode_table(get, "excluded", source)
    targets = _decode_targets(header["targets"], get, source, header["version"], where)
    n = len(nodes)
    graph = AttributionGraph(
        nodes=nodes,
        edges=CausalAdjacency(n, []),  # placeholder until the checks pass
        row_values=get("row_values"),
        constants=get("constants"),
        targets=targets,
        tokens=get("tokens"),
        token_strings=list(token_strings),
        excluded=excluded,
        info=info,
        context=None,
    )
    where.field = "node tables and targets"
    try:
        check_graph(graph)
    except TLCircuitsError as e:
        raise TLCircuitsError(f"{source}: {e}") from e
    check_graph_contents(graph, str(source))
    where.field = "adjacency"
    graph.edges = _decode_adjacency(header["adjacency"], get, nodes, source, limit, header)
    _check_finite_edges(row_groups(graph.edges), str(source))
    return graph


def _decode_table(get: Callable[[str], Tensor], prefix: str, source: Path) -> NodeTable:
    columns = [get(f"{prefix}.{c}") for c in _COLUMNS]
    lengths = {c: tuple(v.shape) for c, v in zip(_COLUMNS, columns, strict=True)}
    if any(len(s) != 1 for s in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
        raise TLCircuitsError(
            f"{source}: the {prefix} columns must be 1-d tensors of one length, got shapes "
            + ", ".join(f"{c} {list(s)}" for c, s in lengths.items())
        )
    for c, v in zip(_COLUMNS, columns, strict=True):
        is_float = v.is_floating_point()
        if (c == "activation") != is_float or v.dtype == torch.bool or v.is_complex():
            expected = "a float" if c == "activation" else "an integer"
            raise TLCircuitsError(
                f"{source}: {prefix}.{c} must be {expected} tensor, got {v.dtype}"
            )
    return NodeTable(*columns)


def _field(d: dict[str, Any], key: str, kind: str, what: str, default: Any = ...) -> Any:
    """``d[key]`` checked to be of ``kind`` ("int", "float", "str", "ints")."""
    if key not in d:
        if default is not ...:
            return default
        raise TLCircuitsError(f"{what} lacks the field {key!r}")
    v = d[key]
    ok = {
        "int": lambda x: isinstance(x, int) and not isinstance(x, bool) and abs(x) < 2**62,
        "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
        "str": lambda x: isinstance(x, str),
        "ints": lambda x: (
            isinstance(x, list)
            and all(isinstance(y, int) and not isinstance(y, bool) and abs(y) < 2**62 for y in x)
        ),
    }[kind](v)
    if not ok:
        raise TLCircuitsError(f"{what}: field {key!r} has the wrong type or range: {v!r}"[:300])
    if kind == "float":
        try:
            return float(v)
        except OverflowError as e:
            raise TLCircuitsError(f"{what}: field {key!r} is out of range") from e
    return v


def _decode_targets(
    meta: Any, get: Callable[[str], Tensor], source: Path, version: int, where: _Where
) -> list[Target]:
    """The targets from their header entries and vectors."""
    if not isinstance(meta, list):
        raise TLCircuitsError(f"{source}: header field 'targets' must be a list")
    targets = []
    for i, t in enumerate(meta):
        what = f"{source}: target {i}"
        where.field = f"targets[{i}]"
        if not isinstance(t, dict):
            raise TLCircuitsError(f"{what} must be a JSON object, got {type(t).__name__}")
        if t.get("kind") not in _TARGET_KINDS:
            raise TLCircuitsError(f"{what} has unknown kind {t.get('kind')!r}")
        targets.append(
            Target(
                kind=t["kind"],
                label=_field(t, "label", "str", what),
                pos=_field(t, "pos", "int", what),
                vector=get(f"targets.{i}.vector"),
                token=_field(t, "token", "int", what),
                tokens=tuple(_field(t, "tokens", "ints", what)),
                probability=_field(t, "probability", "float", what),
                weight=_field(t, "weight", "float", what),
                bias=_field(t, "bias", "float", what, **({"default": 0.0} if version == 1 else {})),
            )
        )
    return targets


_FLOAT_DTYPES = {
    _dtype_name(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def _check_memory(need: int, limit: int, what: str, source: Path) -> None:
    if need > limit:
        raise TLCircuitsError(
            f"{source}: {what} would need {need / 2**20:.1f} MiB, more than the memory "
            f"limit of {limit / 2**20:.1f} MiB (load_graph's max_memory_bytes); refused "
            "before allocating"
        )


def _decode_adjacency(
    meta: Any,
    get: Callable[[str], Tensor],
    nodes: NodeTable,
    source: Path,
    limit: int,
    header: dict[str, Any],
) -> Tensor | CausalAdjacency:
    """The edges from their header entry and tensors, in the stored kind (module doc)."""
    n = len(nodes)
    if not isinstance(meta, dict):
        raise TLCircuitsError(f"{source}: header field 'adjacency' must be a JSON object")
    for key in ("layout", "shape", "dtype"):
        if key not in meta:
            raise TLCircuitsError(f"{source}: graph header lacks the field 'adjacency.{key}'")
    layout, shape, dtype_name = meta["layout"], meta["shape"], meta["dtype"]
    if shape != [n, n]:
        raise TLCircuitsError(f"{source}: adjacency shape {shape!r} does not match {n} nodes")
    if not isinstance(dtype_name, str) or dtype_name not in _FLOAT_DTYPES:
        raise TLCircuitsError(f"{source}: adjacency dtype {dtype_name!r} is not a float dtype")
    dtype = _FLOAT_DTYPES[dtype_name]
    kind = meta.get("edges") if header["version"] >= 2 else None
    if header["version"] >= 2 and kind not in ("causal", "dense"):
        raise TLCircuitsError(
            f"{source}: adjacency.edges must be 'causal' or 'dense', got {kind!r}"
        )
    allowed = {
        "causal": ("blocks", "sparse"),
        "dense": ("dense", "sparse"),
        None: ("dense", "sparse"),
    }
    if layout not in allowed[kind]:
        raise TLCircuitsError(
            f"{source}: unknown adjacency layout {layout!r} for {kind or 'version 1'} edges"
        )
    k, la, p = nodes.kind, nodes.layer, nodes.pos
    if layout == "dense":
        adjacency = get("adjacency")
        if tuple(adjacency.shape) != (n, n) or adjacency.dtype != dtype:
            raise TLCircuitsError(
                f"{source}: adjacency has shape {tuple(adjacency.shape)} and dtype "
                f"{adjacency.dtype}, expected {(n, n)} {dtype}"
            )
        return adjacency
    sizes = causal_group_sizes(k, la, p)
    index_bytes = 8 * (sum(r + c for r, c in sizes) + 2 * n)
    if layout == "blocks":
        _check_memory(index_bytes, limit, "the causal block index", source)
        names = [f"edges.block.{i}" for i in range(len(sizes))]
        blocks = [get(name) for name in names]
        for name, block, (r, c) in zip(names, blocks, sizes, strict=True):
            if tuple(block.shape) != (r, c) or block.dtype != dtype:
                raise TLCircuitsError(
                    f"{source}: {name} has shape {tuple(block.shape)} and dtype {block.dtype}, "
                    f"expected {(r, c)} {dtype} (the causal block of its nodes)"
                )
        groups = causal_groups(k, la, p)
        return CausalAdjacency(n, [RowGroup(r, c, b) for (r, c), b in zip(groups, blocks)])
    index, values = get("adjacency.index"), get("adjacency.values")
    if (
        index.ndim != 1
        or tuple(values.shape) != tuple(index.shape)
        or index.dtype != torch.int64
        or values.dtype != dtype
    ):
        raise TLCircuitsError(
            f"{source}: malformed sparse adjacency (index {tuple(index.shape)} "
            f"{index.dtype}, values {tuple(values.shape)} {values.dtype}; expected int64 "
            f"indices and {dtype} values of one length)"
        )
    if index.numel():
        if int(index[0]) < 0 or int(index[-1]) >= n * n:
            raise TLCircuitsError(f"{source}: sparse adjacency index outside [0, {n}^2)")
        if index.numel() > 1 and bool((index[1:] <= index[:-1]).any()):
            raise TLCircuitsError(
                f"{source}: sparse adjacency indices must be strictly ascending "
                "(duplicate or unsorted entries)"
            )
    rows, cols = index // max(n, 1), index % max(n, 1)
    if kind in ("causal", None):
        block_bytes = sum(r * c for r, c in sizes) * dtype.itemsize
        need = index_bytes + block_bytes + 24 * int(index.numel())
        if kind == "causal":
            _check_memory(need, limit, "the causal blocks", source)
        if need <= limit:
            groups = causal_groups(k, la, p)
            ok, placements = _place(groups, n, rows, cols)
            if bool(ok.all()):
                return _fill_blocks(groups, n, dtype, placements, values)
            if kind == "causal":
                bad = int((~ok).nonzero()[0, 0])
                t, s = int(rows[bad]), int(cols[bad])
                raise TLCircuitsError(
                    f"{source}: edge ({t}, {s}) cannot exist: node {s} "
                    f"({KINDS[int(k[s])]}, layer {int(la[s])}, pos {int(p[s])}) is not in the "
                    f"causal set of node {t} ({KINDS[int(k[t])]}, layer {int(la[t])}, pos "
                    f"{int(p[t])})"
                )
    _check_memory(n * n * dtype.itemsize, limit, f"a dense [{n}, {n}] adjacency", source)
    adjacency = torch.zeros(n * n, dtype=dtype)
    adjacency[index] = values
    return adjacency.reshape(n, n)


def _place(
    groups: list[tuple[Tensor, Tensor]], n: int, rows: Tensor, cols: Tensor
) -> tuple[Tensor, list[tuple[int, Tensor, Tensor, Tensor]]]:
    """``(ok, placements)``: whether each sparse entry lies in its row's causal block,
    and per group ``(group, entries, slots, column positions)`` of the entries that do."""
    group_of = torch.full((n,), -1, dtype=torch.long)
    slot_of = torch.full((n,), -1, dtype=torch.long)
    for g, (r, _c) in enumerate(groups):
        group_of[r] = g
        slot_of[r] = torch.arange(len(r))
    g = group_of[rows]
    ok = g >= 0
    g_sorted, order = torch.sort(torch.where(ok, g, len(groups)), stable=True)
    counts = torch.bincount(g_sorted, minlength=len(groups) + 1).tolist()[: len(groups)]
    placements = []
    start = 0
    for gi, count in enumerate(counts):
        if not count:
            continue
        sel = order[start : start + count]
        start += count
        group_cols = groups[gi][1]
        if not len(group_cols):
            ok[sel] = False
            continue
        at = torch.searchsorted(group_cols, cols[sel]).clamp(max=len(group_cols) - 1)
        hit = group_cols[at] == cols[sel]
        ok[sel] = hit
        placements.append((gi, sel, slot_of[rows[sel]], at))
    return ok, placements


def _fill_blocks(
    groups: list[tuple[Tensor, Tensor]],
    n: int,
    dtype: torch.dtype,
    placements: list[tuple[int, Tensor, Tensor, Tensor]],
    values: Tensor,
) -> CausalAdjacency:
    adjacency = CausalAdjacency.from_groups(n, groups, dtype)
    for gi, sel, slot, at in placements:
        adjacency.groups[gi].values[slot, at] = values[sel]
    return adjacency
