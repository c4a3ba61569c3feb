"""Parallel exports into one directory keep every index entry (issue 14, exports item 4).

One helper process (this file run as a script) imports the package once, builds small
hand-made graphs, and forks ``WORKERS`` writer processes that start together and each
export ``N`` graphs into the same directory, plus one slug all of them write. The index
must then list every graph exactly once, and every file must be complete JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKERS = 3
N = 30
SHARED = "shared"


def _worker(out: Path, k: int, go: Path) -> None:
    from test_graph_files import make_graph

    graph = make_graph()
    while not go.exists():
        time.sleep(0.001)
    for i in range(N):
        graph.to_json(out, slug=f"w{k}-g{i}")
        if i % 10 == 0:
            graph.to_json(out, slug=SHARED)


def _spawn(out: Path) -> int:
    """Fork the workers, start them together, return how many failed."""
    import torch

    torch.set_num_threads(1)  # no thread pool to break in the forked children
    from test_graph_files import make_graph

    import tl_circuits.graph.frontend  # noqa: F401  (import once, before forking)

    make_graph()
    go = out / "go"
    pids = []
    for k in range(WORKERS):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker(out, k, go)
            except BaseException as e:  # report, and exit without running pytest teardown
                print(f"worker {k}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        pids.append(pid)
    time.sleep(0.2)
    go.touch()
    return sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)


def test_parallel_exports_keep_every_index_entry(tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((out / "graph-metadata.json").read_text())
    slugs = [g["slug"] for g in index["graphs"]]
    expected = {f"w{k}-g{i}" for k in range(WORKERS) for i in range(N)} | {SHARED}
    assert len(slugs) == len(set(slugs)) == len(expected)
    assert set(slugs) == expected
    for slug in expected:
        doc = json.loads((out / f"{slug}.json").read_text())
        assert doc["metadata"]["slug"] == slug
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


if __name__ == "__main__":
    sys.exit(_spawn(Path(sys.argv[1])))
