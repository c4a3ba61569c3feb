"""The interactive viewer's backend (issue 15): the viewer document, feature cards and the
self-contained HTML page (the server: test_viewer_backend_server.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tl_circuits.attention.heads.loadings import HeadLoadings
from tl_circuits.cli import main
from tl_circuits.cli.options import strongest_edges
from tl_circuits.default import DEFAULT_PROMPTS, load_default_model, load_default_transcoders
from tl_circuits.default.cards import CARD_K, CARD_WINDOW, load_default_feature_cards
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph import AttributionGraph
from tl_circuits.testing import random_model
from tl_circuits.transcoders.feature_cards import (
    FeatureCards,
    feature_activations,
    top_activating_contexts,
)
from tl_circuits.viewer.data import check_annotations, viewer_document
from tl_circuits.viewer.html import self_contained_html

XSS = "</script><script>window.__xss=1</script>"


@pytest.fixture(scope="module")
def traced():
    model = load_default_model()
    tcs = load_default_transcoders("per_layer")
    graph = AttributionGraph.build(
        model, tcs, DEFAULT_PROMPTS["induction"].text, show_progress=False
    )
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    hl = HeadLoadings.compute(pruned, strongest_edges(pruned.adjacency, 60))
    cards = load_default_feature_cards("per_layer")
    doc = viewer_document(pruned, hl, feature_cards=cards, qk_top_terms=6, top_heads=2)
    return model, tcs, pruned, hl, cards, json.loads(json.dumps(doc, allow_nan=False))


def test_viewer_document_fields(traced) -> None:
    model, _, graph, hl, _, doc = traced
    viewer = doc["extra"]["tl_circuits"]["viewer"]
    assert viewer["version"] == 1
    assert (viewer["n_layers"], viewer["n_heads"]) == (model.cfg.n_layers, model.cfg.n_heads)
    P = len(graph.token_strings)
    assert viewer["n_pos"] == P and viewer["prompt_tokens"] == graph.token_strings
    assert viewer["annotations"] == {"pinned": [], "supernodes": []}
    # attention: every head listed in a link's heads; rows sum to 1 over visible keys
    listed = {
        f"L{h['layer']}H{h['head']}"
        for link in doc["extra"]["tl_circuits"]["head_loadings"]["links"].values()
        for h in link["heads"]
    }
    assert listed and set(viewer["attention"]) == listed
    for pattern in viewer["attention"].values():
        a = torch.tensor(pattern, dtype=torch.float64)
        assert a.shape == (P, P)
        assert torch.allclose(a.sum(1), torch.ones(P, dtype=torch.float64), atol=1e-5)
        assert float(a.triu(1).abs().max()) == 0.0  # no key after the query
    # link heads: H1 at every crossed layer, the strongest links first
    ids = [n["node_id"] for n in doc["nodes"]]
    node_of = {nid: i for i, nid in enumerate(ids)}
    link_weights = {f"{ln['source']}->{ln['target']}": ln["weight"] for ln in doc["links"]}
    lh = viewer["link_heads"]
    assert lh
    for key, entry in lh.items():
        s, t = (node_of[x] for x in key.split("->"))
        assert entry["weight"] == pytest.approx(float(graph.adjacency[t, s]), rel=1e-6)
        assert entry["weight"] == pytest.approx(link_weights[key], rel=1e-6)
        assert len(entry["layers"]) == len(entry["loadings"]) == len(entry["bypass"])
        i = hl.edge_index(t, s)
        assert entry["layers"] == hl.crossed[i].nonzero(as_tuple=True)[0].tolist()
        for m, row, b in zip(entry["layers"], entry["loadings"], entry["bypass"], strict=True):
            assert len(row) == model.cfg.n_heads
            assert sum(row) + b == pytest.approx(entry["weight"], rel=1e-4, abs=1e-5)
            assert row == pytest.approx(hl.loadings[i, m].tolist())
    weights = [abs(e["weight"]) for e in lh.values()]
    assert weights == sorted(weights, reverse=True)
    few = viewer_document(graph, hl, link_heads_edges=3, qk_top_terms=0)
    assert list(few["extra"]["tl_circuits"]["viewer"]["link_heads"]) == list(lh)[:3]
    assert few["extra"]["tl_circuits"]["qk"] is None
    # feature cards: only feature nodes, each context with its maximum at max_pos
    cards = viewer["feature_cards"]
    features = {ids[i] for i in graph.indices("feature").tolist()}
    assert cards and set(cards) <= features
    for card in cards.values():
        for c in card["contexts"]:
            assert len(c["tokens"]) == len(c["acts"]) <= CARD_WINDOW
            assert all(isinstance(x, str) for x in c["tokens"])
            assert c["max_pos"] == len(c["tokens"]) - 1
            assert c["acts"][c["max_pos"]] == pytest.approx(c["max_act"], rel=2e-3, abs=1e-3)
            assert c["max_act"] >= max(c["acts"]) - 1e-2 * abs(c["max_act"]) - 1e-3


def test_viewer_document_qk_fields(traced) -> None:
    _, _, graph, _, _, doc = traced
    pairs = doc["extra"]["tl_circuits"]["qk"]["pairs"]
    assert pairs
    patterns = graph.context.frozen
    for pair in pairs.values():
        assert pair["model_score"] == pytest.approx(pair["score"], rel=1e-4, abs=1e-6)
        assert all(t["value"] > 0 for t in pair["positive"])
        assert all(t["value"] < 0 for t in pair["negative"])
        assert 0 < len(pair["query_marginals"]) <= 6 and 0 < len(pair["key_marginals"]) <= 6
        m, h, q, k = pair["layer"], pair["head"], pair["query_pos"], pair["key_pos"]
        p = patterns[f"blocks.{m}.attn.hook_pattern"][0, h, q, : q + 1].double()
        # the model's own scores of every key the query sees (pre-cap: no soft-cap here)
        from tl_circuits.export.blocks import clean_pre_cap_scores

        scores = clean_pre_cap_scores(graph.context.model, graph.tokens, m)[h, q, : q + 1]
        want = float(scores[k] - p @ scores)
        assert pair["competition"]["score"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert 0 < len(pair["competition"]["terms"]) <= 6


def test_annotations_checked(traced) -> None:
    _, _, graph, hl, _, doc = traced
    ids = [n["node_id"] for n in doc["nodes"]]
    good = {"pinned": ids[:2], "supernodes": [{"name": "a", "members": ids[2:4]}]}
    out = viewer_document(graph, hl, qk_top_terms=0, annotations=good)
    assert out["extra"]["tl_circuits"]["viewer"]["annotations"] == good
    assert out["qParams"]["pinnedIds"] == ids[:2]
    assert out["qParams"]["supernodes"] == [["a", *ids[2:4]]]
    known = set(ids)
    for bad in (
        [],
        {"pinned": []},
        {"pinned": ["nope"], "supernodes": []},
        {"pinned": [ids[0], ids[0]], "supernodes": []},
        {"pinned": [], "supernodes": [{"name": 3, "members": []}]},
        {"pinned": [], "supernodes": [{"name": "x" * 201, "members": []}]},
        {"pinned": [], "supernodes": [{"name": "x", "members": ["nope"]}]},
        {"pinned": [], "supernodes": [], "extra": 1},
        {"pinned": [1], "supernodes": []},
    ):
        with pytest.raises(TLCircuitsError):
            check_annotations(bad, known)


def test_feature_cards_match_recomputation(tmp_path) -> None:
    model = random_model("gpt2")
    from conftest import cached_transcoders

    tcs = cached_transcoders("gpt2", "relu")
    tokens = torch.randint(
        0, model.cfg.d_vocab, (10, 12), generator=torch.Generator().manual_seed(0)
    )
    cards = top_activating_contexts(model, tcs, tokens, k=3, window=4, batch_size=4)
    full = feature_activations(model, tcs, tokens, list(range(tcs.n_layers)))
    checked = 0
    for layer in range(tcs.n_layers):
        a = full[layer]  # [n_seq, seq, d]
        d = a.shape[-1]
        assert cards.max_act[layer].shape == (d, 3)
        top = a.reshape(-1, d).topk(3, dim=0).values.T  # [d, 3]
        want = torch.where(top > 0, top, 0.0)
        assert torch.allclose(cards.max_act[layer], want, rtol=1e-5, atol=1e-6)
        for f in range(d):
            for j, c in enumerate(cards.contexts(layer, f)):
                s, p = c["seq"], c["pos"]
                # the maximum is the feature's activation there, recomputed directly
                assert c["max_act"] == pytest.approx(float(a[s, p, f]), rel=1e-5)
                lo = max(0, p - 3)
                assert c["tokens"] == tokens[s, lo : p + 1].tolist()
                assert c["acts"] == pytest.approx(a[s, lo : p + 1, f].tolist(), rel=1e-5, abs=1e-6)
                # recomputed on that context alone (a causal model: the prefix decides)
                alone = feature_activations(model, tcs, tokens[s : s + 1, : p + 1], [layer])
                assert float(alone[layer][0, p, f]) == pytest.approx(c["max_act"], rel=1e-4)
                assert j < 3
                checked += 1
    assert checked > 0
    # save / load round trip (safetensors + JSON)
    loaded = FeatureCards.load(cards.save(tmp_path / "cards"))
    assert sorted(p.name for p in (tmp_path / "cards").iterdir()) == [
        "feature_cards.json",
        "feature_cards.safetensors",
    ]
    for layer in range(tcs.n_layers):
        assert torch.equal(loaded.seq[layer], cards.seq[layer])
        assert torch.equal(loaded.tokens[layer], cards.tokens[layer])
        assert torch.allclose(loaded.max_act[layer], cards.max_act[layer])
    with pytest.raises(TLCircuitsError):
        top_activating_contexts(model, tcs, tokens.float(), k=3)
    with pytest.raises(TLCircuitsError):
        top_activating_contexts(model, tcs, tokens, k=0)


def test_default_feature_cards_shipped() -> None:
    from tl_circuits.default.cards import KINDS, cards_dir

    model = load_default_model()
    for kind in KINDS:
        size = sum(p.stat().st_size for p in cards_dir(kind).iterdir())
        assert size < 400_000
        cards = load_default_feature_cards(kind)
        assert cards is not None and cards.window == CARD_WINDOW
        tcs = load_default_transcoders(kind)
        # spot-check: a context's maximum recomputed on its own window's sequence prefix
        from tl_circuits.default.cards import CARD_SEED, CARD_SEQUENCES
        from tl_circuits.default.synthetic import generate

        tokens = generate(CARD_SEQUENCES, CARD_SEED).tokens
        for layer in range(tcs.n_layers):
            firing = (cards.max_act[layer][:, 0] > 0).nonzero(as_tuple=True)[0][:5].tolist()
            assert firing
            for f in firing:
                c = cards.contexts(layer, f)[0]
                assert len(cards.contexts(layer, f)) <= CARD_K
                acts = feature_activations(
                    model, tcs, tokens[c["seq"] : c["seq"] + 1, : c["pos"] + 1], [layer]
                )
                assert float(acts[layer][0, -1, f]) == pytest.approx(c["max_act"], rel=1e-4)


def _xss_doc(doc):
    doc = json.loads(json.dumps(doc))
    doc["metadata"]["prompt"] = XSS
    doc["extra"]["tl_circuits"]["viewer"]["prompt_tokens"][1] = XSS + "&<>\u2028"
    doc["nodes"][0]["clerp"] = XSS
    return doc


def _embedded(html: str):
    # the element with the data (the page's comments may name the element too)
    found = re.findall(
        r'<script type="application/json" id="tl-graph">(\{.*?)</script>', html, re.S
    )
    assert len(found) == 1
    return json.loads(found[0])


NETWORK = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def test_self_contained_html_real_assets(traced) -> None:
    from tl_circuits.viewer.html import assets_dir

    if not (assets_dir() / "index.html").is_file():
        pytest.skip("the viewer page (assets/index.html) is not there yet")
    doc = _xss_doc(traced[-1])
    html = self_contained_html(doc)
    assert XSS not in html
    assert "window.__xss" in html  # only inside the escaped JSON
    assert not NETWORK.search(html)
    assert not re.search(r"""<script[^>]*\bsrc=""", html)
    assert not re.search(r"""<link[^>]*\bhref=""", html)
    assert _embedded(html) == doc


def test_self_contained_html_stand_in(tmp_path, traced) -> None:
    (tmp_path / "vendor").mkdir()
    (tmp_path / "index.html").write_text(
        "<!doctype html><html><head><!--TL-CSS--><link rel='stylesheet' "
        'href="assets/style.css"><!--/TL-CSS--></head><body><p>x</p><!--TL-DATA-->'
        '<!--TL-JS--><script src="assets/vendor/d3.min.js"></script>'
        '<script src="assets/app.js"></script><!--/TL-JS--></body></html>'
    )
    (tmp_path / "style.css").write_text("p { color: red } /* </style><b> */")
    (tmp_path / "vendor" / "d3.min.js").write_text("var d3 = {ns: 'http://www.w3.org/2000/svg'};")
    (tmp_path / "app.js").write_text("var s = '</script><script>alert(1)</script>';")
    doc = _xss_doc(traced[-1])
    html = self_contained_html(doc, assets_dir=tmp_path)
    assert "p { color: red }" in html and "var d3" in html and "var s" in html
    assert html.index("var d3") < html.index("var s")  # d3 first
    assert XSS not in html and "</script><script>alert" not in html
    assert "</style><b>" not in html
    assert not NETWORK.search(html)
    assert "<!--TL-" not in html
    assert _embedded(html) == doc
    # bare markers (no spans) work too; a missing page is refused
    (tmp_path / "index.html").write_text("<head><!--TL-CSS--></head><!--TL-DATA--><!--TL-JS-->")
    html = self_contained_html(doc, assets_dir=tmp_path)
    assert "<style>" in html and "var s" in html and _embedded(html) == doc
    (tmp_path / "index.html").unlink()
    with pytest.raises(TLCircuitsError, match="missing"):
        self_contained_html(doc, assets_dir=tmp_path)


def test_trace_writes_viewer_files(tmp_path) -> None:
    out = tmp_path / "out"
    assert main(["trace", "--out", str(out), "--no-picture", "--head-edges", "40"]) == 0
    doc = json.loads((out / "viewer.json").read_text())
    viewer = doc["extra"]["tl_circuits"]["viewer"]
    assert viewer["link_heads"] and viewer["attention"] and viewer["feature_cards"]
    assert doc["extra"]["tl_circuits"]["qk"]["pairs"]
    assert (out / "graph.json").is_file() and (out / "pruned").is_dir()
    from tl_circuits.viewer.html import assets_dir

    if (assets_dir() / "index.html").is_file():
        html = (out / "viewer.html").read_text()
        assert _embedded(html) == doc
        assert not NETWORK.search(html)
