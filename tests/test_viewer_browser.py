"""The graph viewer's frontend (``tl_circuits/viewer/assets``) in headless Chromium.

Self-contained file (``file://``, network off) and served mode (the backend's server when
it exists, and a minimal stand-in server that serves ``index.html`` exactly as it is in
the package, so the page's own ``<link>``/``<script>`` tags are what load the assets).
Needs Playwright for Python and a Chromium (``/usr/bin/chromium`` or Playwright's own);
skipped with the reason when either is missing.
"""

from __future__ import annotations

import copy
import http.server
import json
import math
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tl_circuits" / "viewer" / "assets"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
XSS = '</script><script>window.__xss=1</script><img src=x onerror="window.__xss=2">'

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright for Python is not installed (pip install playwright)"
)


def _chromium_path() -> str | None:
    for cand in (
        os.environ.get("TL_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if cand and Path(cand).exists():
            return cand
    return None


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser():
    pw = sync_api.sync_playwright().start()
    exe = _chromium_path()
    try:
        kwargs: dict[str, Any] = {"args": ["--no-sandbox", "--disable-gpu"]}
        if exe:
            kwargs["executable_path"] = exe
        b = pw.chromium.launch(**kwargs)
    except Exception as e:  # no browser binary
        pw.stop()
        pytest.skip(f"no Chromium to run the viewer in ({type(e).__name__}: {str(e)[:200]})")
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Path | None:
    """``tl-circuits trace --out DIR`` on the default induction prompt (``DIR/viewer.json``,
    ``DIR/viewer.html``), or None before the backend writes the viewer files."""
    import contextlib
    import io

    from tl_circuits.cli import main

    out = tmp_path_factory.mktemp("trace")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["trace", "--out", str(out)]) == 0
    return out if (out / "viewer.json").is_file() and (out / "viewer.html").is_file() else None


@pytest.fixture(scope="module")
def induction_doc(traced) -> dict[str, Any]:
    """The viewer document of the embedded default model's induction graph."""
    if traced is not None:
        return json.loads((traced / "viewer.json").read_text(encoding="utf-8"))
    from tl_circuits import AttributionGraph, HeadLoadings
    from tl_circuits.default import DEFAULT_PROMPTS, load_default_model, load_default_transcoders

    model, tcs = load_default_model(), load_default_transcoders()
    g = AttributionGraph.build(model, tcs, DEFAULT_PROMPTS["induction"].text, show_progress=False)
    p = g.prune()
    hl = HeadLoadings.compute(p)
    try:
        from tl_circuits.viewer.data import viewer_document
    except ImportError:  # before the backend: the frontend JSON with QK terms
        from tl_circuits import export_json

        return export_json(p, head_loadings=hl, qk_top_terms=5)
    return viewer_document(p, hl)


def build_html(doc: Any) -> str:
    """The self-contained page (the backend's builder when there is one)."""
    try:
        from tl_circuits.viewer.html import self_contained_html
    except ImportError:
        return _fallback_html(doc)
    return self_contained_html(doc)


def _fallback_html(doc: Any) -> str:
    page = (ASSETS / "index.html").read_text(encoding="utf-8")

    def script(js: str) -> str:
        return "<script>" + re.sub(r"</(script)", r"<\\/\1", js, flags=re.I) + "</script>"

    css = "<style>" + (ASSETS / "style.css").read_text(encoding="utf-8") + "</style>"
    js = script((ASSETS / "vendor" / "d3.min.js").read_text(encoding="utf-8")) + script(
        (ASSETS / "app.js").read_text(encoding="utf-8")
    )
    data = json.dumps(doc).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = re.sub(r"<!--TL-CSS-->.*?<!--/TL-CSS-->", lambda m: css, page, flags=re.S)
    page = re.sub(r"<!--TL-JS-->.*?<!--/TL-JS-->", lambda m: js, page, flags=re.S)
    return page.replace(
        "<!--TL-DATA-->", f'<script type="application/json" id="tl-graph">{data}</script>'
    )


def open_file(
    browser,
    tmp_path: Path,
    doc: Any,
    name: str = "viewer.html",
    *,
    offline=False,
    html: Path | None = None,
):
    if html is None:
        path = tmp_path / name
        path.write_text(build_html(doc), encoding="utf-8")
    else:
        path = html
    context = browser.new_context(offline=offline, viewport={"width": 1500, "height": 900})
    requests: list[str] = []
    if offline:

        def route(r):
            requests.append(r.request.url)
            if r.request.url.startswith("file:"):
                r.continue_()
            else:
                r.abort()

        context.route("**/*", route)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)
    page.errors = errors  # type: ignore[attr-defined]
    page.requests = requests  # type: ignore[attr-defined]
    return page


def click_node(page, node_id: str) -> None:
    pos = page.evaluate("id => window.tlViewer.nodeScreenPosition(id)", node_id)
    assert pos and pos["visible"], f"{node_id} is not drawn"
    page.mouse.click(pos["x"], pos["y"])
    page.wait_for_selector(f"#node-panel[data-node='{node_id}']", timeout=5_000)


def _num(text: str) -> float:
    return float(text.strip())


def _decimals(text: str) -> float:
    """Half a unit of the last shown digit (display rounding)."""
    t = text.strip()
    if "e" in t.lower():
        mant, exp = t.lower().split("e")
        d = len(mant.split(".")[1]) if "." in mant else 0
        return 0.5 * 10 ** (int(exp) - d)
    return 0.5 * 10 ** -(len(t.split(".")[1]) if "." in t else 0)


# ------------------------------------------------------------------------ the induction
def _induction_link(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The top target and the strongest cross-position link into it."""
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    target = max((n for n in doc["nodes"] if n["is_target_logit"]), key=lambda n: n["token_prob"])
    into = [
        lk
        for lk in doc["links"]
        if lk["target"] == target["node_id"] and nodes[lk["source"]]["ctx_idx"] != target["ctx_idx"]
    ]
    return target, max(into, key=lambda lk: abs(lk["weight"]))


def check_induction(page, doc: dict[str, Any]) -> None:
    from tl_circuits.default import default_card

    layer, head, _ = default_card()["induction_head"]
    induction = f"L{layer}H{head}"
    target, link = _induction_link(doc)
    tid = target["node_id"]

    # the node panel lists all its inputs
    click_node(page, tid)
    n_in = sum(1 for lk in doc["links"] if lk["target"] == tid)
    assert page.locator("#node-panel .input-edge").count() == n_in
    n_out = sum(1 for lk in doc["links"] if lk["source"] == tid)
    assert page.locator("#node-panel .output-edge").count() == n_out
    # ranked by |weight|
    ws = [
        abs(float(x))
        for x in page.eval_on_selector_all(
            "#node-panel .input-edge", "els => els.map(e => e.dataset.weight)"
        )
    ]
    assert ws == sorted(ws, reverse=True)

    # the induction edge: its top head is the model's induction head
    page.click(f"#node-panel .input-edge[data-source='{link['source']}']")
    page.wait_for_selector(f"#edge-panel[data-link='{link['source']}->{tid}']")
    top = page.locator("#edge-panel .top-head")
    assert top.inner_text().strip() == induction
    assert page.locator("#edge-panel .head-bar").count() >= 1

    # the head: the QK terms and the remainder sum to the score shown = the model score
    page.locator(f"#edge-panel .head-bar[data-layer='{layer}'][data-head='{head}']").first.click()
    page.wait_for_selector(f"#head-panel[data-head='{induction}']")
    terms = [
        float(v)
        for v in page.eval_on_selector_all(
            "#head-panel .qk-term", "els => els.map(e => e.dataset.value)"
        )
    ]
    assert terms, "no QK terms shown"
    remainder = float(page.get_attribute("#head-panel .qk-remainder", "data-value"))
    score_text = page.inner_text("#head-panel .qk-score")
    assert math.isclose(
        sum(terms) + remainder, _num(score_text), abs_tol=_decimals(score_text) + 1e-9
    )
    key_pos = next(n["ctx_idx"] for n in doc["nodes"] if n["node_id"] == link["source"])
    pair = doc["extra"]["tl_circuits"]["qk"]["pairs"][f"{induction}@{target['ctx_idx']}:{key_pos}"]
    model_text = page.inner_text("#head-panel .model-score")
    if "model_score" in pair:
        tol = _decimals(score_text) + _decimals(model_text) + 1e-6 * abs(pair["model_score"])
        assert abs(_num(score_text) - _num(model_text)) <= tol
    else:  # the export_json document (before the backend): the exported score
        assert math.isclose(_num(score_text), pair["score"], abs_tol=_decimals(score_text))
    if page.locator("#head-panel canvas.heatmap").count() == 0:
        assert "viewer" not in doc["extra"]["tl_circuits"]


def test_induction_self_contained(browser, induction_doc, tmp_path):
    page = open_file(browser, tmp_path, induction_doc)
    assert page.evaluate("window.tlViewer.counts().nodes") == len(induction_doc["nodes"])
    check_induction(page, induction_doc)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))
    docs = ROOT / "docs"
    if docs.is_dir():
        page.screenshot(path=str(docs / "viewer.png"))
    assert page.errors == []  # type: ignore[attr-defined]


def test_trace_viewer_html(browser, traced, induction_doc, tmp_path):
    """The viewer.html ``tl-circuits trace`` wrote, from file:// with the network off."""
    assert traced is not None, "tl-circuits trace wrote no viewer.html"
    page = open_file(browser, tmp_path, None, offline=True, html=traced / "viewer.html")
    assert page.evaluate("window.tlViewer.counts().nodes") == len(induction_doc["nodes"])
    check_induction(page, induction_doc)
    assert all(u.startswith("file:") for u in page.requests)  # type: ignore[attr-defined]
    assert page.errors == []  # type: ignore[attr-defined]


def test_pin_supernode_and_save_in_file_mode(browser, induction_doc, tmp_path):
    page = open_file(browser, tmp_path, induction_doc)
    target, link = _induction_link(induction_doc)
    for nid in (target["node_id"], link["source"]):
        click_node(page, nid)
        page.click("#pin-button")
    page.fill("#supernode-name", "induction <b>copy</b>")
    page.click("#make-supernode")
    assert "localStorage" in page.inner_text("#save-note")
    page.click("#save-annotations")
    page.wait_for_function("document.getElementById('save-status').textContent.includes('saved')")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    ann = page.evaluate("window.tlViewer.annotations()")
    assert sorted(ann["pinned"]) == sorted([target["node_id"], link["source"]])
    assert ann["supernodes"][0]["name"] == "induction <b>copy</b>"
    assert "induction <b>copy</b>" in page.inner_text("#supernode-list")


def test_offline_file(browser, induction_doc, tmp_path):
    page = open_file(browser, tmp_path, induction_doc, offline=True)
    assert page.evaluate("window.tlViewer.counts().nodes") == len(induction_doc["nodes"])
    assert page.evaluate("window.tlViewer.counts().links") == len(induction_doc["links"])
    assert all(u.startswith("file:") for u in page.requests)  # type: ignore[attr-defined]
    assert page.errors == []  # type: ignore[attr-defined]


def _hostile(doc: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(doc)
    d["metadata"]["prompt"] = XSS + " " + d["metadata"]["prompt"]
    d["metadata"]["slug"] = XSS
    toks = d["metadata"]["prompt_tokens"]
    toks[1] = XSS
    for n in d["nodes"]:
        n["clerp"] = XSS
    viewer = d.get("extra", {}).get("tl_circuits", {}).get("viewer")
    if viewer:
        viewer["prompt_tokens"] = toks
        viewer["annotations"] = {
            "pinned": [d["nodes"][0]["node_id"]],
            "supernodes": [{"name": XSS, "members": [d["nodes"][0]["node_id"]]}],
        }
    return d


def test_xss_self_contained(browser, induction_doc, tmp_path):
    d = _hostile(induction_doc)
    page = open_file(browser, tmp_path, d)
    page.wait_for_timeout(200)
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert XSS in page.inner_text("#prompt")
    assert XSS in page.inner_text("#token-axis")
    assert page.locator("#token-axis img, #prompt img, #node-panel img").count() == 0
    target, _ = _induction_link(d)
    click_node(page, target["node_id"])
    assert page.inner_text("#node-panel h3") == XSS
    assert XSS in page.inner_text("#node-panel .input-edges")
    page.locator("#node-panel .input-edge").first.click()
    page.wait_for_selector("#edge-panel:not([hidden])")
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_without_viewer_block(browser, induction_doc, tmp_path):
    """export_json's document (no extra.tl_circuits.viewer, none of the newer QK fields):
    the edge's top heads come from head_loadings.links, the score from the terms."""
    d = copy.deepcopy(induction_doc)
    d["extra"]["tl_circuits"].pop("viewer", None)
    for pair in d["extra"]["tl_circuits"]["qk"]["pairs"].values():
        for k in (
            "positive",
            "negative",
            "query_marginals",
            "key_marginals",
            "competition",
            "model_score",
        ):
            pair.pop(k, None)
    page = open_file(browser, tmp_path, d, name="plain.html")
    assert "attention patterns" in page.inner_text("#data-status")
    check_induction(page, d)
    assert "head_loadings.links" in page.inner_text("#edge-panel")
    assert "marginals are absent" in page.inner_text("#head-panel")
    assert page.errors == []  # type: ignore[attr-defined]


def test_circuit_tracer_format(browser, induction_doc, tmp_path):
    d = {k: v for k, v in copy.deepcopy(induction_doc).items() if k != "extra"}
    page = open_file(browser, tmp_path, d, name="ct.html")
    assert page.evaluate("window.tlViewer.counts().nodes") == len(d["nodes"])
    assert "absent" in page.inner_text("#data-status")
    target, link = _induction_link(d)
    click_node(page, target["node_id"])
    assert page.locator("#node-panel .input-edge").count() == sum(
        1 for lk in d["links"] if lk["target"] == target["node_id"]
    )
    page.click(f"#node-panel .input-edge[data-source='{link['source']}']")
    assert "absent" in page.inner_text("#edge-panel")
    assert page.errors == []  # type: ignore[attr-defined]


def test_thresholds_and_canvas_edge_click(browser, induction_doc, tmp_path):
    page = open_file(browser, tmp_path, induction_doc)
    c0 = page.evaluate("window.tlViewer.counts()")
    page.locator("#edge-threshold").fill("90")
    c1 = page.evaluate("window.tlViewer.counts()")
    assert 0 < c1["drawnEdges"] < c0["drawnEdges"]
    page.locator("#node-threshold").fill("50")
    c2 = page.evaluate("window.tlViewer.counts()")
    assert c2["visibleNodes"] < c0["visibleNodes"]
    page.locator("#node-threshold").fill("0")
    page.locator("#edge-threshold").fill("0")
    # click the strongest link on the canvas, a quarter of the way along it
    target, link = _induction_link(induction_doc)
    a = page.evaluate("id => window.tlViewer.nodeScreenPosition(id)", link["source"])
    b = page.evaluate("id => window.tlViewer.nodeScreenPosition(id)", target["node_id"])
    for f in (0.25, 0.35, 0.45, 0.55):
        page.mouse.click(a["x"] + f * (b["x"] - a["x"]), a["y"] + f * (b["y"] - a["y"]))
        if (
            page.get_attribute("#edge-panel", "data-link")
            == f"{link['source']}->{target['node_id']}"
        ):
            break
    assert (
        page.get_attribute("#edge-panel", "data-link") == f"{link['source']}->{target['node_id']}"
    )



def _click_to_select(page, node_id: str) -> bool:
    """Click the node on the canvas; whether that selected it (nodes can overlap)."""
    pos = page.evaluate("id => window.tlViewer.nodeScreenPosition(id)", node_id)
    if not (pos and pos["visible"]):
        return False
    page.mouse.click(pos["x"], pos["y"])
    page.wait_for_timeout(50)
    return page.get_attribute("#node-panel", "data-node") == node_id


def test_pinned_subgraph_view(browser, induction_doc, tmp_path):
    """Pin 3 nodes, group 2 of them into a supernode, show the pinned subgraph: only the
    pinned nodes, the supernode as one node, the links among them merged per group."""
    doc = induction_doc
    page = open_file(browser, tmp_path, doc)
    full = page.evaluate("window.tlViewer.visible()")
    assert full["mode"] == "full" and len(full["nodes"]) == len(doc["nodes"])
    target, link = _induction_link(doc)
    tid, a = target["node_id"], link["source"]
    # a second input of the target, clickable on the canvas
    others = sorted(
        (lk for lk in doc["links"] if lk["target"] == tid and lk["source"] not in (a, tid)),
        key=lambda lk: -abs(lk["weight"]),
    )
    click_node(page, a)
    page.click("#pin-button")
    b = next((lk["source"] for lk in others[:30] if _click_to_select(page, lk["source"])), None)
    assert b is not None, "no second input of the target could be clicked"
    page.click("#pin-button")
    page.fill("#supernode-name", "copy <i>group</i>")
    page.click("#make-supernode")
    click_node(page, tid)
    page.click("#pin-button")
    assert sorted(page.evaluate("window.tlViewer.annotations()")["pinned"]) == sorted([a, b, tid])

    assert page.inner_text("#subgraph-toggle") == "show pinned subgraph"
    page.click("#subgraph-toggle")
    assert page.inner_text("#subgraph-toggle") == "show full graph"
    vis = page.evaluate("window.tlViewer.visible()")
    assert vis["mode"] == "subgraph"
    assert vis["nodes"] == [tid]
    assert len(vis["groups"]) == 1
    assert vis["groups"][0]["name"] == "copy <i>group</i>"
    assert sorted(vis["groups"][0]["members"]) == sorted([a, b])
    # the links among the pinned nodes, merged per (source group, target group)
    group = {a: "supernode:copy <i>group</i>", b: "supernode:copy <i>group</i>", tid: tid}
    want: dict[tuple[str, str], float] = {}
    for lk in doc["links"]:
        s, t = group.get(lk["source"]), group.get(lk["target"])
        if s is None or t is None or s == t:
            continue
        want[(s, t)] = want.get((s, t), 0.0) + lk["weight"]
    got = {(lk["source"], lk["target"]): lk["weight"] for lk in vis["linkList"]}
    assert vis["links"] == len(want) == len(got) >= 1
    assert set(got) == set(want)
    for key, w in want.items():
        assert math.isclose(got[key], w, rel_tol=1e-9, abs_tol=1e-12), key
    assert ("supernode:copy <i>group</i>", tid) in got
    # only the single pinned node is drawn as a node (and can be clicked)
    assert page.evaluate("id => window.tlViewer.nodeScreenPosition(id)", tid)["visible"]
    for nid in (a, b, next(n["node_id"] for n in doc["nodes"] if n["node_id"] not in group)):
        assert not page.evaluate("id => window.tlViewer.nodeScreenPosition(id)", nid)["visible"]
    click_node(page, tid)
    assert "pinned subgraph" in page.inner_text("#subgraph-note")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer_subgraph.png"))

    # and back to the full graph
    page.click("#subgraph-toggle")
    assert page.inner_text("#subgraph-toggle") == "show pinned subgraph"
    back = page.evaluate("window.tlViewer.visible()")
    counts = page.evaluate("window.tlViewer.counts()")
    assert back["mode"] == "full" and back["groups"] == []
    assert len(back["nodes"]) == counts["visibleNodes"] == len(doc["nodes"])
    assert back["links"] == counts["drawnEdges"] == full["links"]
    assert page.evaluate("id => window.tlViewer.nodeScreenPosition(id)", a)["visible"]
    assert page.errors == []  # type: ignore[attr-defined]


def _with_influence(doc: dict[str, Any], *, ours: bool) -> dict[str, Any]:
    """The document without ``extra``, each node's influence (k+1)/n by its index (the
    cumulative influence of circuit-tracer when not ``ours``), and the metadata's
    generator tl_circuits only when ``ours``."""
    d = {k: v for k, v in copy.deepcopy(doc).items() if k != "extra"}
    d["metadata"].pop("info", None)
    if ours:
        d["metadata"]["info"] = {"generator": {"name": "tl_circuits", "version": "0"}}
    n = len(d["nodes"])
    for k, node in enumerate(d["nodes"]):
        node["influence"] = (k + 1) / n
    return d


@pytest.mark.parametrize("ours", [False, True])
def test_cumulative_influence_of_other_tools(browser, induction_doc, tmp_path, ours):
    """Other tools' documents: node.influence is cumulative (lower = more important),
    so the node threshold keeps the low-influence nodes; tl_circuits' keeps the high ones."""
    d = _with_influence(induction_doc, ours=ours)
    page = open_file(browser, tmp_path, d, name=f"infl_{ours}.html")
    assert ("cumulative" in page.inner_text("#counts")) is (not ours)
    page.locator("#node-threshold").fill("50")
    shown = set(page.evaluate("window.tlViewer.visible()")["nodes"])
    features = [n for n in d["nodes"] if not n["is_target_logit"] and n["feature_type"] != "logit"]
    kept = [n["influence"] for n in features if n["node_id"] in shown]
    hidden = [n["influence"] for n in features if n["node_id"] not in shown]
    assert kept and hidden
    if ours:
        assert min(kept) > max(hidden)
    else:
        assert max(kept) < min(hidden)
    # node size: the more important node is drawn larger
    lo = min(features, key=lambda n: n["influence"])
    hi = max(features, key=lambda n: n["influence"])
    r_lo = page.evaluate("id => window.tlViewer.nodeInfo(id).r", lo["node_id"])
    r_hi = page.evaluate("id => window.tlViewer.nodeInfo(id).r", hi["node_id"])
    assert (r_hi > r_lo) if ours else (r_lo > r_hi)
    assert page.errors == []  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- served mode
class _StandIn(http.server.BaseHTTPRequestHandler):
    """The API the page uses, over the package's index.html exactly as it is."""

    docs: ClassVar[dict[str, Any]] = {}
    saved: ClassVar[dict[str, Any]] = {}

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code, body: bytes, ctype: str):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path in ("/", "/index.html"):
            return self._send(200, (ASSETS / "index.html").read_bytes(), "text/html; charset=utf-8")
        if path == "/api/graphs":
            return self._send(
                200, json.dumps([{"id": k} for k in self.docs]).encode(), "application/json"
            )
        m = re.fullmatch(r"/api/graph/([^/]+)", path)
        if m and m.group(1) in self.docs:
            return self._send(200, json.dumps(self.docs[m.group(1)]).encode(), "application/json")
        if path.startswith("/assets/"):
            f = (ASSETS / path[len("/assets/") :]).resolve()
            if f.is_file() and f.is_relative_to(ASSETS):
                ctype = {".js": "text/javascript", ".css": "text/css"}.get(f.suffix, "text/plain")
                return self._send(200, f.read_bytes(), ctype)
        self._send(404, b"not found", "text/plain")

    def do_POST(self):
        m = re.fullmatch(r"/api/graph/([^/]+)/annotations", self.path)
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n)
        if not m:
            return self._send(404, b"not found", "text/plain")
        self.saved[m.group(1)] = json.loads(body)
        self._send(200, b'{"ok": true}', "application/json")


@pytest.fixture()
def stand_in_server(induction_doc):
    _StandIn.docs = {"induction": induction_doc, "hostile": _hostile(induction_doc)}
    _StandIn.saved = {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_served_index_as_is(browser, induction_doc, stand_in_server):
    context = browser.new_context(viewport={"width": 1500, "height": 900})
    page = context.new_page()
    page.goto(stand_in_server + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)
    assert page.get_attribute("body", "data-graph") == "induction"
    assert page.evaluate("window.tlViewer.counts().nodes") == len(induction_doc["nodes"])
    check_induction(page, induction_doc)
    # save POSTs the annotations
    target, _ = _induction_link(induction_doc)
    click_node(page, target["node_id"])
    page.click("#pin-button")
    page.click("#save-annotations")
    page.wait_for_function("document.getElementById('save-status').textContent.includes('server')")
    assert _StandIn.saved["induction"] == {"pinned": [target["node_id"]], "supernodes": []}
    # the hostile document, served
    page.select_option("#graph-select", "hostile")
    page.wait_for_selector("body[data-graph='hostile']")
    page.wait_for_timeout(200)
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert XSS in page.inner_text("#prompt")
    context.close()


@pytest.fixture()
def backend_server(traced):
    from tl_circuits.viewer.server import make_server

    assert traced is not None, "tl-circuits trace wrote no viewer.json"
    srv = make_server(traced, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_served_by_tl_circuits_serve(browser, induction_doc, backend_server):
    """``tl-circuits serve DIR`` (its server in-process, port 0) on a trace folder."""
    context = browser.new_context(viewport={"width": 1500, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(backend_server.url)
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)
    assert page.evaluate("window.tlViewer.counts().nodes") == len(induction_doc["nodes"])
    assert "server" in page.inner_text("#save-note")
    check_induction(page, induction_doc)
    target, _ = _induction_link(induction_doc)
    click_node(page, target["node_id"])
    page.click("#pin-button")
    page.fill("#supernode-name", "copy")
    page.click("#make-supernode")
    page.click("#save-annotations")
    page.wait_for_function("document.getElementById('save-status').textContent.includes('server')")
    # a fresh page gets them back from the server
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    ann = page.evaluate("window.tlViewer.annotations()")
    assert ann["pinned"] == [target["node_id"]]
    assert ann["supernodes"] == [{"name": "copy", "members": [target["node_id"]]}]
    assert errors == []
    context.close()
