"""``tl-circuits serve``: a local web server for the interactive graph viewer.

Standard library only (:class:`http.server.ThreadingHTTPServer`), bound to 127.0.0.1 by
default. It serves what :func:`find_graphs` found under one folder, never anything else:

- ``GET /``: the viewer page (:func:`tl_circuits.viewer.html.served_html`)
- ``GET /assets/<file>``: a regular file inside the package's viewer assets folder (the
  path resolved with every link and checked to stay inside; hidden files refused)
- ``GET /api/graphs``: ``[{"id", "slug", "prompt", "has_heads"}]``
- ``GET /api/graph/<id>``: the graph's viewer document (a plain frontend JSON file: the
  file as it is), with its saved annotations merged in
  (:func:`tl_circuits.viewer.data.merge_annotations`)
- ``POST /api/graph/<id>/annotations``: a JSON body (``Content-Type: application/json``, at
  most :data:`MAX_BODY_BYTES`) ``{"pinned": [...], "supernodes": [...]}``, checked
  (:func:`tl_circuits.viewer.data.check_annotations`: node ids of that graph, bounded
  sizes), saved atomically beside the graph's document; ``400`` and nothing written if bad

Everything else is ``404`` (unknown path) or ``405`` (known path, other method). Graph ids
are keys the server assigned (``g0``, ``g1``, ...), never paths. Requests whose ``Host``
header is not the address the server is bound to (or ``localhost``) are refused with
``403`` (DNS rebinding). Files are read as JSON or safetensors only; nothing read is run.

Where graphs come from (:func:`find_graphs`): ``PATH`` is a ``tl-circuits trace`` output
folder (``viewer.json``; else ``pruned/`` loaded with :meth:`AttributionGraph.load` and
:meth:`HeadLoadings.load`; else ``graph.json``), a folder of such folders (and of folders
of JSON files), or a folder of frontend JSON files (ours or circuit-tracer's /
Neuronpedia's), or one such file. Files that are not graph JSON are skipped.
Annotations go to ``viewer_annotations.json`` in a trace folder and to
``{stem}.viewer_annotations.json`` beside a frontend JSON file.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tl_circuits.errors import TLCircuitsError
from tl_circuits.storage import write_text
from tl_circuits.viewer.data import check_annotations, merge_annotations, node_ids
from tl_circuits.viewer.html import assets_dir, resolve_asset, served_html

__all__ = ["GraphEntry", "ViewerServer", "find_graphs", "make_server"]

#: the largest annotations body accepted
#: a refused oversized body is read and dropped up to this much, then the connection closes
DRAIN_BYTES = 8 << 20
MAX_BODY_BYTES = 1 << 20
#: the largest JSON file listed (bigger ones are skipped)
MAX_GRAPH_FILE_BYTES = 2 << 30
VIEWER_FILE = "viewer.json"
ANNOTATIONS_FILE = "viewer_annotations.json"
_SKIP_JSON = {"graph-metadata.json", ANNOTATIONS_FILE}
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".woff2": "font/woff2",
    ".map": "application/json",
}


@dataclass
class GraphEntry:
    """One graph the server offers: where its document comes from and where its
    annotations go."""

    id: str
    slug: str
    prompt: str
    has_heads: bool
    kind: str  # "document" (a JSON file) or "pruned" (a lossless graph folder)
    path: Path  # the JSON file, or the pruned/ folder
    annotations: Path

    def listing(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slug": self.slug,
            "prompt": self.prompt,
            "has_heads": self.has_heads,
        }


def find_graphs(root: str | Path) -> list[GraphEntry]:
    """Every graph under ``root`` (module docstring), ids ``g0``, ``g1``, ... in path order.
    Raises :class:`TLCircuitsError` if ``root`` holds none."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    found: list[tuple[str, Path, Path]] = []
    if root.is_file():
        found += _json_file(root)
    elif _is_trace_dir(root):
        found += _trace_dir(root)
    else:
        for child in sorted(root.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() and not child.is_symlink():
                if _is_trace_dir(child):
                    found += _trace_dir(child)
                else:  # a folder of JSON files, one level down
                    for f in sorted(child.glob("*.json")):
                        if f.is_file() and not f.name.startswith("."):
                            found += _json_file(f)
            elif child.is_file() and child.suffix == ".json":
                found += _json_file(child)
    entries = []
    for kind, path, ann in found:
        try:
            meta = _describe(kind, path)
        except (TLCircuitsError, OSError, ValueError):
            continue  # not a graph: not listed
        entries.append(GraphEntry(f"g{len(entries)}", *meta, kind=kind, path=path, annotations=ann))
    if not entries:
        raise TLCircuitsError(f"{root}: no graph found (a trace folder or frontend JSON files)")
    return entries


def _is_trace_dir(path: Path) -> bool:
    return (
        any((path / n).is_file() for n in (VIEWER_FILE, "graph.json")) or (path / "pruned").is_dir()
    )


def _trace_dir(path: Path) -> list[tuple[str, Path, Path]]:
    ann = path / ANNOTATIONS_FILE
    if (path / VIEWER_FILE).is_file():
        return [("document", path / VIEWER_FILE, ann)]
    if (path / "pruned").is_dir():
        return [("pruned", path / "pruned", ann)]
    return [("document", path / "graph.json", ann)]


def _json_file(path: Path) -> list[tuple[str, Path, Path]]:
    if path.name in _SKIP_JSON or path.name.endswith("." + ANNOTATIONS_FILE):
        return []
    return [("document", path, path.with_name(f"{path.stem}.{ANNOTATIONS_FILE}"))]


def _describe(kind: str, path: Path) -> tuple[str, str, bool]:
    """slug, prompt, has_heads of a graph (raises if it is not one)."""
    if kind == "pruned":
        from tl_circuits.graph.graph import AttributionGraph

        graph = AttributionGraph.load(path)
        info = graph.info or {}
        prompt = info.get("prompt") if isinstance(info.get("prompt"), str) else None
        has_heads = (path / "head_loadings.safetensors").is_file()
        slug = info.get("slug") if isinstance(info.get("slug"), str) else path.parent.name
        return slug, prompt or "".join(graph.token_strings), has_heads
    doc = _read_json(path)
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    slug = meta.get("slug") if isinstance(meta.get("slug"), str) else path.stem
    prompt = meta.get("prompt") if isinstance(meta.get("prompt"), str) else ""
    block = (
        (doc.get("extra") or {}).get("tl_circuits") if isinstance(doc.get("extra"), dict) else None
    )
    has_heads = isinstance(block, dict) and bool(block.get("head_loadings"))
    return slug, prompt, has_heads


def _read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_GRAPH_FILE_BYTES:
        raise TLCircuitsError(f"{path}: too large")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise TLCircuitsError(f"{path}: not a graph JSON (no 'nodes' list)")
    if not isinstance(doc.get("links"), list):
        raise TLCircuitsError(f"{path}: not a graph JSON (no 'links' list)")
    return doc


class ViewerServer(ThreadingHTTPServer):
    """The HTTP server; ``graphs`` by id, the assets folder and a lock for writes."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], graphs: list[GraphEntry], assets: Path | None = None
    ) -> None:
        super().__init__(address, _Handler)
        self.graphs = {g.id: g for g in graphs}
        self.assets = (assets or assets_dir()).resolve()
        self.write_lock = threading.Lock()
        self._documents: dict[str, dict[str, Any]] = {}  # built from pruned/ folders

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def document(self, entry: GraphEntry) -> dict[str, Any]:
        """The graph's document with its saved annotations merged in (a fresh copy)."""
        if entry.kind == "pruned":
            if entry.id not in self._documents:
                self._documents[entry.id] = _document_of_pruned(entry.path)
            doc = json.loads(json.dumps(self._documents[entry.id]))
        else:
            doc = _read_json(entry.path)
        saved = self._saved_annotations(entry, doc)
        if saved is not None:
            merge_annotations(doc, saved)
        return doc

    def _saved_annotations(self, entry: GraphEntry, doc: dict[str, Any]) -> dict[str, Any] | None:
        if not entry.annotations.is_file():
            return None
        try:
            value = json.loads(entry.annotations.read_text(encoding="utf-8"))
            return check_annotations(value, set(node_ids(doc)))
        except (OSError, ValueError, TLCircuitsError):
            return None  # a broken or stale file is ignored, never served as is

    def save_annotations(self, entry: GraphEntry, value: Any) -> dict[str, Any]:
        doc = self.document(entry)
        clean = check_annotations(value, set(node_ids(doc)))
        with self.write_lock:
            write_text(entry.annotations, json.dumps(clean, indent=1) + "\n")
        return clean


def _document_of_pruned(path: Path) -> dict[str, Any]:
    from tl_circuits.attention.heads.loadings import HeadLoadings
    from tl_circuits.graph.graph import AttributionGraph
    from tl_circuits.viewer.data import viewer_document

    graph = AttributionGraph.load(path)
    hl = None
    if (path / "head_loadings.safetensors").is_file():
        hl = HeadLoadings.load(path, graph)
    return json.loads(json.dumps(viewer_document(graph, hl), allow_nan=False))


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "tl-circuits-viewer"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the command prints the URL only

    # ---- routing ---------------------------------------------------------------------

    def _route(self) -> tuple[str, list[str]] | None:
        """("kind", parts) of the request path, or None (404)."""
        raw = self.path.split("?", 1)[0].split("#", 1)[0]
        if "%2f" in raw.lower() or "%5c" in raw.lower() or "\\" in raw:
            return None
        parts = [urllib.parse.unquote(p) for p in raw.split("/")[1:]]
        if parts in ([""], []):
            return "index", []
        if parts[0] == "assets" and len(parts) >= 2:
            return "asset", parts[1:]
        if parts[:2] == ["api", "graphs"] and len(parts) == 2:
            return "graphs", []
        if parts[:2] == ["api", "graph"] and len(parts) == 3 and parts[2] in self.server.graphs:
            return "graph", [parts[2]]
        if (
            parts[:2] == ["api", "graph"]
            and len(parts) == 4
            and parts[2] in self.server.graphs
            and parts[3] == "annotations"
        ):
            return "annotations", [parts[2]]
        return None

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        bound = self.server.server_address[0]
        allowed = {str(bound).lower(), "localhost", "127.0.0.1", "[::1]"}
        if host.startswith("["):
            name = host.split("]")[0] + "]"
        else:
            name = host.rsplit(":", 1)[0] if ":" in host else host
        return name in allowed or str(bound) in ("0.0.0.0", "::")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        try:
            if not self._host_ok():
                return self._error(HTTPStatus.FORBIDDEN, "bad Host header")
            route = self._route()
            if route is None:
                return self._error(HTTPStatus.NOT_FOUND, "not found")
            kind, args = route
            allowed = {"annotations": ("POST",)}.get(kind, ("GET", "HEAD"))
            if method not in allowed:
                return self._error(
                    HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", allow=allowed
                )
            if kind == "annotations":
                return self._post_annotations(args[0])
            self._get(kind, args, head=method == "HEAD")
        except Exception:  # never leak a traceback or a path to the client
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    def _get(self, kind: str, args: list[str], *, head: bool) -> None:
        if kind == "index":
            body = served_html(assets_dir=self.server.assets).encode("utf-8")
            return self._send(HTTPStatus.OK, body, _CONTENT_TYPES[".html"], head=head)
        if kind == "asset":
            path = resolve_asset(self.server.assets, "/".join(args))
            if path is None:
                return self._error(HTTPStatus.NOT_FOUND, "not found")
            ctype = _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
            return self._send(HTTPStatus.OK, path.read_bytes(), ctype, head=head)
        if kind == "graphs":
            listing = [g.listing() for g in self.server.graphs.values()]
            return self._json(HTTPStatus.OK, listing, head=head)
        doc = self.server.document(self.server.graphs[args[0]])
        self._json(HTTPStatus.OK, doc, head=head)

    def _post_annotations(self, graph_id: str) -> None:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        n = int(length)
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            self._discard(min(n, DRAIN_BYTES))  # so the client can read the answer
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
        body = self.rfile.read(n)
        try:
            value = json.loads(body.decode("utf-8"))
            clean = self.server.save_annotations(self.server.graphs[graph_id], value)
        except (UnicodeDecodeError, ValueError, TLCircuitsError) as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc)[:300])
        self._json(HTTPStatus.OK, clean)

    def _discard(self, n: int) -> None:
        """Read and drop up to ``n`` bytes of a refused body (never kept in memory)."""
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                return
            n -= len(chunk)

    # ---- responses -------------------------------------------------------------------

    def _json(self, status: HTTPStatus, value: Any, *, head: bool = False) -> None:
        body = json.dumps(value, allow_nan=False, separators=(",", ":")).encode("utf-8")
        self._send(status, body, "application/json", head=head)

    def _error(self, status: HTTPStatus, message: str, allow: tuple[str, ...] = ()) -> None:
        body = json.dumps({"error": message}).encode("utf-8")
        extra = {"Allow": ", ".join(allow)} if allow else {}
        self._send(status, body, "application/json", headers=extra)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        ctype: str,
        *,
        head: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def make_server(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    assets: str | Path | None = None,
) -> ViewerServer:
    """A :class:`ViewerServer` for the graphs under ``root`` (not yet serving: call
    ``serve_forever``; ``port=0`` picks a free port, see ``server.url``)."""
    graphs = find_graphs(root)
    return ViewerServer((host, port), graphs, Path(assets) if assets is not None else None)
