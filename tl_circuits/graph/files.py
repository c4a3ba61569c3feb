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
- optionally ``head_loadings.{field}``: the graph's
  :class:`~tl_circuits.attention.heads.loadings.HeadLoadings` (``edges``, ``edge_values``,
  ``loadings``, ``bypass``, ``crossed`` and, when split by write layer, ``write_layers``,
  ``loadings_by_write``, ``bypass_by_write``, ``values_by_write``); the header then has
  ``"head_loadings": {"fields": [...]}`` naming the stored fields. Files without it (and
  graphs with ``head_loadings`` None) load with ``head_loadings`` None; still version 1.

Tensors keep their dtypes and are loaded on the CPU. The header is Python's JSON
(``NaN`` allowed, e.g. for the probability of a non-logit target); ``info`` must be
JSON-able and round-trips as JSON does (tuples come back as lists).

Frontend export (:func:`export_json`)
-------------------------------------
The attribution-graph JSON read by the circuit-tracer local frontend and Neuronpedia: field
names follow ``circuit_tracer/frontend/graph_models.py`` (``Metadata``, ``QParams``,
``Node``, ``Link``) of safety-research/circuit-tracer. Node ids (DESIGN.md §6):

==============  ==========================  =====================================
node            ``node_id``                 ``jsNodeId``
==============  ==========================  =====================================
feature         ``{layer}_{feature}_{pos}``  ``{layer}_{feature}-0``
error           ``{layer}_-1_{pos}``         ``{layer}_-1-{pos}``
token           ``E_{token_id}_{pos}``       ``E_{token_id}-{pos}``
logit target    ``{L+1}_{token_id}_{pos}``   ``L_{token_id}-{pos}``
logit diff      ``{L+1}_diff{a}-{b}_{pos}``  ``L_diff{a}-{b}-{pos}``
direction       ``{L+1}_dir{i}_{pos}``       ``L_dir{i}-{pos}``
==============  ==========================  =====================================

with ``L = info["n_layers"]`` and ``i`` the index of the target in ``graph.targets``. The
middle part of a custom target id is never an integer, so it cannot collide with a logit.
Should two targets still share an id (the same token at the same position twice), the
later one gets ``-{i}`` appended to its middle part. Nodes are emitted in graph order
(``json["nodes"][k]`` is graph node ``k``); links are one per nonzero adjacency entry,
``source -> target`` for ``adjacency[target, source]``, in row-major order.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tl_circuits.errors import NonFiniteError, TLCircuitsError
from tl_circuits.graph.causal_adjacency import CausalAdjacency, row_groups
from tl_circuits.graph.nodes import ERROR, FEATURE, KINDS, TARGET, TOKEN, NodeTable, Target

if TYPE_CHECKING:
    from tl_circuits.graph.graph import AttributionGraph

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "export_json", "load_graph", "save_graph"]

FORMAT_NAME = "tl_circuits.graph"
FORMAT_VERSION = 1
#: file names of the directory layout
HEADER_FILE = "graph.json"
TENSOR_FILE = "tensors.safetensors"
#: safetensors metadata key holding the header in the single-file layout
METADATA_KEY = "tl_circuits.graph"
#: schema version of the frontend JSON (circuit-tracer's ``Metadata.schema_version``)
FRONTEND_SCHEMA_VERSION = 1
#: version of our own block under ``json["extra"]["tl_circuits"]``
EXTRA_VERSION = 1

_COLUMNS = ("kind", "layer", "pos", "feature", "activation")
#: HeadLoadings tensor fields (the last four only with ``split_write_layers``)
_HL_FIELDS = (
    "edges",
    "edge_values",
    "loadings",
    "bypass",
    "crossed",
    "write_layers",
    "loadings_by_write",
    "bypass_by_write",
    "values_by_write",
)
_HL_REQUIRED = _HL_FIELDS[:5]
_HL_PREFIX = "head_loadings."
_TARGET_KINDS = ("logit", "logit_diff", "direction")


# ---------------------------------------------------------------------------------------
# lossless save / load
# ---------------------------------------------------------------------------------------


def save_graph(graph: AttributionGraph, path: str | Path) -> Path:
    """Write ``graph`` losslessly (safetensors + JSON, never pickle); return the path.

    ``path`` ending in ``.safetensors`` (and not an existing directory) gives one file;
    any other path a directory holding ``graph.json`` and ``tensors.safetensors`` (created
    if needed; other files in it are left alone). ``graph.context`` is not saved;
    ``graph.head_loadings``, when set, is (tensors ``head_loadings.*``).
    """
    path = Path(path)
    tensors, header = _encode(graph)
    if path.suffix == ".safetensors" and not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_safetensors(tensors, path, {METADATA_KEY: _dumps_header(header)})
    else:
        if path.exists() and not path.is_dir():
            raise TLCircuitsError(
                f"cannot save a graph directory at {path}: it is a file "
                "(use a path ending in .safetensors for one file)"
            )
        path.mkdir(parents=True, exist_ok=True)
        _write_safetensors(
            tensors, path / TENSOR_FILE, {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
        )
        _atomic_write_text(path / HEADER_FILE, _dumps_header(header, indent=1))
    return path


def load_graph(path: str | Path) -> AttributionGraph:
    """Read a graph written by :func:`save_graph` (either layout); ``context`` is None.

    Raises ``FileNotFoundError`` for a missing path or file, and
    :class:`~tl_circuits.errors.TLCircuitsError` for anything that is not a graph of a
    supported format version.
    """
    from safetensors import safe_open

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

    try:
        with safe_open(str(source), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own (Rust) error types
        raise TLCircuitsError(f"{source} is not a readable safetensors file: {e}") from e

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
    _check_graph(graph)
    tensors: dict[str, Tensor] = {}
    for prefix, table in (("nodes", graph.nodes), ("excluded", graph.excluded)):
        for col in _COLUMNS:
            tensors[f"{prefix}.{col}"] = getattr(table, col)
    tensors["row_values"] = graph.row_values
    tensors["constants"] = graph.constants
    tensors["tokens"] = graph.tokens
    for i, t in enumerate(graph.targets):
        tensors[f"targets.{i}.vector"] = t.vector

    # stored entries (nonzero, or -0.0) read group by group: a full build's causal blocks
    # are never made dense unless the dense layout is the smaller file
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
    nnz = int(flat_index.numel())
    esize = dtype.itemsize
    if nnz * (8 + esize) < n * n * esize:
        layout = "sparse"
        tensors["adjacency.index"] = flat_index
        tensors["adjacency.values"] = torch.cat(values)[order]
    else:
        layout = "dense"
        tensors["adjacency"] = graph.adjacency.detach().cpu()

    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "adjacency": {"layout": layout, "shape": [n, n], "dtype": _dtype_name(dtype)},
        "targets": [
            {
                "kind": t.kind,
                "label": t.label,
                "pos": int(t.pos),
                "token": int(t.token),
                "tokens": [int(x) for x in t.tokens],
                "probability": float(t.probability),
                "weight": float(t.weight),
            }
            for t in graph.targets
        ],
        "token_strings": [str(s) for s in graph.token_strings],
        "info": graph.info,
    }
    if graph.head_loadings is not None:
        fields = _head_loading_fields(graph.head_loadings, n)
        for name in fields:
            tensors[f"{_HL_PREFIX}{name}"] = getattr(graph.head_loadings, name)
        header["head_loadings"] = {"fields": fields}
    try:
        json.dumps(header)
    except (TypeError, ValueError) as e:
        raise TLCircuitsError(f"graph.info must be JSON-able to be saved: {e}") from e
    return tensors, header


def _check_graph(graph: AttributionGraph) -> None:
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


def _head_loading_fields(hl: Any, n_nodes: int) -> list[str]:
    """Names of the tensor fields of ``hl`` to store (optional ones only when set),
    after checking that its edges index a graph of ``n_nodes`` nodes."""
    edges = hl.edges
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= n_nodes):
        raise TLCircuitsError(
            f"graph.head_loadings has edges outside the graph's {n_nodes} nodes (stale "
            "loadings of another graph?); recompute them with graph.compute_head_loadings()"
        )
    return [name for name in _HL_FIELDS if getattr(hl, name) is not None]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dumps_header(header: dict[str, Any], indent: int | None = None) -> str:
    return json.dumps(header, indent=indent, ensure_ascii=True)


def _owned(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses shared ones)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[name] = t
    return out


def _write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(_owned(tensors), tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    from tl_circuits.graph.graph import AttributionGraph

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise TLCircuitsError(f"{source}: saved graph lacks the tensor {name!r}")
        return tensors[name]

    try:
        adj_meta = header["adjacency"]
        target_meta = header["targets"]
        token_strings = header["token_strings"]
        info = header["info"]
        layout, shape = adj_meta["layout"], adj_meta["shape"]
    except (KeyError, TypeError) as e:
        raise TLCircuitsError(f"{source}: graph header lacks the field {e}") from e

    nodes = NodeTable(*(get(f"nodes.{c}") for c in _COLUMNS))
    excluded = NodeTable(*(get(f"excluded.{c}") for c in _COLUMNS))
    n = len(nodes)
    if list(shape) != [n, n]:
        raise TLCircuitsError(f"{source}: adjacency shape {shape} does not match {n} nodes")
    if layout == "dense":
        adjacency = get("adjacency")
        if tuple(adjacency.shape) != (n, n):
            raise TLCircuitsError(
                f"{source}: adjacency has shape {tuple(adjacency.shape)}, expected {(n, n)}"
            )
    elif layout == "sparse":
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
        adjacency = adjacency.reshape(n, n)
    else:
        raise TLCircuitsError(f"{source}: unknown adjacency layout {layout!r}")

    targets = []
    for i, t in enumerate(target_meta):
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
    if nodes.count("target") != len(targets):
        raise TLCircuitsError(
            f"{source}: {nodes.count('target')} target nodes but {len(targets)} targets"
        )
    head_loadings = None
    hl_meta = header.get("head_loadings")
    if hl_meta is not None:
        head_loadings = _decode_head_loadings(hl_meta, get, n, source)
    return AttributionGraph(
        nodes=nodes,
        edges=adjacency,
        row_values=get("row_values"),
        constants=get("constants"),
        targets=targets,
        tokens=get("tokens"),
        token_strings=list(token_strings),
        excluded=excluded,
        info=info,
        context=None,
        head_loadings=head_loadings,
    )


def _decode_head_loadings(
    meta: Any, get: Callable[[str], Tensor], n_nodes: int, source: Path
) -> Any:
    from tl_circuits.attention.heads.loadings import HeadLoadings

    fields = meta.get("fields") if isinstance(meta, dict) else None
    if (
        not isinstance(fields, list)
        or not all(f in _HL_FIELDS for f in fields)
        or not all(f in fields for f in _HL_REQUIRED)
    ):
        raise TLCircuitsError(f"{source}: malformed head_loadings header {meta!r}")
    values = {name: get(f"{_HL_PREFIX}{name}") for name in fields}
    try:
        hl = HeadLoadings(**values)
    except Exception as e:  # jaxtyping / beartype shape errors
        raise TLCircuitsError(f"{source}: inconsistent head_loadings tensors: {e}") from e
    edges = hl.edges
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= n_nodes):
        raise TLCircuitsError(f"{source}: head_loadings edges index beyond {n_nodes} nodes")
    return hl


# ---------------------------------------------------------------------------------------
# frontend JSON export
# ---------------------------------------------------------------------------------------


def export_json(
    graph: AttributionGraph,
    path: str | Path | None = None,
    *,
    slug: str | None = None,
    scan: str | None = None,
    node_threshold: float | None = None,
    prompt: str | None = None,
    transcoder_list: Sequence[str] | None = None,
    influence: Tensor | Sequence[float] | None = None,
    clerps: Mapping[str, str] | None = None,
    decode: Callable[[int], str] | None = None,
    qparams: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    top_heads: int = 3,
    qk_top_terms: int = 0,
    indent: int | None = None,
) -> dict[str, Any]:
    """The attribution-graph JSON of the circuit-tracer / Neuronpedia frontend.

    Returns the JSON as a dict; with ``path``, also writes it (``path`` an existing
    directory: ``{slug}.json`` in it, and the graph's metadata added to that directory's
    ``graph-metadata.json`` index, as the circuit-tracer local server expects).

    - ``slug``: defaults to the file name stem of ``path``, else ``info["slug"]``, else
      one made from the prompt
    - ``scan``: the model / transcoder-set id Neuronpedia looks features up in; defaults
      to ``info["scan"]``, else ``info["model_name"]``, else ``"unknown"``
    - ``node_threshold``: recorded in the metadata (the graph is exported as given; prune
      first with :meth:`AttributionGraph.prune`)
    - ``prompt``: defaults to ``info["prompt"]``, else the joined token strings
    - ``influence``: per-node influence (length ``n_nodes``), written to ``node.influence``
    - ``clerps``: node labels by ``node_id`` (features default to ``""``)
    - ``decode``: token id -> string for logit targets' labels (e.g.
      ``model.to_single_str_token``); without it the target's ``label`` is used
    - ``qparams``: overrides of the ``qParams`` block (e.g. ``pinnedIds``,
      ``sparsityThreshold``)
    - ``extra``: merged into ``json["extra"]["tl_circuits"]`` (head loadings, QK terms);
      tensors become nested lists, non-finite floats ``null``; its keys win over ours
    - ``top_heads``: heads listed per link in the head-loadings block (below)

    ``json["extra"]["tl_circuits"]["head_loadings"]`` is ``null`` unless
    ``graph.head_loadings`` is set (:meth:`AttributionGraph.compute_head_loadings`); then,
    for a viewer to show on hovering a link::

        {
          "top_heads": k,                  # the top_heads argument
          "n_layers": L, "n_heads": H,
          "head_totals": [[...H floats] * L],   # HeadLoadings.head_totals(): sum |loading|
          "links": {
            "{source node_id}->{target node_id}": {   # ids exactly as in json["links"]
              "weight": float,             # the edge (= the link's weight)
              "heads": [{"layer": m, "head": h, "loading": float}, ...],
              "bypass": {"layer": m, "value": float} | null,
            },
            ...
          },
        }

    ``json["extra"]["tl_circuits"]["qk"]`` is ``null`` unless ``qk_top_terms > 0``, which
    needs head loadings and the graph's replacement context (a graph loaded from disk has
    none: rebuild it; both are refused with :class:`~tl_circuits.errors.TLCircuitsError`).
    Then, for each link's listed heads, the head's QK attribution (graph-node basis,
    :class:`~tl_circuits.attention.qk.attribution.QKAttribution`) at query position = the target's position and
    key position = the source's::

        {
          "top_terms": k, "basis": "graph",
          "pairs": {
            "L{m}H{h}@{query_pos}:{key_pos}": {
              "layer": m, "head": h, "query_pos": q, "key_pos": p,
              "score": float,              # the pre-soft-cap score (sum of all terms)
              "soft_capped": bool,         # the model caps it with tanh afterwards
              "remainder": float,          # score minus the listed terms
              "terms": [{"value": float, "query": id, "key": id}, ...],  # top |value|
            }, ...
          },
          "links": {"{source node_id}->{target node_id}": ["L{m}H{h}@q:p", ...]},
        }

    Component ids are node ids as in ``json["nodes"]``, or ``"bias"`` (all constants) and
    ``"excluded"`` (nodes a budget or pruning left out).

    ``heads``: up to ``k`` heads of crossed layers, largest ``|loading|`` first
    (:meth:`HeadLoadings.top_heads`); ``bypass``: the crossed layer whose bypass (the part
    of the edge around that layer's attention) is largest in magnitude, ``null`` when the
    edge crosses no attention layer. Only edges that are both links (nonzero adjacency)
    and rows of the loadings are listed; an edge listed twice in the loadings counts once.

    Text (prompt, token strings, labels) is stored as JSON strings only; nothing here is
    HTML. Non-finite activations and influences are written as ``null``; a non-finite
    adjacency entry raises :class:`~tl_circuits.errors.NonFiniteError`.
    """
    _check_graph(graph)
    info = graph.info or {}
    n_layers = _n_layers(graph)
    token_ids = [int(t) for t in graph.tokens.reshape(-1).tolist()]
    token_strings = list(graph.token_strings)
    if prompt is None:
        prompt = info.get("prompt") if isinstance(info.get("prompt"), str) else None
        if prompt is None:
            prompt = "".join(token_strings)
    out_path = Path(path) if path is not None else None
    if slug is None:
        if out_path is not None and not out_path.is_dir():
            slug = out_path.stem
        elif isinstance(info.get("slug"), str):
            slug = info["slug"]
        else:
            slug = _slugify(prompt)
    if scan is None:
        scan = next(
            (info[k] for k in ("scan", "model_name") if isinstance(info.get(k), str)), "unknown"
        )
    if transcoder_list is None:
        tl = info.get("transcoder_list")
        transcoder_list = tl if isinstance(tl, list) and all(isinstance(x, str) for x in tl) else []

    nodes = _frontend_nodes(graph, n_layers, token_ids, influence, clerps or {}, decode)
    links = _frontend_links(graph, [node["node_id"] for node in nodes])

    from tl_circuits import __version__

    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": list(transcoder_list),
        "prompt_tokens": [_display_token(s) for s in token_strings],
        "prompt": prompt,
        "node_threshold": None if node_threshold is None else float(node_threshold),
        "schema_version": FRONTEND_SCHEMA_VERSION,
        "info": {"generator": {"name": "tl_circuits", "version": __version__}},
    }
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    q.update(qparams or {})
    target_ids = [nodes[int(i)]["node_id"] for i in graph.indices("target")]
    block: dict[str, Any] = {
        "version": EXTRA_VERSION,
        "head_loadings": None,
        "qk": None,
        "n_layers": n_layers,
        "targets": [
            {
                "node_id": nid,
                "kind": t.kind,
                "label": t.label,
                "pos": int(t.pos),
                "token": int(t.token),
                "tokens": [int(x) for x in t.tokens],
                "probability": t.probability,
                "weight": t.weight,
            }
            for nid, t in zip(target_ids, graph.targets, strict=True)
        ],
        "graph_info": info,
    }
    if graph.head_loadings is not None:
        block["head_loadings"] = _head_loadings_block(
            graph, [node["node_id"] for node in nodes], top_heads
        )
    if qk_top_terms:
        from tl_circuits.export.qk_block import qk_block

        block["qk"] = qk_block(graph, [node["node_id"] for node in nodes], top_heads, qk_top_terms)
    block.update(extra or {})
    result = {
        "metadata": metadata,
        "qParams": _json_safe(q),
        "nodes": nodes,
        "links": links,
        "extra": {"tl_circuits": _json_safe(block)},
    }
    result["metadata"] = _json_safe(metadata)

    if out_path is not None:
        if out_path.is_dir():
            _atomic_write_text(out_path / f"{slug}.json", _dumps_frontend(result, indent))
            _update_graph_index(out_path / "graph-metadata.json", result["metadata"])
        else:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(out_path, _dumps_frontend(result, indent))
    return result


def _n_layers(graph: AttributionGraph) -> int:
    n = graph.info.get("n_layers") if graph.info else None
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    # targets sit at layer n_layers (nodes.py); otherwise one past the deepest node
    kinds = graph.nodes.kind
    if bool((kinds == TARGET).any()):
        return int(graph.nodes.layer[kinds == TARGET].max())
    inner = (kinds == FEATURE) | (kinds == ERROR)
    if bool(inner.any()):
        return int(graph.nodes.layer[inner].max()) + 1
    raise TLCircuitsError(
        "graph.info has no 'n_layers' and the graph has no nodes to infer "
        "it from; set graph.info['n_layers']"
    )


def _frontend_nodes(
    graph: AttributionGraph,
    n_layers: int,
    token_ids: list[int],
    influence: Tensor | Sequence[float] | None,
    clerps: Mapping[str, str],
    decode: Callable[[int], str] | None,
) -> list[dict[str, Any]]:
    n = len(graph.nodes)
    if influence is not None:
        infl = (
            torch.as_tensor(influence).reshape(-1).tolist()
            if isinstance(influence, Tensor)
            else [float(x) for x in influence]
        )
        if len(infl) != n:
            raise TLCircuitsError(f"influence has {len(infl)} entries, the graph {n} nodes")
    else:
        infl = [None] * n
    kinds = graph.nodes.kind.tolist()
    layers = graph.nodes.layer.tolist()
    positions = graph.nodes.pos.tolist()
    features = graph.nodes.feature.tolist()
    acts = graph.nodes.activation.tolist()
    d_transcoder = graph.info.get("d_transcoder") if graph.info else None
    first_target = kinds.index(TARGET) if TARGET in kinds else n
    out_layer = n_layers + 1
    nodes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in range(n):
        kind, layer, pos, feat = int(kinds[i]), int(layers[i]), int(positions[i]), int(features[i])
        node: dict[str, Any] = {
            "node_id": "",
            "feature": -1,
            "layer": str(layer),
            "ctx_idx": pos,
            "feature_type": "",
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "",
            "clerp": "",
            "influence": _finite_or_none(infl[i]),
            "activation": None,
        }
        if kind == FEATURE:
            node.update(
                node_id=f"{layer}_{feat}_{pos}",
                jsNodeId=f"{layer}_{feat}-0",
                feature=(
                    layer * d_transcoder + feat
                    if isinstance(d_transcoder, int)
                    else _cantor(layer, feat)
                ),
                feature_type="cross layer transcoder",
                activation=_finite_or_none(acts[i]),
            )
        elif kind == ERROR:
            node.update(
                node_id=f"{layer}_-1_{pos}",
                jsNodeId=f"{layer}_-1-{pos}",
                feature_type="mlp reconstruction error",
            )
        elif kind == TOKEN:
            if not 0 <= pos < len(token_ids):
                raise TLCircuitsError(
                    f"token node {i} has position {pos}, outside the {len(token_ids)}-token prompt"
                )
            tok = token_ids[pos]
            node.update(
                node_id=f"E_{tok}_{pos}",
                jsNodeId=f"E_{tok}-{pos}",
                feature=pos,
                layer="E",
                feature_type="embedding",
            )
        elif kind == TARGET:
            j = i - first_target
            t = graph.targets[j]
            node.update(_target_fields(t, j, out_layer, pos, decode))
            node["is_target_logit"] = t.kind == "logit" and j == _first_logit(graph.targets)
        else:
            raise TLCircuitsError(f"node {i} has unknown kind {kind} (kinds are {KINDS})")
        if node["node_id"] in seen:  # only possible for repeated targets
            head, _, tail = node["node_id"].rpartition("_")
            node["node_id"] = f"{head}-{i - first_target}_{tail}"
            node["jsNodeId"] = f"{node['jsNodeId']}-{i - first_target}"
        seen.add(node["node_id"])
        if node["node_id"] in clerps:
            node["clerp"] = str(clerps[node["node_id"]])
        nodes.append(node)
    return nodes


def _first_logit(targets: list[Target]) -> int:
    return next((j for j, t in enumerate(targets) if t.kind == "logit"), -1)


def _target_fields(
    t: Target, j: int, out_layer: int, pos: int, decode: Callable[[int], str] | None
) -> dict[str, Any]:
    def name(tok: int, fallback: str) -> str:
        return _display_token(decode(tok) if decode is not None else fallback)

    fields: dict[str, Any] = {"layer": str(out_layer), "feature_type": "logit"}
    if t.kind == "logit":
        p = t.probability if math.isfinite(t.probability) else 0.0
        fields.update(
            node_id=f"{out_layer}_{t.token}_{pos}",
            jsNodeId=f"L_{t.token}-{pos}",
            feature=int(t.token),
            token_prob=float(p),
            clerp=f'Output "{name(t.token, t.label)}" (p={p:.3f})',
        )
    elif t.kind == "logit_diff":
        a, b = (int(x) for x in t.tokens[:2]) if len(t.tokens) >= 2 else (-1, -1)
        if decode is not None and len(t.tokens) >= 2:
            clerp = f'Logit diff "{name(a, "")}" - "{name(b, "")}"'
        else:
            clerp = f"Logit diff {_display_token(t.label)}"
        fields.update(
            node_id=f"{out_layer}_diff{a}-{b}_{pos}",
            jsNodeId=f"L_diff{a}-{b}-{pos}",
            feature=-1,
            clerp=clerp,
        )
    else:
        fields.update(
            node_id=f"{out_layer}_dir{j}_{pos}",
            jsNodeId=f"L_dir{j}-{pos}",
            feature=-1,
            clerp=f"Direction {_display_token(t.label)}",
        )
    return fields


def _frontend_links(graph: AttributionGraph, ids: list[str]) -> list[dict[str, Any]]:
    adj = graph.adjacency.detach().cpu()
    rows, cols = (adj != 0).nonzero(as_tuple=True)
    weights = adj[rows, cols]
    if weights.is_floating_point() and not bool(torch.isfinite(weights).all()):
        bad = (~torch.isfinite(weights)).nonzero()[0, 0]
        raise NonFiniteError(
            f"adjacency[{int(rows[bad])}, {int(cols[bad])}] is "
            f"{float(weights[bad])}; cannot export non-finite edge weights"
        )
    return [
        {"source": ids[s], "target": ids[t], "weight": w}
        for t, s, w in zip(rows.tolist(), cols.tolist(), weights.double().tolist(), strict=True)
    ]


def _head_loadings_block(graph: AttributionGraph, ids: list[str], k: int) -> dict[str, Any]:
    """The ``head_loadings`` entry of the extra block (documented in export_json)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise TLCircuitsError(f"top_heads must be a non-negative integer, got {k!r}")
    hl = graph.head_loadings
    assert hl is not None
    _head_loading_fields(hl, len(ids))  # edges must index these nodes
    adj = graph.adjacency.detach().cpu()
    edges = hl.edges.detach().cpu()
    bypass = hl.bypass.detach().cpu().double()
    crossed = hl.crossed.detach().cpu()
    _, n_layers, n_heads = hl.loadings.shape
    links: dict[str, Any] = {}
    for i, (t, s) in enumerate(edges.tolist()):
        weight = adj[t, s]
        if weight == 0:
            continue  # not a link
        key = f"{ids[s]}->{ids[t]}"
        if key in links:
            continue
        heads = [{"layer": m, "head": h, "loading": v} for m, h, v in hl.top_heads(i, k)]
        by = None
        layers = crossed[i].nonzero(as_tuple=True)[0]
        if len(layers):
            m = int(layers[int(bypass[i, layers].abs().argmax())])
            by = {"layer": m, "value": float(bypass[i, m])}
        links[key] = {"weight": float(weight), "heads": heads, "bypass": by}
    return {
        "top_heads": k,
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "head_totals": hl.head_totals().detach().cpu().double().tolist(),
        "links": links,
    }


def _cantor(x: int, y: int) -> int:
    """A unique int for (layer, feature), as circuit-tracer encodes feature nodes."""
    return (x + y) * (x + y + 1) // 2 + y


def _display_token(s: str) -> str:
    """Make whitespace control characters visible, as the circuit-tracer frontend does."""
    return s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60].strip("-")
    return slug or "graph"


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _json_safe(obj: Any) -> Any:
    """Plain JSON values: tensors to lists, tuples to lists, non-finite floats to None."""
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu()
        return _json_safe(obj.tolist() if obj.ndim else obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _json_safe(obj.item())
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return _json_safe(obj.tolist())
    raise TLCircuitsError(f"cannot export a {type(obj).__name__} to JSON")


def _dumps_frontend(result: dict[str, Any], indent: int | None) -> str:
    return json.dumps(result, indent=indent, ensure_ascii=True, allow_nan=False)


def _update_graph_index(index_path: Path, metadata: dict[str, Any]) -> None:
    """Add ``metadata`` to the ``{"graphs": [...]}`` index the local frontend lists."""
    index: dict[str, Any] = {"graphs": []}
    if index_path.is_file():
        try:
            loaded = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TLCircuitsError(f"{index_path} exists but is not valid JSON: {e}") from e
        if isinstance(loaded, dict) and isinstance(loaded.get("graphs"), list):
            index = loaded
    index["graphs"] = [
        g
        for g in index["graphs"]
        if not (isinstance(g, dict) and g.get("slug") == metadata["slug"])
    ]
    index["graphs"].append(metadata)
    _atomic_write_text(index_path, json.dumps(index, indent=2, ensure_ascii=True, allow_nan=False))
