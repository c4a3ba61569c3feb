"""``tl-circuits serve``'s server: routes, path containment, annotations, plain JSON."""

from __future__ import annotations

import http.client
import json
import os
import threading
from pathlib import Path

import pytest

from tl_circuits.cli import main
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph import AttributionGraph
from tl_circuits.viewer.server import ANNOTATIONS_FILE, find_graphs, make_server


@pytest.fixture(scope="module")
def graphs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    out = root / "trace_a"
    assert main(["trace", "--out", str(out), "--no-picture", "--head-edges", "20"]) == 0
    # a circuit-tracer-format plain JSON (no extra block) in a folder of JSON files
    plain = root / "plain"
    plain.mkdir()
    graph = AttributionGraph.load(out / "pruned")
    doc = graph.to_json()
    del doc["extra"]
    (plain / "ct-graph.json").write_text(json.dumps(doc))
    (plain / "graph-metadata.json").write_text(json.dumps({"graphs": []}))
    (plain / "not-a-graph.json").write_text("[1, 2]")
    return root


@pytest.fixture
def server(graphs_root, tmp_path):
    assets = tmp_path / "assets"
    (assets / "vendor").mkdir(parents=True)
    (assets / "index.html").write_text("<html><!--TL-CSS--><!--TL-DATA--><!--TL-JS--></html>")
    (assets / "app.js").write_text("var app = 1;")
    (assets / "vendor" / "d3.min.js").write_text("var d3 = 1;")
    (assets / ".hidden").write_text("secret")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    os.symlink(secret, assets / "link.js")
    os.symlink(tmp_path, assets / "linkdir")
    srv = make_server(graphs_root, "127.0.0.1", 0, assets=assets)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method: str, path: str, body: bytes | None = None, headers=None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
    except (BrokenPipeError, ConnectionResetError):
        pass  # a refused oversized body: the server answers and closes before reading it all
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, resp


def get_json(srv, path: str):
    status, data, _ = request(srv, "GET", path)
    assert status == 200, (path, data)
    return json.loads(data)


def test_routes(server) -> None:
    status, page, resp = request(server, "GET", "/")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/html")
    assert b'src="assets/app.js"' in page and b"<!--TL-" not in page
    status, js, resp = request(server, "GET", "/assets/app.js")
    assert status == 200 and js == b"var app = 1;"
    assert resp.getheader("Content-Type").startswith("text/javascript")
    assert request(server, "GET", "/assets/vendor/d3.min.js")[0] == 200
    listing = get_json(server, "/api/graphs")
    assert [g["id"] for g in listing] == ["g0", "g1"]
    assert all(set(g) == {"id", "slug", "prompt", "has_heads"} for g in listing)
    by_heads = {g["has_heads"]: g for g in listing}
    ours = get_json(server, f"/api/graph/{by_heads[True]['id']}")
    assert ours["extra"]["tl_circuits"]["viewer"]["link_heads"]
    assert "kana" in by_heads[True]["prompt"]
    # the plain circuit-tracer JSON is listed and served as it is
    plain = get_json(server, f"/api/graph/{by_heads[False]['id']}")
    assert "extra" not in plain and plain["nodes"] and plain["links"]
    for path in ("/api/graph/g9", "/api/graph/../g0", "/api/nope", "/index.html", "/api"):
        assert request(server, "GET", path)[0] == 404, path


@pytest.mark.parametrize(
    "path",
    [
        "/assets/../../etc/passwd",
        "/assets/%2e%2e/%2e%2e/etc/passwd",
        "/assets/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/assets/..%2f..%2fsecret.txt",
        "/assets//etc/passwd",
        "/assets/%2fetc%2fpasswd",
        "/assets/link.js",
        "/assets/linkdir/secret.txt",
        "/assets/.hidden",
        "/assets/vendor",
        "/assets/",
        "/assets/..\\..\\secret.txt",
        "/assets/nope.js",
        "/../secret.txt",
    ],
)
def test_no_file_outside_the_assets(server, path) -> None:
    status, data, _ = request(server, "GET", path)
    assert status == 404, (path, status)
    assert b"SECRET" not in data and b"root:" not in data


def test_methods(server) -> None:
    for path in ("/", "/assets/app.js", "/api/graphs", "/api/graph/g0"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status = request(server, method, path, body=b"{}")[0]
            assert status in (404, 405), (method, path)
    assert request(server, "GET", "/api/graph/g0/annotations")[0] == 405
    assert request(server, "POST", "/api/graph/g7/annotations", body=b"{}")[0] == 404
    assert request(server, "GET", "/", headers={"Host": "evil.example"})[0] == 403


def test_annotations(server, graphs_root) -> None:
    listing = get_json(server, "/api/graphs")
    for entry in listing:
        gid = entry["id"]
        doc = get_json(server, f"/api/graph/{gid}")
        ids = [n["node_id"] for n in doc["nodes"]]
        target = server.graphs[gid].annotations
        json_headers = {"Content-Type": "application/json"}
        bad_bodies = [
            (b"not json", json_headers),
            (b"[]", json_headers),
            (json.dumps({"pinned": ["nope"], "supernodes": []}).encode(), json_headers),
            (json.dumps({"pinned": ids[:1]}).encode(), json_headers),
            (json.dumps({"pinned": [], "supernodes": [{"name": "x"}]}).encode(), json_headers),
            (b"\xff\xfe", json_headers),
        ]
        for body, headers in bad_bodies:
            status = request(server, "POST", f"/api/graph/{gid}/annotations", body, headers)[0]
            assert status == 400, body
            assert not target.exists()
        good = {"pinned": ids[:2], "supernodes": [{"name": "<b>sn</b>", "members": ids[1:3]}]}
        body = json.dumps(good).encode()
        # wrong content type (a cross-site form) and too large bodies are refused
        assert request(server, "POST", f"/api/graph/{gid}/annotations", body)[0] == 415
        huge = b" " * (1 << 20) + body
        assert (
            request(server, "POST", f"/api/graph/{gid}/annotations", huge, json_headers)[0] == 413
        )
        assert not target.exists()
        status, data, _ = request(
            server, "POST", f"/api/graph/{gid}/annotations", body, json_headers
        )
        assert status == 200 and json.loads(data) == good
        assert json.loads(target.read_text()) == good
        assert target.parent == server.graphs[gid].path.parent or target.parent == (
            server.graphs[gid].path
        )
        merged = get_json(server, f"/api/graph/{gid}")
        assert merged["qParams"]["pinnedIds"] == ids[:2]
        assert merged["qParams"]["supernodes"] == [["<b>sn</b>", *ids[1:3]]]
        viewer = (merged.get("extra") or {}).get("tl_circuits", {}).get("viewer")
        if viewer is not None:
            assert viewer["annotations"] == good
        target.unlink()
    assert (graphs_root / "trace_a" / ANNOTATIONS_FILE).exists() is False


def test_find_graphs_kinds(graphs_root, tmp_path) -> None:
    one = find_graphs(graphs_root / "trace_a")
    assert len(one) == 1 and one[0].path.name == "viewer.json"
    plain = find_graphs(graphs_root / "plain")
    assert [g.path.name for g in plain] == ["ct-graph.json"]
    assert plain[0].annotations.name == "ct-graph." + ANNOTATIONS_FILE
    # a trace folder without viewer.json: the pruned graph is loaded (no QK, no context)
    old = tmp_path / "old"
    old.mkdir()
    (old / "pruned").symlink_to(graphs_root / "trace_a" / "pruned")
    entries = find_graphs(old)
    assert entries[0].kind == "pruned" and entries[0].has_heads
    srv = make_server(old, port=0)
    try:
        doc = srv.document(entries[0])
        assert doc["extra"]["tl_circuits"]["viewer"]["link_heads"]
        assert doc["extra"]["tl_circuits"]["viewer"]["attention"] == {}
    finally:
        srv.server_close()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TLCircuitsError, match="no graph"):
        find_graphs(empty)
    with pytest.raises(FileNotFoundError):
        find_graphs(tmp_path / "missing")


def test_serve_cli_refuses_bad_input(tmp_path, capsys) -> None:
    assert main(["serve", str(tmp_path / "missing"), "--no-open"]) == 2
    assert main(["serve", str(tmp_path), "--no-open", "--port", "70000"]) == 2
