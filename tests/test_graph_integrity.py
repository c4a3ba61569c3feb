"""Graph files against hostile inputs and interrupted writes (issue 14, graph files).

Every corrupted file is refused with :class:`TLCircuitsError` naming the problem; the
seal (content id, tensor-file sha256) catches any change to a version-2 file; a tiny file
claiming a huge graph is refused before allocating; causal graphs load as blocks.
Version-1 files (no seal) still load, with every meaning check.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_graph_files import assert_graphs_equal, make_graph

import tl_circuits.model.devices as devices
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph import files
from tl_circuits.graph.causal_adjacency import CausalAdjacency, causal_groups
from tl_circuits.graph.files import (
    FORMAT_NAME,
    HEADER_FILE,
    METADATA_KEY,
    TENSOR_FILE,
    graph_id,
    load_graph,
    save_graph,
    tensor_path,
)
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import NodeTable, Target, empty_nodes
from tl_circuits.storage import _tmp_prefix

SEAL = ("id", "tensors_digest", "tensor_file", "tensors_sha256")


# ---- graphs and file helpers -------------------------------------------------------------


def causal_graph(
    seed: int = 0, n_layers: int = 3, n_pos: int = 5, density: float = 0.6
) -> AttributionGraph:
    """A graph in the standard layout (features, errors, tokens, targets) whose edges are
    a CausalAdjacency over ``causal_groups`` of its nodes, like a full build's."""
    g = torch.Generator().manual_seed(seed)
    feats = sorted(
        {
            (int(la), int(p), int(f))
            for la, p, f in zip(
                torch.randint(0, n_layers, (12,), generator=g),
                torch.randint(0, n_pos, (12,), generator=g),
                torch.randint(0, 50, (12,), generator=g),
            )
        }
    )
    errors = [(la, p) for la in range(n_layers) for p in range(n_pos)]
    n_t = 2
    kind = [0] * len(feats) + [1] * len(errors) + [2] * n_pos + [3] * n_t
    layer = [f[0] for f in feats] + [e[0] for e in errors] + [-1] * n_pos + [n_layers] * n_t
    pos = [f[1] for f in feats] + [e[1] for e in errors] + list(range(n_pos)) + [n_pos - 1] * 2
    feature = [f[2] for f in feats] + [-1] * (len(errors) + n_pos) + [7, -1]
    n = len(kind)
    kind_t, layer_t, pos_t = torch.tensor(kind), torch.tensor(layer), torch.tensor(pos)
    nodes = NodeTable(
        kind_t, layer_t, pos_t, torch.tensor(feature), torch.rand(n, generator=g) + 0.1
    )
    edges = CausalAdjacency.from_groups(n, causal_groups(kind_t, layer_t, pos_t))
    for group in edges.groups:
        v = torch.randn(group.values.shape, generator=g)
        group.values.copy_(torch.where(torch.rand(v.shape, generator=g) < density, v, 0.0))
    if edges.groups and edges.groups[-1].values.numel():
        edges.groups[-1].values[0, 0] = -0.0
    dense = edges.to_dense()
    constants = torch.zeros(n)
    rows = (kind_t == 0) | (kind_t == 3)
    constants[rows] = torch.randn(int(rows.sum()), generator=g)
    row_values = torch.where(rows, dense.sum(1) + constants, 0.0)
    d_model = 4
    targets = [
        Target("logit", " x", n_pos - 1, torch.randn(d_model, generator=g), 0.25, 7, (), 0.3, 0.3),
        Target("direction", "dir", n_pos - 1, torch.randn(d_model, generator=g), weight=0.7),
    ]
    return AttributionGraph(
        nodes=nodes,
        edges=edges,
        row_values=row_values,
        constants=constants,
        targets=targets,
        tokens=torch.arange(n_pos) + 3,
        token_strings=[f"t{i}" for i in range(n_pos)],
        excluded=empty_nodes(),
        info={"n_layers": n_layers, "d_model": d_model, "d_vocab": 100, "seed": seed},
    )


def graphs_equal(a: AttributionGraph, b: AttributionGraph) -> bool:
    try:
        assert_graphs_equal(a, b)
        assert [t.bias for t in a.targets] == [t.bias for t in b.targets]
    except AssertionError:
        return False
    return True


def read_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the header of a saved graph folder."""
    return load_file(str(tensor_path(path))), json.loads((path / HEADER_FILE).read_text())


def write_v2(path: Path, tensors: dict, header: dict) -> None:
    """A sealed version-2 folder of (possibly hostile) content: the seal is right, so what
    loading finds is the content's problem."""
    for p in path.glob("tensors*.safetensors"):
        p.unlink()
    files._write_directory(path, tensors, header)


def write_v1(path: Path, tensors: dict, header: dict) -> None:
    """A version-1 folder (``tensors.safetensors``, no seal) of the same content."""
    for p in list(path.iterdir()):
        p.unlink()
    h = {k: v for k, v in header.items() if k not in SEAL}
    h["version"] = 1
    if isinstance(h.get("adjacency"), dict):
        h["adjacency"] = {k: v for k, v in h["adjacency"].items() if k != "edges"}
    if isinstance(h.get("targets"), list):
        h["targets"] = [
            {k: v for k, v in t.items() if k != "bias"} if isinstance(t, dict) else t
            for t in h["targets"]
        ]
    save_file(tensors, str(path / TENSOR_FILE), metadata={"format": FORMAT_NAME, "version": "1"})
    (path / HEADER_FILE).write_text(json.dumps(h))


# ---- the table of corruptions ----------------------------------------------------------


def _set(key, value):
    def f(t, h):
        h[key] = value

    return f


def _target(i, key, value):
    def f(t, h):
        if value is ...:
            del h["targets"][i][key]
        else:
            h["targets"][i][key] = value

    return f


def _tensor(name, edit):
    def f(t, h):
        t[name] = edit(t[name].clone())

    return f


def _at(i, value):
    def edit(x):
        x[i] = value
        return x

    return edit


def _adj(key, value):
    def f(t, h):
        h["adjacency"][key] = value

    return f


def _info(key, value):
    def f(t, h):
        h["info"][key] = value

    return f


def _drop_tensor(name):
    def f(t, h):
        del t[name]

    return f


def _index(edit):
    return _tensor("adjacency.index", edit)


def _swap_first_two(x):
    x[[0, 1]] = x[[1, 0]]
    return x


def _dup_first(x):
    x[1] = x[0]
    return x


def table_graph() -> AttributionGraph:
    """The table's graph: ``make_graph`` (16 nodes, 6 positions) with 2 excluded features."""
    excluded = NodeTable(
        torch.tensor([0, 0]),
        torch.tensor([1, 2]),
        torch.tensor([0, 3]),
        torch.tensor([9, 10]),
        torch.tensor([0.01, 0.02]),
    )
    return make_graph(density=0.3, excluded=excluded)


# (name, mutation of (tensors, header), expected message)
CORRUPTIONS = [
    ("kind-range", _tensor("nodes.kind", _at(0, 7)), r"nodes\.kind must lie in \[0, 4\)"),
    ("kind-negative", _tensor("nodes.kind", _at(3, -1)), r"nodes\.kind must lie in"),
    ("feature-layer-high", _tensor("nodes.layer", _at(0, 3)), r"layer\[0\] = 3 for a feature"),
    ("feature-layer-neg", _tensor("nodes.layer", _at(1, -2)), r"layer\[1\] = -2 for a feature"),
    ("error-layer", _tensor("nodes.layer", _at(5, 3)), r"layer\[5\] = 3 for an error node"),
    ("token-layer", _tensor("nodes.layer", _at(8, 0)), r"for a token node \(expected -1\)"),
    ("target-layer", _tensor("nodes.layer", _at(14, 2)), r"for a target node"),
    ("pos-high", _tensor("nodes.pos", _at(2, 6)), r"nodes\.pos\[2\] = 6 is outside .* \[0, 6\)"),
    ("pos-negative", _tensor("nodes.pos", _at(9, -1)), r"nodes\.pos\[9\] = -1 is outside"),
    ("excluded-pos", _tensor("excluded.pos", _at(0, 60)), r"excluded\.pos\[0\] = 60"),
    ("feature-index", _tensor("nodes.feature", _at(0, -5)), r"feature must be >= 0"),
    ("activation-nan", _tensor("nodes.activation", _at(4, math.nan)), r"activation must be fin"),
    ("row-values-nan", _tensor("row_values", _at(0, math.nan)), r"row_values must be finite"),
    ("constants-inf", _tensor("constants", _at(1, math.inf)), r"constants must be finite"),
    ("edge-nan", _tensor("adjacency.values", _at(2, math.nan)), r"edges must be finite"),
    ("vector-nan", _tensor("targets.0.vector", _at(0, math.nan)), r"target 0: vector must be f"),
    ("vector-length", _tensor("targets.1.vector", lambda x: x[:5]), r"differ in length"),
    ("d-model", _info("d_model", 9), r"target 0: vector has length 8, d_model is 9"),
    ("d-vocab", _info("d_vocab", 50), r"token ids must lie in \[0, 50\)"),
    ("token-negative", _tensor("tokens", _at(0, -3)), r"token ids must lie in"),
    ("target-token-vocab", _info("d_vocab", 100), r"target 0: token ids \[123\]"),
    ("n-layers-type", _info("n_layers", "three"), r"info\['n_layers'\] must be a positive"),
    ("row-values-length", _tensor("row_values", lambda x: x[:-1]), r"row_values must have shape"),
    ("constants-length", _tensor("constants", lambda x: torch.cat([x, x])), r"constants must"),
    ("row-values-int", _tensor("row_values", lambda x: x.long()), r"row_values must be a float"),
    ("column-length", _tensor("nodes.pos", lambda x: x[:-1]), r"nodes columns must be 1-d .*"),
    ("column-2d", _tensor("nodes.layer", lambda x: x[None]), r"nodes columns must be 1-d"),
    ("column-dtype", _tensor("nodes.kind", lambda x: x.float()), r"nodes\.kind must be an int"),
    ("activation-int", _tensor("nodes.activation", lambda x: x.long()), r"activation must be a f"),
    ("tokens-float", _tensor("tokens", lambda x: x.float()), r"tokens must be a 1-d integer"),
    ("missing-tensor", _drop_tensor("targets.1.vector"), r"lacks the tensor 'targets\.1\.vector'"),
    ("missing-nodes", _drop_tensor("nodes.kind"), r"lacks the tensor 'nodes\.kind'"),
    ("index-duplicate", _index(_dup_first), r"strictly ascending \(duplicate or unsorted"),
    ("index-unsorted", _index(_swap_first_two), r"strictly ascending"),
    ("index-range", _index(_at(-1, 16 * 16)), r"index outside \[0, 16\^2\)"),
    ("index-dtype", _index(lambda x: x.int()), r"malformed sparse adjacency"),
    ("values-length", _tensor("adjacency.values", lambda x: x[1:]), r"malformed sparse adjac"),
    ("info-null", _set("info", None), r"'info' must be a JSON object, got NoneType"),
    ("info-list", _set("info", [1, 2]), r"'info' must be a JSON object, got list"),
    ("no-info", lambda t, h: h.pop("info"), r"lacks the field 'info'"),
    ("no-adjacency", lambda t, h: h.pop("adjacency"), r"lacks the field 'adjacency'"),
    ("adjacency-null", _set("adjacency", None), r"'adjacency' must be a JSON object"),
    ("adjacency-shape", _adj("shape", [3, 3]), r"adjacency shape \[3, 3\] does not match 16"),
    ("adjacency-shape-type", _adj("shape", "16x16"), r"adjacency shape '16x16'"),
    ("adjacency-dtype", _adj("dtype", "int64"), r"adjacency dtype 'int64' is not a float"),
    ("adjacency-dtype-other", _adj("dtype", "float64"), r"malformed sparse adjacency"),
    ("adjacency-layout", _adj("layout", "zip"), r"unknown adjacency layout 'zip'"),
    ("adjacency-no-layout", lambda t, h: h["adjacency"].pop("layout"), r"'adjacency\.layout'"),
    ("token-strings-type", _set("token_strings", [1, 2]), r"'token_strings' must be a list of"),
    ("token-strings-null", _set("token_strings", None), r"'token_strings' must be a list of"),
    ("token-strings-length", lambda t, h: h["token_strings"].pop(), r"5 token_strings for 6"),
    ("targets-null", _set("targets", None), r"'targets' must be a list"),
    ("targets-extra", lambda t, h: h["targets"].append(h["targets"][0]), r"lacks the tensor"),
    ("targets-fewer", lambda t, h: h["targets"].pop(), r"2 target nodes but 1 Target"),
    ("target-int", lambda t, h: h["targets"].__setitem__(0, 5), r"target 0 must be a JSON obj"),
    ("target-kind", _target(0, "kind", "mystery"), r"target 0 has unknown kind 'mystery'"),
    ("target-pos-str", _target(0, "pos", "5"), r"target 0: field 'pos' has the wrong type"),
    ("target-pos-bool", _target(0, "pos", True), r"field 'pos' has the wrong type"),
    ("target-pos-huge", _target(0, "pos", 10**30), r"field 'pos' has the wrong type or range"),
    ("target-pos-range", _target(1, "pos", 6), r"target 1: pos 6 outside .* \[0, 6\)"),
    ("target-label", _target(0, "label", None), r"field 'label' has the wrong type"),
    ("target-no-label", _target(0, "label", ...), r"target 0 lacks the field 'label'"),
    ("target-tokens", _target(1, "tokens", [1, "b"]), r"field 'tokens' has the wrong type"),
    ("target-weight-str", _target(0, "weight", "0.5"), r"field 'weight' has the wrong type"),
    ("target-weight-nan", _target(0, "weight", math.nan), r"weight and bias must be finite"),
    ("target-weight-huge", _target(0, "weight", 10**400), r"field 'weight' .* out of range"),
]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    ("name", "mutate", "message"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupted_files_are_refused(tmp_path, version, name, mutate, message):
    graph = table_graph()
    path = save_graph(graph, tmp_path / "g")
    tensors, header = read_folder(path)
    assert header["adjacency"]["layout"] == "sparse"  # the index rows need it
    mutate(tensors, header)
    (write_v1 if version == 1 else write_v2)(path, tensors, header)
    with pytest.raises(TLCircuitsError, match=message) as info:
        load_graph(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("version", [1, 2])
def test_uncorrupted_files_load(tmp_path, version):
    """The table's baseline: the unmutated content loads equal in both versions."""
    graph = table_graph()
    path = save_graph(graph, tmp_path / "g")
    tensors, header = read_folder(path)
    (write_v1 if version == 1 else write_v2)(path, tensors, header)
    assert graphs_equal(graph, load_graph(path))


def test_version_1_files_still_load(tmp_path):
    """Files of the version-1 writer (dense and sparse layouts, single file) still load,
    without the target bias (version 1 did not store it)."""
    for density in (1.0, 0.2):
        graph = make_graph(density=density)
        path = save_graph(graph, tmp_path / f"d{density}")
        tensors, header = read_folder(path)
        write_v1(path, tensors, header)
        assert graphs_equal(graph, load_graph(path))
        single = tmp_path / f"s{density}.safetensors"
        h = json.loads((path / HEADER_FILE).read_text())
        save_file(tensors, str(single), metadata={METADATA_KEY: json.dumps(h)})
        assert graphs_equal(graph, load_graph(single))


def test_header_recursion_and_bad_json(tmp_path):
    path = save_graph(make_graph(), tmp_path / "g")
    deep = '{"format": "tl_circuits.graph", "version": 2, "info": ' + "[" * 100_000
    deep += "]" * 100_000 + "}"
    (path / HEADER_FILE).write_text(deep)
    with pytest.raises(TLCircuitsError, match=r"graph\.json is not valid JSON"):
        load_graph(path)
    (path / HEADER_FILE).write_bytes(b'{"format": "\xff"}')
    with pytest.raises(TLCircuitsError, match="not UTF-8"):
        load_graph(path)
    for text in ("[]", "null", '"x"', '{"format": 3}'):
        (path / HEADER_FILE).write_text(text)
        with pytest.raises(TLCircuitsError, match="not a saved tl_circuits graph"):
            load_graph(path)
    for version in ("2", 2.0, True, None, 10**40):
        (path / HEADER_FILE).write_text(json.dumps({"format": FORMAT_NAME, "version": version}))
        with pytest.raises(TLCircuitsError, match="unsupported"):
            load_graph(path)


# ---- the seal --------------------------------------------------------------------------


def _flip(path: Path, byte: int, bit: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))
    return original


@pytest.mark.parametrize("make", [make_graph, causal_graph], ids=["dense", "causal"])
def test_one_flipped_bit_is_caught(tmp_path, make):
    graph = make()
    path = save_graph(graph, tmp_path / "g")
    tensor_file = tensor_path(path)
    size = tensor_file.stat().st_size
    rng = random.Random(0)
    positions = list(range(min(size, 64))) + rng.sample(range(size), min(size, 300))
    for byte in positions:
        original = _flip(tensor_file, byte, rng.randrange(8))
        with pytest.raises(TLCircuitsError, match="corrupted"):
            load_graph(path)
        tensor_file.write_bytes(original)
    assert graphs_equal(graph, load_graph(path))


@pytest.mark.parametrize("make", [make_graph, causal_graph], ids=["dense", "causal"])
def test_one_flipped_bit_is_caught_single_file(tmp_path, make):
    """The single-file layout: every bit of the file is covered (tensors by the digest,
    the header text by its sha256, the rest by safetensors' own structure)."""
    graph = make()
    path = save_graph(graph, tmp_path / "g.safetensors")
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(1)
    positions = list(range(header_end)) + rng.sample(range(header_end, len(data)), 200)
    for byte in positions:
        original = _flip(path, byte, rng.randrange(8))
        with pytest.raises(TLCircuitsError):
            load_graph(path)
        path.write_bytes(original)
    assert graphs_equal(graph, load_graph(path))


def test_header_and_tensor_file_must_belong_together(tmp_path):
    a, b = causal_graph(0), causal_graph(1)
    pa, pb = save_graph(a, tmp_path / "a"), save_graph(b, tmp_path / "b")
    header_a = json.loads((pa / HEADER_FILE).read_text())
    # b's tensor file under a's name, a's header updated to its sha256: still refused
    tensor_path(pa).write_bytes(tensor_path(pb).read_bytes())
    header_a["tensors_sha256"] = files.sha256_file(tensor_path(pa))
    (pa / HEADER_FILE).write_text(json.dumps(header_a))
    with pytest.raises(TLCircuitsError, match="do not belong together"):
        load_graph(pa)
    # a changed header (seal left as it was)
    header_b = json.loads((pb / HEADER_FILE).read_text())
    for key, value in (("token_strings", ["x"] * 5), ("info", {"seed": 5})):
        (pb / HEADER_FILE).write_text(json.dumps({**header_b, key: value}))
        with pytest.raises(TLCircuitsError, match="modified or corrupted"):
            load_graph(pb)
    for key, value, message in (
        ("tensor_file", "../a/" + header_b["tensor_file"], "tensor_file"),
        ("tensors_sha256", 5, "sha256 hex string"),
        ("id", "0" * 64, "tensor_file"),
    ):
        (pb / HEADER_FILE).write_text(json.dumps({**header_b, key: value}))
        with pytest.raises(TLCircuitsError, match=message):
            load_graph(pb)
    (pb / HEADER_FILE).write_text(json.dumps(header_b))
    tensor_path(pb).unlink()
    with pytest.raises(TLCircuitsError, match="incomplete"):
        load_graph(pb)


def test_graph_id_is_content_id(tmp_path):
    graph = causal_graph(0)
    path = save_graph(graph, tmp_path / "g")
    header = json.loads((path / HEADER_FILE).read_text())
    assert header["version"] == 2 and header["id"] == graph_id(graph)
    assert header["tensor_file"] == f"tensors.{header['id'][:32]}.safetensors"
    loaded = load_graph(path)
    assert graph_id(loaded) == graph_id(graph) != graph_id(causal_graph(1))
    assert files.saved_graph_id(path) == graph_id(graph)


# ---- re-saves: other files survive, stale files go -------------------------------------


def test_resave_keeps_other_files_and_removes_stale_ones(tmp_path):
    from tl_circuits.attention.heads.loadings import FILE_NAME, HeadLoadings

    a, b = causal_graph(0), causal_graph(1)
    path = save_graph(a, tmp_path / "g")
    edges = (a.adjacency != 0).nonzero()[:3]
    hl = HeadLoadings(
        edges=edges,
        edge_values=a.adjacency[edges[:, 0], edges[:, 1]],
        loadings=torch.zeros(3, 2, 1),
        bypass=torch.zeros(3, 2),
        crossed=torch.zeros(3, 2, dtype=torch.bool),
    )
    hl.save(path)
    (path / "notes.txt").write_text("mine")
    # leftovers of an interrupted save (killed: no cleanup ran), and a running writer's
    dead, alive = 2**22 + 17, os.getpid()  # (above Linux's largest pid: not running)
    orphan = "tensors.0123456789abcdef0123456789abcdef.safetensors"
    (path / f"{_tmp_prefix(HEADER_FILE, dead)}abc123.tmp").write_text("partial")
    (path / f"{_tmp_prefix(orphan, dead)}xyz.tmp").write_text("p")
    running = path / f"{_tmp_prefix(orphan, alive)}xyz.tmp"
    running.write_text("being written")
    (path / "tensors.0123456789abcdef0123456789abcdef.safetensors").write_text("orphan")
    (path / TENSOR_FILE).write_text("version-1 leftover")
    save_graph(b, path)
    names = {p.name for p in path.iterdir()}
    assert names == {HEADER_FILE, tensor_path(path).name, FILE_NAME, "notes.txt", running.name}
    running.unlink()
    assert graphs_equal(b, load_graph(path))
    # the loadings recorded a's id: refused for b (whatever the edge values), fine for a
    with pytest.raises(TLCircuitsError, match="another graph"):
        HeadLoadings.load(path, graph=load_graph(path))
    assert HeadLoadings.load(path, graph=a).n_edges == 3
    # saving the same graph again keeps its id, so its loadings stay valid
    save_graph(a, path)
    assert HeadLoadings.load(path, graph=load_graph(path)).n_edges == 3
    # loadings saved with an explicit graph record that graph's id
    hl.save(tmp_path / "hl.safetensors", graph=a)
    with pytest.raises(TLCircuitsError, match=r"graph with id .* another graph"):
        HeadLoadings.load(tmp_path / "hl.safetensors", graph=b)


def test_failed_save_leaves_no_tmp_files(tmp_path, monkeypatch):
    a, b = causal_graph(0), causal_graph(1)
    path = save_graph(a, tmp_path / "g")
    before = {p.name for p in path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        save_graph(b, path)
    assert {p.name for p in path.iterdir()} == before
    assert graphs_equal(a, load_graph(path))


# ---- causal graphs: blocks on load, memory checks --------------------------------------


@pytest.mark.parametrize("density", [0.9, 0.05])
@pytest.mark.parametrize("single_file", [False, True])
def test_causal_round_trip_without_densifying(tmp_path, density, single_file):
    graph = causal_graph(3, density=density)
    path = save_graph(graph, tmp_path / ("g.safetensors" if single_file else "g"))
    loaded = load_graph(path)
    assert isinstance(loaded.edges, CausalAdjacency) and loaded._dense is None
    for x, y in zip(graph.edges.groups, loaded.edges.groups, strict=True):
        assert torch.equal(x.rows, y.rows) and torch.equal(x.cols, y.cols)
        assert torch.equal(x.values, y.values)
        assert torch.equal(x.values.signbit(), y.values.signbit())
    assert graphs_equal(graph, loaded)
    # pruning and scores run on the loaded blocks
    assert loaded.prune(0.8, 0.9).n_nodes <= loaded.n_nodes
    assert loaded.scores() == graph.scores()


def test_edges_that_cannot_exist_are_refused(tmp_path):
    graph = causal_graph(0, density=0.05)
    path = save_graph(graph, tmp_path / "g")
    tensors, header = read_folder(path)
    assert header["adjacency"] == {**header["adjacency"], "edges": "causal", "layout": "sparse"}
    n = graph.n_nodes
    # an edge from feature 1 into feature 0 (a feature of a later layer cannot feed it)
    src = int((graph.nodes.layer >= graph.nodes.layer[0]).nonzero()[1, 0])
    flat = torch.tensor([0 * n + src])
    index = torch.cat([tensors["adjacency.index"], flat])
    index, order = torch.sort(index)
    tensors["adjacency.index"] = index
    tensors["adjacency.values"] = torch.cat([tensors["adjacency.values"], torch.ones(1)])[order]
    write_v2(path, tensors, header)
    with pytest.raises(TLCircuitsError, match=rf"edge \(0, {src}\) cannot exist"):
        load_graph(path)
    # into a token node (no inputs at all)
    tensors, header = read_folder(save_graph(graph, tmp_path / "fresh"))
    write_v2(path, *_with_entry(tensors, header, int(graph.indices("token")[0]) * n))
    with pytest.raises(TLCircuitsError, match="cannot exist"):
        load_graph(path)


def _with_entry(tensors, header, flat):
    index = tensors["adjacency.index"]
    keep = index != flat
    index, order = torch.sort(torch.cat([index[keep], torch.tensor([flat])]))
    values = torch.cat([tensors["adjacency.values"][keep], torch.ones(1)])[order]
    return {**tensors, "adjacency.index": index, "adjacency.values": values}, header


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_adj("edges", "weird"), r"adjacency\.edges must be 'causal' or 'dense'"),
        (_adj("layout", "dense"), r"unknown adjacency layout 'dense' for causal edges"),
        (_tensor("edges.block.0", lambda x: x[:, :-1]), r"edges\.block\.0 has shape"),
        (_tensor("edges.block.1", lambda x: x.double()), r"edges\.block\.1 has shape .* dtype"),
        (_drop_tensor("edges.block.2"), r"lacks the tensor 'edges\.block\.2'"),
    ],
)
def test_corrupted_blocks_are_refused(tmp_path, mutate, message):
    path = save_graph(causal_graph(0, density=0.9), tmp_path / "g")
    tensors, header = read_folder(path)
    assert header["adjacency"]["layout"] == "blocks"
    mutate(tensors, header)
    write_v2(path, tensors, header)
    with pytest.raises(TLCircuitsError, match=message):
        load_graph(path)


def _wide_graph(n_nodes: int) -> AttributionGraph:
    """``n_nodes`` nodes, nearly all layer-0 features (whose causal sources are the
    tokens): small causal blocks, a huge dense matrix."""
    n_pos, n_t = 10, 1
    n_f = n_nodes - n_pos - n_t
    kind = torch.cat([torch.zeros(n_f), torch.full((n_pos,), 2), torch.full((n_t,), 3)]).long()
    layer = torch.cat([torch.zeros(n_f), torch.full((n_pos,), -1), torch.ones(n_t)]).long()
    pos = torch.cat([torch.arange(n_f) % n_pos, torch.arange(n_pos), torch.tensor([9])])
    pos = torch.sort(pos[:n_f]).values.tolist() + pos[n_f:].tolist()
    pos = torch.tensor(pos)
    feature = torch.cat([torch.arange(n_f), torch.full((n_pos + n_t,), -1)])
    nodes = NodeTable(kind, layer, pos, feature, torch.ones(n_nodes))
    edges = CausalAdjacency.from_groups(n_nodes, causal_groups(kind, layer, pos))
    edges.groups[0].values[0, 0] = 0.5
    edges.groups[-1].values[0, :3] = torch.tensor([1.0, -2.0, -0.0])
    return AttributionGraph(
        nodes=nodes,
        edges=edges,
        row_values=torch.zeros(n_nodes),
        constants=torch.zeros(n_nodes),
        targets=[Target("direction", "d", 9, torch.ones(4))],
        tokens=torch.arange(n_pos),
        token_strings=[str(i) for i in range(n_pos)],
        excluded=empty_nodes(),
        info={"n_layers": 1, "d_model": 4},
    )


def test_tiny_file_of_20000_nodes(tmp_path, monkeypatch):
    """The issue's case: a sub-megabyte file of 20,000 nodes. As a causal graph it loads
    as small blocks (never densified); claiming dense edges it is refused before the
    1.6 GB matrix is allocated."""
    n = 20_000
    graph = _wide_graph(n)
    path = save_graph(graph, tmp_path / "g")
    assert tensor_path(path).stat().st_size < 1_000_000
    loaded = load_graph(path, max_memory_bytes=64 * 2**20)
    assert isinstance(loaded.edges, CausalAdjacency) and loaded._dense is None
    assert loaded.edges.nbytes < 2 * 2**20
    assert float(loaded.edges.groups[-1].values[0, 1]) == -2.0
    # the same entries claimed as dense edges (and version 1: no causal layout recorded,
    # with one entry outside the causal blocks so it cannot be laid out as them)
    tensors, header = read_folder(path)
    tensors, header = _with_entry(tensors, header, 1)  # feature 0 <- feature 1
    header["adjacency"]["edges"] = "dense"
    for write in (write_v2, write_v1):
        write(path, tensors, header)
        with pytest.raises(TLCircuitsError, match=r"dense \[20000, 20000\] .* refused before"):
            load_graph(path, max_memory_bytes=256 * 2**20)
        # the default limit is half the available memory
        monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 2**30)
        with pytest.raises(TLCircuitsError, match=r"memory limit of 512\.0 MiB"):
            load_graph(path)
        monkeypatch.undo()
    # causal blocks claimed beyond the limit are refused too
    write_v2(path, *read_folder(save_graph(graph, tmp_path / "h")))
    with pytest.raises(TLCircuitsError, match="causal blocks would need"):
        load_graph(path, max_memory_bytes=2**20)
    with pytest.raises(TLCircuitsError, match="max_memory_bytes must be a positive integer"):
        load_graph(path, max_memory_bytes=0)
