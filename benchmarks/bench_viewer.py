"""The graph viewer's frontend at scale, in headless Chromium (issue 15).

A synthetic viewer document of ``--nodes`` nodes and ``--links`` links (default 5,000 and
50,000) is written as a self-contained ``viewer.html`` and opened from ``file://``. Per
repeat (a fresh page each time) it measures:

- first render: the page's ``performance.now()`` when the graph was first drawn (from
  navigation start: HTML parse, d3 and app.js, JSON parse, adjacency, layout, first draw),
  and the wall time from ``page.goto`` to the page reporting ready;
- click-to-panel: real mouse clicks on ``--clicks`` random drawn nodes (after one warm-up
  click per page); in the page: the click handler (hit test, node panel built and laid
  out: ``click_handler``), from the input event's timestamp to the same point
  (``click_to_panel``: adds the browser's input queue) and to the next frame, in which the
  graph is redrawn with the selection (``click_to_paint``); and the wall time from
  Playwright's click to the page reporting the click painted (adds the CDP round trips);
- threshold: moving the edge slider (re-filtering the 50,000 links and redrawing).

Output: a table on stdout, JSON in ``benchmarks/results/viewer.json`` (``--out``).

    python benchmarks/bench_viewer.py [--nodes 5000] [--links 50000] [--repeats 5] [--clicks 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_document(
    n_nodes: int,
    n_links: int,
    *,
    n_layers: int = 12,
    n_pos: int = 40,
    n_heads: int = 12,
    seed: int = 0,
) -> dict[str, Any]:
    """A viewer document with the shape of a big pruned graph (random weights)."""
    rng = random.Random(seed)
    tokens = ["<bos>"] + [f" tok{i}" for i in range(1, n_pos)]
    nodes: list[dict[str, Any]] = []

    def node(nid, layer, pos, ftype, **kw):
        d = {
            "node_id": nid,
            "feature": kw.pop("feature", None),
            "layer": layer,
            "ctx_idx": pos,
            "feature_type": ftype,
            "clerp": kw.pop("clerp", ""),
            "influence": kw.pop("influence", None),
            "activation": kw.pop("activation", None),
            "is_target_logit": False,
            "token_prob": 0.0,
        }
        d.update(kw)
        nodes.append(d)

    for p in range(n_pos):
        node(f"E_{p}_{p}", "E", p, "embedding")
    for m in range(n_layers):
        for p in range(n_pos):
            node(f"{m}_-1_{p}", str(m), p, "mlp reconstruction error")
    n_logits = 5
    n_features = max(0, n_nodes - len(nodes) - n_logits)
    for i in range(n_features):
        m, p = rng.randrange(n_layers), rng.randrange(n_pos)
        node(
            f"{m}_{i}_{p}",
            str(m),
            p,
            "cross layer transcoder",
            feature=i,
            influence=rng.random(),
            activation=rng.expovariate(1.0),
            clerp=f"feature {i}",
        )
    for j in range(n_logits):
        node(
            f"{n_layers + 1}_{j}_{n_pos - 1}",
            str(n_layers + 1),
            n_pos - 1,
            "logit",
            is_target_logit=True,
            token_prob=0.5 / (j + 1),
            clerp=f'Output "t{j}"',
        )

    def row(n):
        if n["feature_type"] == "logit":
            return n_layers + 1
        return 0 if n["layer"] == "E" else int(n["layer"]) + 1

    rows = [row(n) for n in nodes]
    by_row: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_row.setdefault(r, []).append(i)
    links, seen = [], set()
    while len(links) < n_links:
        t = rng.randrange(len(nodes))
        if rows[t] == 0:
            continue
        sr = rng.randrange(rows[t])
        if sr not in by_row:
            continue
        s = rng.choice(by_row[sr])
        if nodes[s]["ctx_idx"] > nodes[t]["ctx_idx"] or (s, t) in seen:
            continue
        seen.add((s, t))
        links.append(
            {
                "source": nodes[s]["node_id"],
                "target": nodes[t]["node_id"],
                "weight": rng.gauss(0, 1) * rng.expovariate(1.0),
            }
        )
    # head loadings of the 300 strongest links (as the backend writes by default)
    strongest = sorted(links, key=lambda lk: -abs(lk["weight"]))[:300]
    link_heads = {}
    for lk in strongest:
        loads = [[rng.gauss(0, 0.3) for _ in range(n_heads)] for _ in range(2)]
        link_heads[f"{lk['source']}->{lk['target']}"] = {
            "layers": [0, 1],
            "loadings": loads,
            "bypass": [0.1, -0.1],
            "weight": lk["weight"],
        }
    return {
        "metadata": {"slug": "synthetic", "prompt": "".join(tokens), "prompt_tokens": tokens},
        "qParams": {},
        "nodes": nodes,
        "links": links,
        "extra": {
            "tl_circuits": {
                "n_layers": n_layers,
                "head_loadings": {
                    "top_heads": 3,
                    "n_layers": n_layers,
                    "n_heads": n_heads,
                    "head_totals": [
                        [abs(rng.gauss(0, 1)) for _ in range(n_heads)] for _ in range(n_layers)
                    ],
                    "links": {},
                },
                "qk": None,
                "viewer": {
                    "version": 1,
                    "n_layers": n_layers,
                    "n_heads": n_heads,
                    "n_pos": n_pos,
                    "prompt_tokens": tokens,
                    "attention": {},
                    "link_heads": link_heads,
                    "feature_cards": {},
                    "annotations": {"pinned": [], "supernodes": []},
                },
            }
        },
    }


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))],
        "n": len(xs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--links", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "viewer.json"))
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from tl_circuits.viewer.html import self_contained_html

    doc = synthetic_document(args.nodes, args.links)
    html = self_contained_html(doc)
    tmp = Path(tempfile.mkdtemp(prefix="bench_viewer_"))
    path = tmp / "viewer.html"
    path.write_text(html, encoding="utf-8")
    size_mib = path.stat().st_size / 2**20
    print(
        f"document: {len(doc['nodes'])} nodes, {len(doc['links'])} links; "
        f"viewer.html {size_mib:.1f} MiB"
    )

    first, first_wall, click_ms, paint_ms, click_wall, slider = [], [], [], [], [], []
    handler_ms: list[float] = []
    rng = random.Random(1)
    with sync_playwright() as p:
        kw: dict[str, Any] = {"args": ["--no-sandbox", "--disable-gpu"]}
        if args.chromium and Path(args.chromium).exists():
            kw["executable_path"] = args.chromium
        browser = p.chromium.launch(**kw)
        for rep in range(args.repeats):
            context = browser.new_context(viewport={"width": 1500, "height": 900})
            page = context.new_page()
            t0 = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            first_wall.append((time.perf_counter() - t0) * 1000)
            first.append(page.evaluate("window.tlViewer.timings.firstRender"))
            counts = page.evaluate("window.tlViewer.counts()")
            ids = [n["node_id"] for n in doc["nodes"]]
            done = -1  # one warm-up click per page, not counted
            while done < max(1, args.clicks // args.repeats) + (
                args.clicks % args.repeats if rep == 0 else 0
            ):
                nid = rng.choice(ids)
                pos = page.evaluate("id => window.tlViewer.nodeScreenPosition(id)", nid)
                if not pos["visible"] or not (0 < pos["x"] < 1100 and 50 < pos["y"] < 820):
                    continue
                # the node under the pointer may be a neighbour: find out which one it picks
                t1 = time.perf_counter()
                page.mouse.click(pos["x"], pos["y"])
                page.wait_for_function(
                    "() => { const c = window.tlViewer.timings.lastClick;"
                    " return c && c.paintMs !== null; }"
                )
                rec = page.evaluate("window.tlViewer.timings.lastClick")
                page.evaluate("window.tlViewer.timings.lastClick = null")
                if rec["what"] != "node":
                    continue
                if done < 0:
                    done += 1
                    continue
                handler_ms.append(rec["handlerMs"])
                click_wall.append((time.perf_counter() - t1) * 1000)
                click_ms.append(rec["ms"])
                paint_ms.append(rec["paintMs"])
                done += 1
            slider.append(
                page.evaluate("""() => { const t = performance.now();
                window.tlViewer.setThresholds(null, 0.5); return performance.now() - t; }""")
            )
            context.close()
        browser.close()

    res = {
        "nodes": len(doc["nodes"]),
        "links": len(doc["links"]),
        "html_mib": round(size_mib, 2),
        "drawn_edges_at_load": counts["drawnEdges"],
        "first_render_ms": _stats(first),
        "first_render_wall_ms": _stats(first_wall),
        "click_handler_ms": _stats(handler_ms),
        "click_to_panel_ms": _stats(click_ms),
        "click_to_paint_ms": _stats(paint_ms),
        "click_to_panel_wall_ms": _stats(click_wall),
        "edge_slider_to_50pct_ms": _stats(slider),
        "repeats": args.repeats,
    }
    print(f"{'measure':34s} {'median':>9s} {'min':>9s} {'max':>9s}  n")
    for k in (
        "first_render_ms",
        "first_render_wall_ms",
        "click_handler_ms",
        "click_to_panel_ms",
        "click_to_paint_ms",
        "click_to_panel_wall_ms",
        "edge_slider_to_50pct_ms",
    ):
        s = res[k]
        print(f"{k:34s} {s['median']:9.1f} {s['min']:9.1f} {s['max']:9.1f}  {s['n']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
