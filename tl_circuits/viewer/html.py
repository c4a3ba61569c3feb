"""The viewer's HTML page: served (assets by URL, data from the API) or self-contained.

``assets/index.html`` holds three markers: ``<!--TL-CSS-->``, ``<!--TL-JS-->`` and
``<!--TL-DATA-->``, the first two optionally spans closed by ``<!--/TL-CSS-->`` /
``<!--/TL-JS-->`` around the served page's tags (only the last marker of each kind
counts). :func:`self_contained_html` replaces them (spans included) with the inlined stylesheet,
the inlined scripts (:data:`JS_ASSETS` in order, those that exist) and the document as
``<script type="application/json" id="tl-graph">`` (``<``, ``>``, ``&``, U+2028, U+2029
written as ``\\u003c`` ... inside the JSON, so no string in it can end the script element);
any ``<link rel="stylesheet" href="assets/...">`` or ``<script src="assets/..."></script>``
the page names directly is inlined too. :func:`served_html` replaces the placeholders with
links to ``assets/...`` and no data (the page fetches ``api/graphs``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tl_circuits.errors import TLCircuitsError

__all__ = ["CSS_ASSETS", "JS_ASSETS", "assets_dir", "self_contained_html", "served_html"]

#: the stylesheets and scripts the placeholders stand for, in order (missing ones skipped)
CSS_ASSETS = ("style.css",)
JS_ASSETS = ("vendor/d3.min.js", "app.js")
PLACEHOLDERS = ("<!--TL-CSS-->", "<!--TL-JS-->", "<!--TL-DATA-->")
DATA_ELEMENT_ID = "tl-graph"

_MARKER = re.compile(r"<!--TL-(CSS|JS|DATA)-->(?:(.*?)<!--/TL-\1-->)?", re.DOTALL)
_LINK_TAG = re.compile(
    r"""<link\b[^>]*?\bhref\s*=\s*["'](?:\./)?assets/([^"'?#]+)["'][^>]*>""", re.IGNORECASE
)
_SCRIPT_TAG = re.compile(
    r"""<script\b[^>]*?\bsrc\s*=\s*["'](?:\./)?assets/([^"'?#]+)["'][^>]*>\s*</script\s*>""",
    re.IGNORECASE,
)
_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def assets_dir() -> Path:
    """The package's viewer assets folder."""
    return Path(__file__).resolve().parent / "assets"


def script_json(document: Any) -> str:
    """``document`` as JSON safe inside a ``<script>`` element (no ``<``, ``>``, ``&``)."""
    text = json.dumps(document, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m.group(0)], text)


def self_contained_html(document: Any, *, assets_dir: str | Path | None = None) -> str:
    """One HTML file that shows ``document`` with no other file and no network."""
    root = _root(assets_dir)
    page = _index(root)
    css = "".join(_style(_read_asset(root, a)) for a in CSS_ASSETS if _exists(root, a))
    js = "".join(_script(_read_asset(root, a)) for a in JS_ASSETS if _exists(root, a))
    data = (
        f'<script type="application/json" id="{DATA_ELEMENT_ID}">{script_json(document)}</script>'
    )

    def inline_tags(segment: str) -> str:  # tags naming assets directly, outside the spans
        segment = _LINK_TAG.sub(lambda m: _style(_read_asset(root, m.group(1))), segment)
        return _SCRIPT_TAG.sub(lambda m: _script(_read_asset(root, m.group(1))), segment)

    return _fill(page, {"CSS": css, "JS": js, "DATA": data}, inline_tags)


def served_html(*, assets_dir: str | Path | None = None, prefix: str = "assets/") -> str:
    """``index.html`` for the server: a marker span (``<!--TL-CSS-->...<!--/TL-CSS-->``)
    is kept as it is (its tags load ``assets/...``); a bare marker becomes links to
    ``{prefix}...``; the data marker stays empty (the page fetches ``api/graphs``)."""
    root = _root(assets_dir)
    page = _index(root)
    css = "".join(
        f'<link rel="stylesheet" href="{prefix}{a}">' for a in CSS_ASSETS if _exists(root, a)
    )
    js = "".join(f'<script src="{prefix}{a}"></script>' for a in JS_ASSETS if _exists(root, a))
    return _fill(page, {"CSS": css, "JS": js, "DATA": ""}, lambda x: x, keep_spans=True)


def _fill(
    page: str,
    content: dict[str, str],
    outside: Callable[[str], str],
    *,
    keep_spans: bool = False,
) -> str:
    """Replace the last marker of each kind (with its span, if it has one) by
    ``content[kind]``; ``outside`` maps the text between the replaced markers. Earlier
    markers of a kind (e.g. named in a comment) are left alone."""
    last: dict[str, re.Match[str]] = {}
    for m in _MARKER.finditer(page):
        last[m.group(1)] = m
    chosen = sorted(last.values(), key=lambda m: m.start())
    out, at = [], 0
    for m in chosen:
        out.append(outside(page[at : m.start()]))
        if keep_spans and m.group(2) is not None:
            out.append(m.group(0))
        else:
            out.append(content[m.group(1)])
        at = m.end()
    out.append(outside(page[at:]))
    return "".join(out)


def resolve_asset(root: Path, name: str) -> Path | None:
    """``root/name`` if it is a regular file inside ``root`` after resolving every link,
    else ``None`` (no ``..``, absolute paths, symlinks out, hidden files)."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    base = root.resolve()
    try:
        path = (base / name).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def _root(assets: str | Path | None) -> Path:
    return Path(assets) if assets is not None else assets_dir()


def _index(root: Path) -> str:
    path = resolve_asset(root, "index.html")
    if path is None:
        raise TLCircuitsError(f"the viewer page {root / 'index.html'} is missing")
    return path.read_text(encoding="utf-8")


def _exists(root: Path, name: str) -> bool:
    return resolve_asset(root, name) is not None


def _read_asset(root: Path, name: str) -> str:
    path = resolve_asset(root, name)
    if path is None:
        raise TLCircuitsError(f"the viewer page names {name!r}, not a file in {root}")
    return path.read_text(encoding="utf-8")


def _style(css: str) -> str:
    return "<style>" + re.sub(r"</(style)", r"<\\/\1", css, flags=re.IGNORECASE) + "</style>"


def _script(js: str) -> str:
    # "</script" inside a script (a string literal) would end the element: break it up
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    js = js.replace("<!--", "<\\!--")
    return "<script>" + js + "</script>"
