"""``tl-circuits trace`` killed at random points (issue 14): afterwards every output that is
present is complete (graph folders load, JSON parses, SVG is XML, PNG has its end chunk),
and a folder whose graph/ and pruned/ come from different runs is refused, never mixed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tl_circuits import TLCircuitsError
from tl_circuits.cli.options import load_graph_dir
from tl_circuits.graph import AttributionGraph

RUNS = 3


def _trace(out: Path, example: str) -> subprocess.Popen:
    code = (
        "import sys; from tl_circuits.cli import main; "
        f"sys.exit(main(['trace', '--example', {example!r}, '--out', {str(out)!r}]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL)


def _check_outputs(out: Path) -> None:
    for name in ("graph", "pruned"):
        if (out / name / "graph.json").exists():
            try:
                AttributionGraph.load(out / name)
            except TLCircuitsError:
                pass  # a clear refusal is allowed; a partial graph is not
    for path in out.glob("*.json"):
        json.loads(path.read_text())
    for path in out.glob("*.svg"):
        ET.fromstring(path.read_bytes())
    for path in out.glob("*.png"):
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), path
    try:
        pruned = load_graph_dir(out)
    except (TLCircuitsError, FileNotFoundError):
        return
    full = out / "graph"
    if full.is_dir() and "full_graph_id" in pruned.info:
        from tl_circuits.graph.files import saved_graph_id

        assert saved_graph_id(full) == pruned.info["full_graph_id"]


@pytest.fixture(scope="module")
def complete_runs(tmp_path_factory) -> dict[str, Path]:
    """One complete trace of each prompt (the kill runs overwrite copies of the first)."""
    root = tmp_path_factory.mktemp("complete")
    procs = {name: _trace(root / name, name) for name in ("induction", "fact")}
    for proc in procs.values():
        assert proc.wait(timeout=240) == 0
    return {name: root / name for name in procs}


@pytest.mark.parametrize("seed", range(RUNS))
def test_trace_killed_at_random_leaves_no_partial_or_mixed_output(
    tmp_path, seed, complete_runs
) -> None:
    rng = random.Random(seed)
    out = tmp_path / "out"
    shutil.copytree(complete_runs["induction"], out)  # a complete run to overwrite
    proc = _trace(out, "fact")  # another prompt: mixing would be visible
    time.sleep(rng.uniform(8.0, 14.0))  # importing takes most of it; the writes come last
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _check_outputs(out)


def test_mixed_runs_are_refused(tmp_path, complete_runs) -> None:
    out, other = tmp_path / "out", tmp_path / "other"
    shutil.copytree(complete_runs["induction"], out)
    shutil.copytree(complete_runs["fact"], other)
    assert load_graph_dir(out).info["full_graph_id"]  # a consistent folder loads
    (out / "graph").rename(tmp_path / "old_graph")
    (other / "graph").rename(out / "graph")  # graph/ of another run
    with pytest.raises(TLCircuitsError, match="different runs"):
        load_graph_dir(out)
