"""Writes killed with SIGKILL at random times leave complete files (issue 14, exports item 3).

One helper process (this file run as a script) imports the package once and, ``ROUNDS``
times, forks a writer that rewrites a picture (SVG, PNG), a graph JSON file and a graph in
a directory (with its index) in a loop, lets it run a random while (0.05 to 0.8 s; one
loop takes about 0.3 s), kills it with SIGKILL,
and checks every file present: the SVG parses as XML, the PNG ends with its IEND chunk, the
JSON parses. A killed writer cannot remove its temporary file; it is hidden and named after
its target and its process (``.{name}.{host}.{pid}.{random}.tmp``, storage.py), readers
ignore it, and the next successful write of the same target removes it, which is checked
at the end.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROUNDS = 4
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _write_all(out: Path, graph) -> None:
    from tl_circuits.export.picture import save_graph_picture

    save_graph_picture(graph, out / "pic", formats=("svg", "png"))
    graph.to_json(out / "g.json", indent=1)
    graph.to_json(out / "site", slug="s", indent=1)


def _problems(out: Path) -> list[str]:
    """What is incomplete among the files present."""
    bad = []
    for path in sorted(out.rglob("*")):
        name = path.name
        try:
            if name.endswith(".svg"):
                ET.parse(path)
            elif name.endswith(".png"):
                if not path.read_bytes().endswith(PNG_END):
                    bad.append(f"{path}: no IEND chunk ({path.stat().st_size} bytes)")
            elif name.endswith(".json"):
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # any failure to read is a broken file
            bad.append(f"{path}: {type(e).__name__}: {e}")
    return bad


def _temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))


def _spawn(out: Path, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)  # no thread pool to break in the forked children
    from test_graph_files import make_graph

    graph = make_graph()
    (out / "site").mkdir()
    _write_all(out, graph)  # the files to be replaced; warms matplotlib before forking
    rng = random.Random(seed)
    rounds = []
    for _ in range(ROUNDS):
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    _write_all(out, graph)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.8))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        rounds.append({"problems": _problems(out), "temporaries": _temporaries(out)})
    _write_all(out, graph)  # one successful write of every target, in a live process
    index = json.loads((out / "site" / "graph-metadata.json").read_text())
    return {
        "rounds": rounds,
        "after": _temporaries(out),
        "problems": _problems(out),
        "slugs": [g["slug"] for g in index["graphs"]],
    }


def test_killed_writers_leave_complete_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    seed = random.SystemRandom().randrange(2**32)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run(
        [sys.executable, __file__, str(out), str(seed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for r, result in enumerate(report["rounds"]):
        assert result["problems"] == [], f"seed {seed}, round {r}"
        # a temporary left by the kill is hidden and named after its target
        for tmp in result["temporaries"]:
            name = Path(tmp).name
            assert re.fullmatch(
                r"\.(pic\.svg|pic\.png|g\.json|s\.json|graph-metadata\.json)"
                r"\.[0-9a-f]{8}\.\d+\.[^.]+\.tmp",
                name,
            ), tmp
    assert report["problems"] == []
    assert report["after"] == [], "the next write of each target removes dead temporaries"
    assert report["slugs"] == ["s"]
    assert sorted(p.name for p in out.iterdir()) == ["g.json", "pic.png", "pic.svg", "site"]


if __name__ == "__main__":
    target = Path(sys.argv[1])
    result = _spawn(target, int(sys.argv[2]))
    (target.parent / "report.json").write_text(json.dumps(result, indent=1))
