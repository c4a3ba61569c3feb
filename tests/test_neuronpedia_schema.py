"""The frontend JSON we write validates against Neuronpedia's published graph schema
(issue 13 item 8).

``tests/data/neuronpedia-graph-schema.json`` is ``apps/webapp/app/api/graph/graph-schema.json``
of hijohnnylin/neuronpedia, copied byte for byte (provenance: ``tests/data/README.md``).
Neuronpedia compiles it with Ajv (draft-07) to check uploads; here it is applied with the
validator of the draft it declares, to what ``AttributionGraph.to_json``,
``tl_circuits.export_json`` and ``tl-circuits trace`` write.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens

import tl_circuits
from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph.pruning import node_influence

SCHEMA_PATH = Path(__file__).parent / "data" / "neuronpedia-graph-schema.json"
#: git blob id of the published file at neuronpedia commit ebb8426 (tests/data/README.md)
SCHEMA_BLOB = "34ee1188707979f8b03420c900fdfa188055338a"
#: what Neuronpedia's upload route (save-to-db) requires of slug and scan beyond the schema
UPLOAD_NAME = r"^[a-zA-Z0-9_.-]+$"


@functools.cache
def _schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(doc: Any) -> list[str]:
    errors = _schema_validator().iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def assert_valid(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as a reader gets it (strict JSON), checked against the schema; returned."""
    doc = json.loads(json.dumps(doc, allow_nan=False))
    errors = schema_errors(doc)
    assert not errors, f"{len(errors)} schema errors:\n" + "\n".join(errors[:20])
    # what the viewer needs beyond the schema: unique ids, links between listed nodes
    ids = {node["node_id"] for node in doc["nodes"]}
    assert len(ids) == len(doc["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert "tl_circuits" in doc["extra"]
    return doc


def test_schema_is_the_published_file() -> None:
    data = SCHEMA_PATH.read_bytes()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == SCHEMA_BLOB
    validator = _schema_validator()
    assert type(validator) is jsonschema.Draft7Validator  # the draft it declares
    # it constrains the top level only through its own keys: ours may sit beside them
    assert "additionalProperties" not in validator.schema
    assert set(validator.schema["required"]) == {"metadata", "qParams", "nodes", "links"}


# ---- graphs of random models -------------------------------------------------------------

#: name -> (family, transcoder kind, targets, max_feature_nodes)
CASES: dict[str, tuple[str, str, Callable[[int], list[Any]] | None, int | None]] = {
    "gpt2-plt-default-targets": ("gpt2", "jumprelu_skip", None, None),
    "llama-clt-custom-targets": (
        "llama",
        "clt",
        lambda d: [(3, 9), torch.randn(d, generator=torch.Generator().manual_seed(1))],
        None,
    ),
    "gemma2-budget": ("gemma2", "skip", None, 8),
}


@functools.cache
def _graph(case: str) -> AttributionGraph:
    family, kind, targets, budget = CASES[case]
    model = cached_model(family)
    return AttributionGraph.build(
        model,
        cached_transcoders(family, kind),
        prompt_tokens(),
        targets=targets(model.cfg.d_model) if targets is not None else None,
        max_feature_nodes=budget,
        show_progress=False,
    )


@functools.cache
def _pruned(case: str) -> tuple[AttributionGraph, HeadLoadings]:
    pruned = _graph(case).prune(node_threshold=0.8, edge_threshold=0.95)
    return pruned, HeadLoadings.compute(pruned)


@pytest.mark.parametrize("case", list(CASES))
def test_graph_json_validates(case: str) -> None:
    graph, (pruned, _) = _graph(case), _pruned(case)
    full, small = (assert_valid(g.to_json()) for g in (graph, pruned))
    for g, doc in ((graph, full), (pruned, small)):
        assert len(doc["nodes"]) == g.n_nodes
        assert "node_threshold" not in doc["metadata"]  # optional, and never null
    assert "pruning_settings" not in full["metadata"]
    assert small["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.95}
    budget = CASES[case][3]
    settings = full["metadata"].get("generation_settings")
    assert settings == (None if budget is None else {"max_feature_nodes": budget})
    kinds = {node["feature_type"] for node in full["nodes"]}
    assert kinds == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}


@pytest.mark.parametrize("case", list(CASES))
def test_export_json_with_blocks_validates(case: str, tmp_path: Path) -> None:
    pruned, hl = _pruned(case)
    out = tmp_path / "graph.json"
    doc = tl_circuits.export_json(pruned, out, head_loadings=hl, qk_top_terms=3)
    on_disk = assert_valid(json.loads(out.read_text(encoding="utf-8")))
    assert on_disk == doc
    block = on_disk["extra"]["tl_circuits"]
    assert block["head_loadings"]["links"] and block["qk"]["pairs"]
    # into a directory, with the local server's index beside it
    tl_circuits.export_json(pruned, tmp_path, slug="in-dir", head_loadings=hl)
    assert_valid(json.loads((tmp_path / "in-dir.json").read_text(encoding="utf-8")))


def test_custom_target_nodes() -> None:
    doc = assert_valid(_graph("llama-clt-custom-targets").to_json())
    targets = [node for node in doc["nodes"] if node["feature_type"] == "logit"]
    assert [t["node_id"].split("_")[1] for t in targets] == ["diff3-9", "dir1"]
    assert all(isinstance(t["feature"], int) for t in targets)


def test_clerps_influence_and_threshold() -> None:
    graph = _graph("gpt2-plt-default-targets")
    influence = node_influence(graph.adjacency, graph.indices("target"), graph.target_weights())
    influence[0] = float("nan")  # written as null, which the schema allows here
    first = graph.to_json()["nodes"][1]["node_id"]
    doc = assert_valid(
        graph.to_json(
            influence=influence,
            clerps={first: "my feature"},
            node_threshold=0.6,
            slug="with-options",
            scan="my-model",
            qparams={"pinnedIds": [first], "clickedId": first},
        )
    )
    assert doc["metadata"]["node_threshold"] == 0.6
    assert doc["nodes"][0]["influence"] is None
    assert doc["nodes"][1]["influence"] == pytest.approx(float(influence[1]))
    assert doc["nodes"][1]["clerp"] == "my feature"


# ---- the default model and the CLI -------------------------------------------------------


def test_default_model_graph_validates() -> None:
    from tl_circuits.default import DEFAULT_PROMPTS, load_default_model, load_default_transcoders

    model = load_default_model()
    graph = AttributionGraph.build(
        model,
        load_default_transcoders("per_layer"),
        DEFAULT_PROMPTS["induction"].text,
        show_progress=False,
    )
    doc = assert_valid(graph.to_json(decode=model.to_single_str_token))
    assert doc["metadata"]["prompt_tokens"] == model.to_str_tokens(
        DEFAULT_PROMPTS["induction"].text
    )
    pruned = graph.prune()
    hl = HeadLoadings.compute(pruned)
    assert_valid(tl_circuits.export_json(pruned, head_loadings=hl, qk_top_terms=3))


def test_cli_trace_graph_json_validates(tmp_path: Path) -> None:
    from tl_circuits.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["trace", "--out", str(tmp_path), "--no-picture"]) == 0
    doc = assert_valid(json.loads((tmp_path / "graph.json").read_text(encoding="utf-8")))
    assert "pruning_settings" in doc["metadata"]
    # Neuronpedia's upload route also wants plain slugs and scans
    assert all(re.fullmatch(UPLOAD_NAME, doc["metadata"][k]) for k in ("slug", "scan"))


# ---- the schema is really applied --------------------------------------------------------


DELETE = object()


@functools.cache
def _valid_doc() -> dict[str, Any]:
    return assert_valid(_pruned("gpt2-plt-default-targets")[0].to_json())


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split("/")

    def change(doc: dict[str, Any]) -> None:
        obj: Any = doc
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else obj[p]
        if value is DELETE:
            del obj[last]
        else:
            obj[int(last) if isinstance(obj, list) else last] = value

    return change


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (_set("nodes/0/feature", "7"), "nodes/0/feature"),  # a string where an int goes
        (_set("nodes/0/ctx_idx", 1.5), "nodes/0/ctx_idx"),
        (_set("nodes/0/clerp", DELETE), "nodes/0"),  # a required field missing
        (_set("nodes/0/influence", "high"), "nodes/0/influence"),
        (_set("links/0/weight", "0.5"), "links/0/weight"),
        (_set("metadata/node_threshold", None), "metadata/node_threshold"),  # the old output
        (_set("metadata/prompt_tokens", "a b"), "metadata/prompt_tokens"),
        (_set("qParams", DELETE), "<root>"),
    ],
)
def test_schema_rejects_bad_documents(change: Callable[[dict[str, Any]], None], where: str):
    doc = copy.deepcopy(_valid_doc())
    assert doc["links"]
    change(doc)
    errors = schema_errors(doc)
    assert len(errors) == 1 and errors[0].startswith(f"{where}: "), errors
