"""``tl-circuits serve``: browse traced graphs in the interactive viewer."""

from __future__ import annotations

import argparse
import webbrowser
from pathlib import Path
from typing import Any

from tl_circuits.cli.sources import SourceError

DESCRIPTION = """\
Serve the interactive graph viewer on this machine (standard library only, bound to
127.0.0.1 unless --host says otherwise). PATH is a `tl-circuits trace` output folder, a
folder of them, or a folder of frontend graph JSON files (ours, or plain circuit-tracer /
Neuronpedia ones). Pins and supernodes made in the page are saved beside each graph
(viewer_annotations.json). Stop it with Ctrl-C.

Every trace also writes OUT/viewer.html, the same viewer as one self-contained file.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the interactive graph viewer for traced graphs",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", type=Path, metavar="PATH", help="trace folder(s) or graph JSON files")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    p.add_argument("--port", type=int, default=8765, help="(%(default)s; 0: any free port)")
    p.add_argument("--no-open", action="store_true", help="do not open a browser")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tl_circuits.viewer.server import make_server

    if not 0 <= args.port <= 65535:
        raise SourceError(f"--port must be in 0..65535, got {args.port}")
    server = make_server(args.path, args.host, args.port)
    try:
        print(f"serving {len(server.graphs)} graph(s) from {args.path} at {server.url}", flush=True)
        if not args.no_open:
            webbrowser.open(server.url)
        server.serve_forever()
    finally:
        server.server_close()
    return 0
