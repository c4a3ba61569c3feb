"""The attribution-graph JSON of the Neuronpedia / circuit-tracer frontend (DESIGN.md §6).

Field names follow ``circuit_tracer/frontend/graph_models.py`` (``Metadata``, ``QParams``,
``Node``, ``Link``) of safety-research/circuit-tracer. Node ids:

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

Our own data goes under ``json["extra"]["tl_circuits"]`` (other readers ignore it): the
targets, the graph's ``info``, and the blocks analyses hand in (``blocks``):
``head_loadings`` and ``qk`` (``null`` unless given; written by
:func:`tl_circuits.export.frontend.export_json`, which documents them).

The output validates against Neuronpedia's published graph schema,
``apps/webapp/app/api/graph/graph-schema.json`` of github.com/hijohnnylin/neuronpedia at
commit ebb8426fc550ad5d1f76d52c271a624af3c08a57 (JSON Schema draft-07; Neuronpedia checks
uploads with it). A copy is ``tests/data/neuronpedia-graph-schema.json``, applied by
``tests/test_neuronpedia_schema.py``. That schema lets every object carry keys it does not
name, which is how ``extra`` and circuit-tracer's own fields (``transcoder_list``,
``schema_version``, ``token_prob``, ``is_target_logit``, ...) sit beside its fields. Its
optional metadata numbers take no ``null``: ``metadata.node_threshold`` is written only when
given, ``metadata.generation_settings.max_feature_nodes`` only when ``info`` records a
feature budget, and ``metadata.pruning_settings`` (``node_threshold``, ``edge_threshold``)
only for a pruned graph (``info["pruned"]``).

Slugs name files (``{slug}.json`` in a directory of graphs), so they are checked
(:func:`check_slug`): Neuronpedia's upload rule ``^[a-zA-Z0-9_.-]+$``, at most
:data:`MAX_SLUG_LENGTH` characters, no leading dot (no hidden files, no ``..``) and not the
index's name. An explicit ``slug=`` that breaks the rule is refused; derived slugs are made
safe (:func:`derived_slug`): one from the prompt always ends in a hash of the prompt (so
prompts that reduce to the same words get different files), and a ``info["slug"]`` or file
name stem that breaks the rule (a loaded graph's ``info`` is untrusted) is reduced to
allowed characters plus a hash of the original. A slug is never used as a path.

In a directory, the graph file and the index are written under a lock on
``.graph-metadata.json.lock`` beside the index: the index is read and checked first (a
folder, a device or a file of the wrong shape there raises and nothing is written), then
``{slug}.json`` is written, then the index, so parallel exports keep every entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tl_circuits._version import __version__
from tl_circuits.errors import NonFiniteError, TLCircuitsError
from tl_circuits.graph.files import check_graph
from tl_circuits.graph.nodes import ERROR, FEATURE, KINDS, TARGET, TOKEN, Target
from tl_circuits.storage import check_writable, locked, write_text

if TYPE_CHECKING:
    from tl_circuits.graph.graph import AttributionGraph

#: schema version of the frontend JSON (circuit-tracer's ``Metadata.schema_version``)
FRONTEND_SCHEMA_VERSION = 1
#: version of our own block under ``json["extra"]["tl_circuits"]``
EXTRA_VERSION = 1
#: the index of a directory of graphs, as the circuit-tracer local server reads it
INDEX_FILE = "graph-metadata.json"
#: the lock file beside the index, held for each read-modify-write of it
INDEX_LOCK_FILE = ".graph-metadata.json.lock"
#: the longest slug accepted (the file name is ``{slug}.json``)
MAX_SLUG_LENGTH = 100
#: Neuronpedia's upload rule for slugs (and scans)
SLUG_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
#: hex digits of the hash ending derived slugs
_HASH_CHARS = 8

#: ``blocks(node_ids)`` -> entries of the extra block, computed once the node ids are known
Blocks = Callable[[list[str]], Mapping[str, Any]]


def frontend_json(
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
    blocks: Blocks | None = None,
    indent: int | None = None,
) -> dict[str, Any]:
    """The frontend JSON of ``graph`` (module docstring) as a dict; with ``path``, also
    written (``path`` an existing directory: ``{slug}.json`` in it, and the graph's metadata
    added to that directory's ``graph-metadata.json`` index, as the circuit-tracer local
    server expects).

    - ``slug``: checked by :func:`check_slug` (a bad one raises
      :class:`~tl_circuits.errors.TLCircuitsError`); defaults to the file name stem of
      ``path``, else ``info["slug"]``, else one made from the prompt, each made safe by
      :func:`derived_slug` (module docstring)
    - ``scan``: the model / transcoder-set id Neuronpedia looks features up in; defaults
      to ``info["scan"]``, else ``info["model_name"]``, else ``"unknown"``
    - ``node_threshold``: recorded in the metadata, left out when not given (the viewer's
      default influence threshold; the graph is exported as given: prune first with
      :meth:`AttributionGraph.prune`)
    - ``prompt``: defaults to ``info["prompt"]``, else the joined token strings
    - ``influence``: per-node influence (length ``n_nodes``), written to ``node.influence``
    - ``clerps``: node labels by ``node_id`` (features default to ``""``)
    - ``decode``: token id -> string for logit targets' labels (e.g.
      ``model.to_single_str_token``); without it the target's ``label`` is used
    - ``qparams``: overrides of the ``qParams`` block (e.g. ``pinnedIds``,
      ``sparsityThreshold``)
    - ``blocks``: called with the node ids; what it returns is merged into
      ``json["extra"]["tl_circuits"]`` (how head loadings and QK terms are handed in)
    - ``extra``: merged into ``json["extra"]["tl_circuits"]`` last (its keys win);
      tensors become nested lists, non-finite floats ``null``

    Text (prompt, token strings, labels) is stored as JSON strings only; nothing here is
    HTML. Non-finite activations and influences are written as ``null``; a non-finite
    adjacency entry raises :class:`~tl_circuits.errors.NonFiniteError`.
    """
    check_graph(graph)
    info = graph.info or {}
    if prompt is None:
        prompt = info.get("prompt") if isinstance(info.get("prompt"), str) else None
        if prompt is None:
            prompt = "".join(graph.token_strings)
    out_path = Path(path) if path is not None else None
    slug = _default_slug(out_path, info, prompt) if slug is None else check_slug(slug)
    n_layers = _n_layers(graph)
    token_ids = [int(t) for t in graph.tokens.reshape(-1).tolist()]
    nodes = _frontend_nodes(graph, n_layers, token_ids, influence, clerps or {}, decode)
    ids = [node["node_id"] for node in nodes]
    metadata = _metadata(graph, slug, scan, node_threshold, prompt, transcoder_list)
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    q.update(qparams or {})
    block = _extra_block(graph, ids, n_layers)
    block.update(blocks(ids) if blocks is not None else {})
    block.update(extra or {})
    result = {
        "metadata": _json_safe(metadata),
        "qParams": _json_safe(q),
        "nodes": nodes,
        "links": _frontend_links(graph, ids),
        "extra": {"tl_circuits": _json_safe(block)},
    }
    if out_path is not None:
        _write(result, out_path, slug, indent)
    return result


def _default_slug(out_path: Path | None, info: Mapping[str, Any], prompt: str) -> str:
    """The file name stem of ``out_path``, else ``info["slug"]``, else one from the prompt,
    made safe (:func:`derived_slug`)."""
    if out_path is not None and not out_path.is_dir():
        return derived_slug(out_path.stem)
    if isinstance(info.get("slug"), str):
        return derived_slug(info["slug"])
    return derived_slug(prompt, from_prompt=True)


def slug_problem(slug: Any) -> str | None:
    """Why ``slug`` cannot name a graph (module docstring), or ``None`` if it can."""
    if not isinstance(slug, str):
        return f"it is a {type(slug).__name__}, not a string"
    if not slug:
        return "it is empty"
    if len(slug) > MAX_SLUG_LENGTH:
        return f"it has {len(slug)} characters, more than {MAX_SLUG_LENGTH}"
    if not SLUG_PATTERN.fullmatch(slug):
        bad = sorted({c for c in slug if not SLUG_PATTERN.fullmatch(c)})
        shown = ", ".join(ascii(c) for c in bad[:5])
        return f"it has characters outside A-Z a-z 0-9 _ . - ({shown})"
    if slug.startswith("."):
        return "it starts with a dot (a hidden file, or a parent directory)"
    if slug.lower() == Path(INDEX_FILE).stem:
        return f"it is the name of the directory's index {INDEX_FILE}"
    return None


def check_slug(slug: Any) -> str:
    """``slug`` if it can name a graph (and its file ``{slug}.json``), else raise
    :class:`~tl_circuits.errors.TLCircuitsError` saying why."""
    problem = slug_problem(slug)
    if problem is not None:
        raise TLCircuitsError(
            f"slug {slug!r} cannot name a graph file: {problem}; use 1 to {MAX_SLUG_LENGTH} "
            f"of the characters A-Z a-z 0-9 _ . - (Neuronpedia's rule), not starting with a "
            f"dot, other than {Path(INDEX_FILE).stem!r}"
        )
    return slug


def derived_slug(text: str, *, from_prompt: bool = False) -> str:
    """A safe slug made from untrusted ``text``: ``text`` itself when it passes
    :func:`check_slug` (and is not a prompt), else its lower-cased letters and digits
    joined by ``-`` (at most 60 characters) plus ``-`` and a hash of ``text``, so that
    different texts never share a slug by reduction. Prompts always get the hash."""
    if not from_prompt and slug_problem(text) is None:
        return text
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60].strip("-")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    return f"{words or 'graph'}-{digest}"


def _metadata(
    graph: AttributionGraph,
    slug: str,
    scan: str | None,
    node_threshold: float | None,
    prompt: str,
    transcoder_list: Sequence[str] | None,
) -> dict[str, Any]:
    """The ``metadata`` block (circuit-tracer's ``Metadata``)."""
    info = graph.info or {}
    if scan is None:
        scan = next(
            (info[k] for k in ("scan", "model_name") if isinstance(info.get(k), str)), "unknown"
        )
    if transcoder_list is None:
        tl = info.get("transcoder_list")
        transcoder_list = tl if isinstance(tl, list) and all(isinstance(x, str) for x in tl) else []
    metadata: dict[str, Any] = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": list(transcoder_list),
        "prompt_tokens": [_display_token(s) for s in graph.token_strings],
        "prompt": prompt,
        "schema_version": FRONTEND_SCHEMA_VERSION,
        "info": {"generator": {"name": "tl_circuits", "version": __version__}},
    }
    # optional numbers of the schema: left out when unknown (the schema has no null there)
    if node_threshold is not None:
        metadata["node_threshold"] = float(node_threshold)
    budget = info.get("max_feature_nodes")
    if _is_int(budget):
        metadata["generation_settings"] = {"max_feature_nodes": int(budget)}
    pruned = info.get("pruned")
    if isinstance(pruned, Mapping):
        settings = {
            k: float(pruned[k])
            for k in ("node_threshold", "edge_threshold")
            if _is_number(pruned.get(k)) and math.isfinite(pruned[k])
        }
        if settings:
            metadata["pruning_settings"] = settings
    return metadata


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _extra_block(graph: AttributionGraph, ids: list[str], n_layers: int) -> dict[str, Any]:
    """Our block before anything is handed in: targets, graph info, empty analyses."""
    target_ids = [ids[int(i)] for i in graph.indices("target")]
    return {
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
        "graph_info": graph.info or {},
    }


def _write(result: dict[str, Any], out_path: Path, slug: str, indent: int | None) -> None:
    """Write ``result`` to ``out_path`` (a directory: as ``{slug}.json`` plus the index,
    under the index's lock: check the index, write the graph file, update the index)."""
    text = _dumps_frontend(result, indent)
    if not out_path.is_dir():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(out_path, text)
        return
    name = f"{check_slug(slug)}.json"
    graph_path, index_path = out_path / name, out_path / INDEX_FILE
    with locked(out_path / INDEX_LOCK_FILE):
        index = _read_graph_index(index_path)
        check_writable(graph_path)
        write_text(graph_path, text)
        slug = result["metadata"]["slug"]
        graphs = [g for g in index["graphs"] if g.get("slug") != slug]
        index["graphs"] = [*graphs, result["metadata"]]
        write_text(index_path, json.dumps(index, indent=2, ensure_ascii=True, allow_nan=False))


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
    """One ``Node`` record per graph node, in node order (ids: module docstring)."""
    n = len(graph.nodes)
    infl = _influence_list(influence, n)
    table = graph.nodes
    columns = zip(
        table.kind.tolist(),
        table.layer.tolist(),
        table.pos.tolist(),
        table.feature.tolist(),
        table.activation.tolist(),
        strict=True,
    )
    kinds = table.kind.tolist()
    first_target = kinds.index(TARGET) if TARGET in kinds else n
    nodes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, row in enumerate(columns):
        node = _node_record(graph, i, row, n_layers, token_ids, first_target, decode)
        node["influence"] = _finite_or_none(infl[i])
        if node["node_id"] in seen:  # only possible for repeated targets
            head, _, tail = node["node_id"].rpartition("_")
            node["node_id"] = f"{head}-{i - first_target}_{tail}"
            node["jsNodeId"] = f"{node['jsNodeId']}-{i - first_target}"
        seen.add(node["node_id"])
        if node["node_id"] in clerps:
            node["clerp"] = str(clerps[node["node_id"]])
        nodes.append(node)
    return nodes


def _influence_list(influence: Tensor | Sequence[float] | None, n: int) -> list[Any]:
    """Per-node influence as a list of ``n`` floats (``None`` entries when not given)."""
    if influence is None:
        return [None] * n
    infl = (
        torch.as_tensor(influence).reshape(-1).tolist()
        if isinstance(influence, Tensor)
        else [float(x) for x in influence]
    )
    if len(infl) != n:
        raise TLCircuitsError(f"influence has {len(infl)} entries, the graph {n} nodes")
    return infl


def _node_record(
    graph: AttributionGraph,
    i: int,
    row: tuple[int, int, int, int, float],
    n_layers: int,
    token_ids: list[int],
    first_target: int,
    decode: Callable[[int], str] | None,
) -> dict[str, Any]:
    """The ``Node`` record of node ``i`` (``row``: its kind, layer, pos, feature and
    activation), before influence, clerps and repeated ids."""
    kind, layer, pos, feat, activation = row
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
        "influence": None,
        "activation": None,
    }
    if kind == FEATURE:
        width = graph.info.get("d_transcoder") if graph.info else None
        node.update(
            node_id=f"{layer}_{feat}_{pos}",
            jsNodeId=f"{layer}_{feat}-0",
            feature=layer * width + feat if isinstance(width, int) else _cantor(layer, feat),
            feature_type="cross layer transcoder",
            activation=_finite_or_none(activation),
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
        node.update(_target_fields(t, j, n_layers + 1, pos, decode))
        node["is_target_logit"] = t.kind == "logit" and j == _first_logit(graph.targets)
    else:
        raise TLCircuitsError(f"node {i} has unknown kind {kind} (kinds are {KINDS})")
    return node


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


def _cantor(x: int, y: int) -> int:
    """A unique int for (layer, feature), as circuit-tracer encodes feature nodes."""
    return (x + y) * (x + y + 1) // 2 + y


def _display_token(s: str) -> str:
    """Make whitespace control characters visible, as the circuit-tracer frontend does."""
    return s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


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


def _read_graph_index(index_path: Path) -> dict[str, Any]:
    """The ``{"graphs": [{...}, ...]}`` index the local frontend lists (empty when
    missing); anything else there raises, so no entry is ever silently dropped."""
    check_writable(index_path)  # a directory, device, FIFO or symlink there raises
    if not index_path.exists():
        return {"graphs": []}
    try:
        loaded = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TLCircuitsError(f"{index_path} exists but is not valid JSON: {e}") from e
    if not (isinstance(loaded, dict) and isinstance(loaded.get("graphs"), list)):
        raise TLCircuitsError(
            f"{index_path} is not a graph index (an object whose 'graphs' is a list); "
            "move it away or export into another directory"
        )
    bad = next((i for i, g in enumerate(loaded["graphs"]) if not isinstance(g, dict)), None)
    if bad is not None:
        raise TLCircuitsError(
            f"{index_path}: entry {bad} of 'graphs' is a {type(loaded['graphs'][bad]).__name__}"
            ", not an object; fix or move the index"
        )
    return loaded
