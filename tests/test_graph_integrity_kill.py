"""Interrupted saves (issue 14): processes saving graphs in a loop are killed with SIGKILL
at random points; every folder (and single file) left behind loads as one of the graphs
written, complete, never a mix, and the next save clears what the killed one left."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import torch
from test_graph_files import make_graph
from test_graph_integrity import causal_graph, graphs_equal

from tl_circuits.graph.files import HEADER_FILE, load_graph, save_graph, tensor_path


def _child(path: str, conn) -> None:  # runs in a forked process until killed
    torch.set_num_threads(1)
    todo = graphs()
    save_graph(todo[0], path)
    conn.send("ready")
    i = 1
    while True:
        save_graph(todo[i % len(todo)], path)
        i += 1


def graphs():
    """Causal and dense graphs, so that saves switch layouts (blocks, sparse, dense)."""
    return [
        causal_graph(0, density=0.9),
        make_graph(density=1.0, seed=1),
        causal_graph(1, density=0.05),
        make_graph(density=0.2, seed=2),
    ]


def test_killed_saves_leave_a_complete_graph(tmp_path):
    torch.set_num_threads(1)  # no thread pool to break in the forked children
    written = graphs()
    fork = multiprocessing.get_context("fork")
    rng = random.Random(14)
    targets = [tmp_path / "g", tmp_path / "single.safetensors"]
    for round_ in range(12):
        path = targets[round_ % 2]
        ours, theirs = fork.Pipe()
        child = fork.Process(target=_child, args=(str(path), theirs), daemon=True)
        child.start()
        try:
            assert ours.poll(30), "the saving process did not start"
            assert ours.recv() == "ready"
            time.sleep(rng.uniform(0.0, 0.1))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            ours.close()
            theirs.close()
        loaded = load_graph(path)
        matches = [i for i, g in enumerate(written) if graphs_equal(g, loaded)]
        assert len(matches) == 1, (round_, path)
    for path in targets:
        # the next save leaves only its own files: no temporary or orphan files
        save_graph(written[0], path)
        assert graphs_equal(written[0], load_graph(path))
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"g", "single.safetensors"}
    assert {p.name for p in targets[0].iterdir()} == {HEADER_FILE, tensor_path(targets[0]).name}
