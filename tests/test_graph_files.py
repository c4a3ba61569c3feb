"""Saving, loading and the frontend JSON export of attribution graphs (DESIGN.md §6).

Graphs are hand-made here (no model), so these tests do not depend on graph building.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tl_circuits.errors import NonFiniteError, TLCircuitsError
from tl_circuits.graph.files import (
    FORMAT_NAME,
    HEADER_FILE,
    METADATA_KEY,
    load_graph,
    save_graph,
    tensor_path,
)
from tl_circuits.graph.frontend import frontend_json
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.graph.nodes import NodeTable, Target, empty_nodes

N_LAYERS = 3
D_MODEL = 8
PROMPT = "Say \"hi\" <script>alert('x')</script>\n & done"
TOKEN_STRINGS = ["Say", ' "hi"', " <script>", "alert('x')", "</script>\n", " & done"]
TOKENS = [11, 22, 33, 44, 33, 55]  # token 33 twice: token node ids still differ by pos


def make_graph(
    dtype: torch.dtype = torch.float32,
    density: float = 0.3,
    seed: int = 0,
    excluded: NodeTable | None = None,
) -> AttributionGraph:
    """5 features, 3 errors, 6 tokens, 2 targets (a logit and a logit difference)."""
    g = torch.Generator().manual_seed(seed)
    n_pos = len(TOKENS)
    last = n_pos - 1
    feats = [(0, 1, 7), (0, 3, 2), (1, 2, 7), (2, 4, 100), (2, 5, 7)]  # (layer, pos, feature)
    errors = [(0, 1), (1, 2), (2, 5)]
    kind = [0] * len(feats) + [1] * len(errors) + [2] * n_pos + [3, 3]
    layer = [f[0] for f in feats] + [e[0] for e in errors] + [-1] * n_pos + [N_LAYERS] * 2
    pos = [f[1] for f in feats] + [e[1] for e in errors] + list(range(n_pos)) + [last, last]
    feature = [f[2] for f in feats] + [-1] * (len(errors) + n_pos + 2)
    n = len(kind)
    activation = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) + 0.1
    nodes = NodeTable(
        torch.tensor(kind),
        torch.tensor(layer),
        torch.tensor(pos),
        torch.tensor(feature),
        activation,
    )

    # sources: features, errors, tokens; rows: features and targets (lower-triangular-ish)
    adjacency = torch.randn(n, n, generator=g, dtype=torch.float64).to(dtype)
    keep = torch.rand(n, n, generator=g) < density
    is_source = torch.tensor(kind) < 3
    has_inputs = (torch.tensor(kind) == 0) | (torch.tensor(kind) == 3)
    keep &= is_source[None, :] & has_inputs[:, None]
    keep &= torch.arange(n)[None, :] != torch.arange(n)[:, None]
    adjacency = torch.where(keep, adjacency, torch.zeros((), dtype=dtype))
    row_values = torch.zeros(n, dtype=dtype)
    constants = torch.zeros(n, dtype=dtype)
    rows = has_inputs
    constants[rows] = torch.randn(int(rows.sum()), generator=g, dtype=torch.float64).to(dtype)
    row_values[rows] = adjacency[rows].sum(1) + constants[rows]

    targets = [
        Target(
            kind="logit",
            label=" Paris",
            pos=last,
            vector=torch.randn(D_MODEL, generator=g, dtype=torch.float64).to(dtype),
            token=123,
            probability=0.61234,
            weight=0.61234,
        ),
        Target(
            kind="logit_diff",
            label="' Paris' - ' London'",
            pos=last,
            vector=torch.randn(D_MODEL, generator=g, dtype=torch.float64).to(dtype),
            tokens=(123, 456),
            weight=0.5,
        ),
    ]
    return AttributionGraph(
        nodes=nodes,
        edges=adjacency,
        row_values=row_values,
        constants=constants,
        targets=targets,
        tokens=torch.tensor(TOKENS),
        token_strings=list(TOKEN_STRINGS),
        excluded=excluded if excluded is not None else empty_nodes(),
        info={
            "n_layers": N_LAYERS,
            "model_name": "toy-model",
            "prompt": PROMPT,
            "options": {"max_feature_nodes": None, "batch": [1, 2]},
        },
    )


def assert_graphs_equal(a: AttributionGraph, b: AttributionGraph) -> None:
    for prefix in ("nodes", "excluded"):
        for col in ("kind", "layer", "pos", "feature", "activation"):
            x, y = getattr(getattr(a, prefix), col), getattr(getattr(b, prefix), col)
            assert x.dtype == y.dtype, (prefix, col)
            assert torch.equal(x, y), (prefix, col)
    for name in ("adjacency", "row_values", "constants", "tokens"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert torch.equal(a.adjacency.signbit(), b.adjacency.signbit())
    assert len(a.targets) == len(b.targets)
    for s, t in zip(a.targets, b.targets, strict=True):
        assert (s.kind, s.label, s.pos, s.token, s.tokens, s.weight) == (
            t.kind,
            t.label,
            t.pos,
            t.token,
            t.tokens,
            t.weight,
        )
        assert s.probability == t.probability or (
            math.isnan(s.probability) and math.isnan(t.probability)
        )
        assert s.vector.dtype == t.vector.dtype and torch.equal(s.vector, t.vector)
    assert a.token_strings == b.token_strings
    assert a.info == b.info
    assert b.context is None


# ---- save / load -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [1.0, 0.05])
@pytest.mark.parametrize("single_file", [False, True])
def test_round_trip_exact(tmp_path, dtype, density, single_file):
    excluded = NodeTable(
        torch.tensor([0, 0]),
        torch.tensor([1, 2]),
        torch.tensor([0, 3]),
        torch.tensor([9, 10]),
        torch.tensor([0.01, 0.02], dtype=dtype),
    )
    graph = make_graph(dtype, density, excluded=excluded if density < 1 else None)
    if density == 1.0:  # every entry nonzero: stored dense
        graph = graph.with_adjacency(torch.randn(graph.n_nodes, graph.n_nodes, dtype=dtype))
    graph.adjacency[5, 0] = -0.0  # a negative zero survives the sparse layout bit for bit
    path = tmp_path / ("g.safetensors" if single_file else "g")
    assert save_graph(graph, path) == path
    if single_file:
        assert path.is_file()
    else:
        assert {p.name for p in path.iterdir()} == {HEADER_FILE, tensor_path(path).name}
        header = json.loads((path / HEADER_FILE).read_text())
        assert header["format"] == FORMAT_NAME and header["version"] == 2
        assert header["adjacency"]["layout"] == ("dense" if density == 1.0 else "sparse")
    loaded = AttributionGraph.load(path)
    assert_graphs_equal(graph, loaded)


def test_sparse_adjacency_keeps_files_small(tmp_path):
    n = 400
    graph = make_graph()
    big = torch.zeros(n, n)
    big[torch.arange(1, n), torch.arange(n - 1)] = torch.randn(n - 1)
    sizes = {}
    for name, adj in (("sparse", big), ("dense", torch.randn(n, n))):
        save_graph(_with_n_nodes(graph, adj), tmp_path / name)
        sizes[name] = tensor_path(tmp_path / name).stat().st_size
        assert torch.equal(load_graph(tmp_path / name).adjacency, adj)
    assert sizes["sparse"] < 0.05 * sizes["dense"]


def _with_n_nodes(graph: AttributionGraph, adjacency: torch.Tensor) -> AttributionGraph:
    """A graph of ``len(adjacency)`` feature nodes with no targets."""
    n = adjacency.shape[0]
    z = torch.zeros(n, dtype=torch.long)
    nodes = NodeTable(z, z.clone(), torch.arange(n) % len(TOKENS), torch.arange(n), torch.ones(n))
    return AttributionGraph(
        nodes=nodes,
        edges=adjacency,
        row_values=torch.zeros(n),
        constants=torch.zeros(n),
        targets=[],
        tokens=graph.tokens,
        token_strings=graph.token_strings,
        excluded=empty_nodes(),
        info={"n_layers": 1},
    )


def test_nan_probability_and_save_does_not_modify_graph(tmp_path):
    graph = make_graph()
    before = graph.adjacency.clone()
    save_graph(graph, tmp_path / "g")
    loaded = load_graph(tmp_path / "g")
    assert math.isnan(loaded.targets[1].probability)
    assert torch.equal(graph.adjacency, before)
    # saving again over the same directory works and stays exact
    save_graph(loaded, tmp_path / "g")
    assert_graphs_equal(graph, load_graph(tmp_path / "g"))


def test_load_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_graph(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        load_graph(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_graph(tmp_path / "empty")


def test_load_non_graph_inputs(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(TLCircuitsError, match=r"no graph\.json"):
        load_graph(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(TLCircuitsError, match="safetensors"):
        load_graph(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain), metadata={"foo": "bar"})
    with pytest.raises(TLCircuitsError, match="not a saved tl_circuits graph"):
        load_graph(plain)
    # a pickle is never read
    pkl = tmp_path / "g.pt"
    torch.save({"adjacency": torch.zeros(2, 2)}, pkl)
    with pytest.raises(TLCircuitsError):
        load_graph(pkl)


def test_wrong_format_and_version(tmp_path):
    path = save_graph(make_graph(), tmp_path / "g")
    header = json.loads((path / HEADER_FILE).read_text())
    for change, pattern in (
        ({"version": 3}, "unsupported .* version 3"),
        ({"version": "1"}, "unsupported"),
        ({"format": "something.else"}, "format is 'something.else'"),
    ):
        (path / HEADER_FILE).write_text(json.dumps({**header, **change}))
        with pytest.raises(TLCircuitsError, match=pattern):
            load_graph(path)
    (path / HEADER_FILE).write_text("{not json")
    with pytest.raises(TLCircuitsError, match="not valid JSON"):
        load_graph(path)

    from safetensors import safe_open
    from safetensors.torch import save_file

    single = save_graph(make_graph(), tmp_path / "g.safetensors")
    with safe_open(str(single), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[METADATA_KEY])
    save_file(tensors, str(single), metadata={METADATA_KEY: json.dumps({**meta, "version": 7})})
    with pytest.raises(TLCircuitsError, match="version 7"):
        load_graph(single)


def test_missing_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file

    from tl_circuits.graph.files import _write_directory

    path = save_graph(make_graph(), tmp_path / "g")
    tensors = load_file(str(tensor_path(path)))
    del tensors["targets.1.vector"]
    # re-sealed, so that the missing tensor (not the checksum) is what loading finds
    _write_directory(path, tensors, json.loads((path / HEADER_FILE).read_text()))
    with pytest.raises(TLCircuitsError, match=r"targets\.1\.vector"):
        load_graph(path)


def test_save_rejects_bad_graphs(tmp_path):
    graph = make_graph()
    graph.info["not_json"] = object()
    with pytest.raises(TLCircuitsError, match="JSON"):
        save_graph(graph, tmp_path / "g")
    graph = make_graph()
    graph.targets.pop()
    with pytest.raises(TLCircuitsError, match="target"):
        save_graph(graph, tmp_path / "g2")


# ---- frontend JSON -----------------------------------------------------------------------

NODE_ID = r"(-?\d+_-?\d+_\d+|E_\d+_\d+|\d+_(\d+|diff-?\d+--?\d+|dir\d+)(-\d+)?_\d+)"
FRONTEND_SCHEMA = {
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links", "extra"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": [
                "slug",
                "scan",
                "transcoder_list",
                "prompt_tokens",
                "prompt",
                "schema_version",
            ],
            "properties": {
                "slug": {"type": "string", "minLength": 1},
                "scan": {"type": "string"},
                "transcoder_list": {"type": "array", "items": {"type": "string"}},
                "prompt_tokens": {"type": "array", "items": {"type": "string"}},
                "prompt": {"type": "string"},
                "node_threshold": {"type": "number"},  # left out when not given
                "schema_version": {"type": "integer"},
                "info": {"type": "object"},
            },
        },
        "qParams": {
            "type": "object",
            "required": ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"],
            "properties": {
                "pinnedIds": {"type": "array", "items": {"type": "string"}},
                "supernodes": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "string"}},
                },
                "linkType": {"type": "string"},
                "clickedId": {"type": "string"},
                "sg_pos": {"type": "string"},
                "sparsityThreshold": {"type": "number"},
            },
        },
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "node_id",
                    "feature",
                    "layer",
                    "ctx_idx",
                    "feature_type",
                    "token_prob",
                    "is_target_logit",
                    "run_idx",
                    "reverse_ctx_idx",
                    "jsNodeId",
                    "clerp",
                    "influence",
                    "activation",
                ],
                "properties": {
                    "node_id": {"type": "string", "pattern": f"^{NODE_ID}$"},
                    "feature": {"type": "integer"},
                    "layer": {"type": "string"},
                    "ctx_idx": {"type": "integer", "minimum": 0},
                    "feature_type": {
                        "enum": [
                            "cross layer transcoder",
                            "mlp reconstruction error",
                            "embedding",
                            "logit",
                        ]
                    },
                    "token_prob": {"type": "number"},
                    "is_target_logit": {"type": "boolean"},
                    "run_idx": {"type": "integer"},
                    "reverse_ctx_idx": {"type": "integer"},
                    "jsNodeId": {"type": "string", "minLength": 1},
                    "clerp": {"type": "string"},
                    "influence": {"type": ["number", "null"]},
                    "activation": {"type": ["number", "null"]},
                },
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "weight"],
                "additionalProperties": False,
                "properties": {
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                    "weight": {"type": "number"},
                },
            },
        },
        "extra": {
            "type": "object",
            "required": ["tl_circuits"],
            "properties": {
                "tl_circuits": {
                    "type": "object",
                    "required": ["version", "head_loadings", "qk"],
                    "properties": {"version": {"const": 1}},
                }
            },
        },
    },
}


def validate(doc: dict) -> None:
    """Validate against FRONTEND_SCHEMA (jsonschema if installed, else a small checker)."""
    try:
        import jsonschema
    except ImportError:
        _mini_validate(doc, FRONTEND_SCHEMA, "$")
    else:
        jsonschema.validate(doc, FRONTEND_SCHEMA)


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "number": (int, float),
    "integer": int,
}


def _mini_validate(x, schema: dict, where: str) -> None:
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(x, _TYPES[t]) and not (t in ("number", "integer") and isinstance(x, bool))
            for t in names
        )
        assert ok, f"{where}: {x!r} is not {names}"
    if "enum" in schema:
        assert x in schema["enum"], f"{where}: {x!r} not in {schema['enum']}"
    if "const" in schema:
        assert x == schema["const"], where
    if "pattern" in schema:
        assert re.search(schema["pattern"], x), f"{where}: {x!r} !~ {schema['pattern']}"
    if isinstance(x, dict):
        for key in schema.get("required", []):
            assert key in x, f"{where}: missing {key!r}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(x) <= set(props), f"{where}: extra keys {set(x) - set(props)}"
        for key, sub in props.items():
            if key in x:
                _mini_validate(x[key], sub, f"{where}.{key}")
    if isinstance(x, list) and "items" in schema:
        for i, item in enumerate(x):
            _mini_validate(item, schema["items"], f"{where}[{i}]")


def test_mini_validator_catches_errors():
    doc = frontend_json(make_graph())
    _mini_validate(doc, FRONTEND_SCHEMA, "$")
    bad = json.loads(json.dumps(doc))
    bad["links"][0]["weight"] = "1.0"
    with pytest.raises(AssertionError):
        _mini_validate(bad, FRONTEND_SCHEMA, "$")
    del bad["metadata"]["scan"]
    with pytest.raises(AssertionError):
        _mini_validate(bad, FRONTEND_SCHEMA, "$")


@pytest.mark.parametrize("density", [1.0, 0.2])
def test_export_schema_ids_and_links(tmp_path, density):
    graph = make_graph(density=density)
    out = tmp_path / "my-graph.json"
    doc = graph.to_json(out, node_threshold=0.8)
    on_disk = json.loads(out.read_text(encoding="utf-8"))
    assert on_disk == doc
    validate(on_disk)

    nodes = on_disk["nodes"]
    ids = [node["node_id"] for node in nodes]
    assert len(ids) == graph.n_nodes == len(set(ids))
    id_set = set(ids)
    links = on_disk["links"]
    assert all(link["source"] in id_set and link["target"] in id_set for link in links)
    assert len(links) == int((graph.adjacency != 0).sum())
    # each link is adjacency[target, source]
    index = {nid: i for i, nid in enumerate(ids)}
    for link in links:
        w = graph.adjacency[index[link["target"]], index[link["source"]]]
        assert link["weight"] == float(w) != 0

    assert on_disk["metadata"]["slug"] == "my-graph"
    assert on_disk["metadata"]["scan"] == "toy-model"
    assert on_disk["metadata"]["node_threshold"] == 0.8
    assert on_disk["metadata"]["prompt_tokens"][4] == "</script>⏎"
    assert on_disk["extra"]["tl_circuits"]["head_loadings"] is None
    assert on_disk["extra"]["tl_circuits"]["qk"] is None


def test_node_ids_follow_design():
    graph = make_graph()
    nodes = frontend_json(graph)["nodes"]
    L1 = N_LAYERS + 1
    ids = [n["node_id"] for n in nodes]
    assert ids[:5] == ["0_7_1", "0_2_3", "1_7_2", "2_100_4", "2_7_5"]
    assert ids[5:8] == ["0_-1_1", "1_-1_2", "2_-1_5"]
    assert ids[8:14] == [f"E_{t}_{p}" for p, t in enumerate(TOKENS)]
    assert ids[14] == f"{L1}_123_5"
    assert ids[15] == f"{L1}_diff123-456_5"
    types = [n["feature_type"] for n in nodes]
    assert types == (
        ["cross layer transcoder"] * 5
        + ["mlp reconstruction error"] * 3
        + ["embedding"] * 6
        + ["logit"] * 2
    )
    assert [n["layer"] for n in nodes[8:14]] == ["E"] * 6
    assert nodes[14]["layer"] == str(L1) and nodes[14]["feature"] == 123
    assert [n["ctx_idx"] for n in nodes[:5]] == [1, 3, 2, 4, 5]
    assert nodes[0]["activation"] == pytest.approx(float(graph.nodes.activation[0]))
    assert nodes[14]["is_target_logit"] and not nodes[15]["is_target_logit"]


def test_logit_clerp_format():
    nodes = frontend_json(make_graph())["nodes"]
    assert nodes[14]["clerp"] == 'Output " Paris" (p=0.612)'
    assert nodes[14]["token_prob"] == pytest.approx(0.61234)
    assert re.fullmatch(r'Output ".*" \(p=\d\.\d{3}\)', nodes[14]["clerp"])
    # a decoder, when given, names the token
    nodes = frontend_json(make_graph(), decode=lambda t: {123: "\n", 456: "b"}[t])["nodes"]
    assert nodes[14]["clerp"] == 'Output "⏎" (p=0.612)'
    assert nodes[15]["clerp"] == 'Logit diff "⏎" - "b"'


def test_custom_target_ids_unique():
    graph = make_graph()
    # a direction target and a repeated logit target
    t0, t1 = graph.targets
    direction = Target(kind="direction", label="my direction", pos=t0.pos, vector=t0.vector)
    n = graph.n_nodes
    nodes = NodeTable(
        *(
            torch.cat([getattr(graph.nodes, c), getattr(graph.nodes, c)[-2:]])
            for c in ("kind", "layer", "pos", "feature", "activation")
        )
    )
    adj = torch.zeros(n + 2, n + 2)
    adj[:n, :n] = graph.adjacency
    adj[n, 0] = 1.0
    adj[n + 1, 1] = 2.0
    big = AttributionGraph(
        nodes=nodes,
        edges=adj,
        row_values=torch.zeros(n + 2),
        constants=torch.zeros(n + 2),
        targets=[t0, t1, t0, direction],
        tokens=graph.tokens,
        token_strings=graph.token_strings,
        excluded=graph.excluded,
        info=graph.info,
    )
    doc = frontend_json(big)
    validate(doc)
    ids = [node["node_id"] for node in doc["nodes"]]
    assert len(set(ids)) == len(ids)
    assert ids[-4:] == ["4_123_5", "4_diff123-456_5", "4_123-2_5", "4_dir3_5"]
    assert len(doc["links"]) == int((adj != 0).sum())
    assert [t["node_id"] for t in doc["extra"]["tl_circuits"]["targets"]] == ids[-4:]


def test_prompt_is_plain_data(tmp_path):
    graph = make_graph()
    out = tmp_path / "g.json"
    frontend_json(graph, out)
    text = out.read_text(encoding="utf-8")
    doc = json.loads(text)
    assert doc["metadata"]["prompt"] == PROMPT
    assert [s.replace("⏎", "\n") for s in doc["metadata"]["prompt_tokens"]] == TOKEN_STRINGS
    assert doc["extra"]["tl_circuits"]["graph_info"]["prompt"] == PROMPT
    # JSON escaping only: the quotes are escaped, nothing is HTML-escaped
    assert json.dumps(PROMPT) in text
    assert "&lt;" not in text and "&amp;" not in text
    # without info["prompt"] the prompt falls back to the joined token strings
    graph.info.pop("prompt")
    assert frontend_json(graph)["metadata"]["prompt"] == "".join(TOKEN_STRINGS)


def test_export_options_and_extra(tmp_path):
    graph = make_graph()
    influence = torch.linspace(0, 1, graph.n_nodes)
    influence[3] = float("nan")
    doc = frontend_json(
        graph,
        slug="s",
        scan="my-scan",
        influence=influence,
        clerps={"0_7_1": "Paris feature"},
        qparams={"pinnedIds": ["0_7_1"], "sparsityThreshold": 0.5},
        extra={
            "head_loadings": {"loadings": torch.ones(2, 3, dtype=torch.float64)},
            "note": (1, float("inf")),
        },
    )
    validate(doc)
    json.dumps(doc, allow_nan=False)
    assert doc["metadata"]["slug"] == "s" and doc["metadata"]["scan"] == "my-scan"
    assert doc["nodes"][0]["clerp"] == "Paris feature"
    assert doc["nodes"][1]["influence"] == pytest.approx(float(influence[1]))
    assert doc["nodes"][3]["influence"] is None
    assert doc["qParams"]["pinnedIds"] == ["0_7_1"]
    assert doc["qParams"]["sparsityThreshold"] == 0.5
    block = doc["extra"]["tl_circuits"]
    assert block["version"] == 1
    assert block["head_loadings"] == {"loadings": [[1.0] * 3] * 2}
    assert block["note"] == [1, None]
    assert block["qk"] is None

    # into a directory: {slug}.json plus the local server's graph-metadata.json index
    frontend_json(graph, tmp_path, slug="first")
    frontend_json(graph, tmp_path, slug="second")
    frontend_json(graph, tmp_path, slug="first")
    assert json.loads((tmp_path / "first.json").read_text())["metadata"]["slug"] == "first"
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == ["first", "second"]


def test_export_defaults_without_info():
    graph = make_graph()
    graph.info = {}
    doc = frontend_json(graph)
    validate(doc)
    assert doc["metadata"]["scan"] == "unknown"
    assert re.fullmatch(r"[a-z0-9-]+", doc["metadata"]["slug"])
    # n_layers inferred from the target nodes' layer
    assert doc["nodes"][14]["node_id"] == f"{N_LAYERS + 1}_123_5"


def test_export_rejects_non_finite_edges():
    graph = make_graph(density=1.0)
    graph.adjacency[0, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"adjacency\[0, 5\]"):
        frontend_json(graph)
