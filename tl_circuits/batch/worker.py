"""One prompt's work in a batch, and the worker that does it.

:func:`trace_one` builds a prompt's graph (``AttributionGraph.build`` with the batch's
build options), prunes it, computes the head loadings of its strongest edges, writes the
trace folder (:mod:`tl_circuits.batch.trace`) atomically and returns the prompt's results
row. A prompt that fails returns a row with ``status="failed"`` and ``error="Type:
message"``; it never raises (a worker that dies is the runner's business).

Atomic folders: the trace is written into ``graphs/.tmp-{id}-{random}/`` and renamed to
``graphs/{id}/`` (``os.rename``, atomic on POSIX), so ``graphs/{id}/`` is complete or
absent. A folder already there (from an unrecorded or unverified earlier attempt) is first
renamed aside to ``graphs/.old-{id}-{random}/`` and removed after. Dot folders are never
read as graphs; the runner removes leftovers while it holds the batch's lock.

Peak memory of a prompt (``peak_rss_bytes``): the worker process's peak resident set size
while the prompt ran, model and dictionaries included (Linux: the peak is reset by writing
``5`` to ``/proc/self/clear_refs`` and read as ``VmHWM``; elsewhere the process's lifetime
peak, ``resource.getrusage``). On CUDA ``peak_cuda_bytes`` is
``torch.cuda.max_memory_allocated`` after a reset (tensors only, not the caching
allocator's reserve).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tl_circuits.batch.prompts import PromptSpec, build_targets
from tl_circuits.batch.recurrence import summarize
from tl_circuits.batch.sources import ModelSource, load_source
from tl_circuits.batch.trace import save_trace, strongest_head_loadings
from tl_circuits.graph.causal_adjacency import row_groups
from tl_circuits.graph.files import graph_id
from tl_circuits.graph.graph import AttributionGraph

#: how many features and heads a results row lists (strongest first)
TOP_K = 5

Loader = Callable[[], tuple[Any, Any]]


@dataclass(frozen=True)
class TraceOptions:
    """What every prompt of a batch is traced with.

    - ``build``: keyword options of ``AttributionGraph.build`` (``max_feature_nodes``,
      ``batch_size``, ``memory_limit_bytes``, ...; ``targets`` come per prompt)
    - ``node_threshold``, ``edge_threshold``: the pruning thresholds (``graph.prune``)
    - ``head_edges``: head loadings for this many strongest edges of the pruned graph
    - ``write_json``: also write ``graph.json`` (the pruned graph for the frontend)
    - ``min_head_share``: a head counts as carrying a cross-position edge when
      ``|loading| >= min_head_share * |edge|`` (the rows' ``top_heads``; recurrence)
    """

    build: dict[str, Any] = field(default_factory=dict)
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    head_edges: int = 100
    write_json: bool = False
    min_head_share: float = 0.25

    def to_json(self) -> dict[str, Any]:
        return {
            "build": {k: self.build[k] for k in sorted(self.build)},
            "node_threshold": self.node_threshold,
            "edge_threshold": self.edge_threshold,
            "head_edges": self.head_edges,
            "write_json": self.write_json,
            "min_head_share": self.min_head_share,
        }


def trace_one(
    model: Any,
    transcoders: Any,
    spec: PromptSpec,
    options: TraceOptions,
    graphs_dir: Path,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results row of ``spec`` after writing ``graphs_dir/{id}/`` (module docstring).
    ``source``: the model-source record stored in the graphs' ``info["source"]``."""
    start = time.perf_counter()
    memory = PeakMemory(model)
    try:
        row = _trace(model, transcoders, spec, options, graphs_dir, source)
    except Exception as exc:  # the prompt's failure, recorded; the batch goes on
        row = failed_row(spec, f"{type(exc).__name__}: {exc}")
    row.update(seconds=time.perf_counter() - start, **memory.read(), worker=worker_name())
    return row


def _trace(
    model: Any,
    transcoders: Any,
    spec: PromptSpec,
    options: TraceOptions,
    graphs_dir: Path,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    build = {"show_progress": False, **options.build}
    graph = AttributionGraph.build(
        model, transcoders, spec.prompt, targets=build_targets(spec.targets), **build
    )
    if source is not None:
        graph.info["source"] = source
    pruned = graph.prune(
        node_threshold=options.node_threshold, edge_threshold=options.edge_threshold
    )
    loadings = strongest_head_loadings(pruned, options.head_edges)
    row = graph_row(spec, graph, pruned, loadings, options.min_head_share)
    write_folder(graphs_dir, spec.id, graph, pruned, loadings, options.write_json)
    row["graph_id"] = graph_id(graph)
    row["pruned_graph_id"] = graph_id(pruned)
    return row


def graph_row(
    spec: PromptSpec, graph: AttributionGraph, pruned: AttributionGraph, loadings: Any, share: float
) -> dict[str, Any]:
    """The results row of a traced prompt: sizes, scores, top target, features and heads."""
    full, kept = graph.scores(), pruned.scores()
    summary = summarize(pruned, loadings, min_head_share=share)
    features = sorted(summary.features.items(), key=lambda kv: -kv[1])[:TOP_K]
    heads = sorted(summary.heads.items(), key=lambda kv: -sum(abs(v) for v, _ in kv[1]))[:TOP_K]
    top = int(graph.indices("target")[0])
    return {
        "id": spec.id,
        "status": "complete",
        "error": None,
        "n_tokens": len(graph.tokens),
        "n_features": graph.nodes.count("feature"),
        "n_nodes": graph.n_nodes,
        "n_edges": sum(int((g.values != 0).sum()) for g in row_groups(graph.edges)),
        "pruned_n_nodes": pruned.n_nodes,
        "pruned_n_edges": int((pruned.adjacency != 0).sum()),
        "replacement": full.replacement,
        "completeness": full.completeness,
        "pruned_replacement": kept.replacement,
        "pruned_completeness": kept.completeness,
        "top_target": graph.node_label(top),
        "top_features": [f"L{layer} F{feature}" for (layer, feature), _ in features],
        "top_heads": [f"L{layer}H{head}" for (layer, head), _ in heads],
    }


def failed_row(spec: PromptSpec, error: str) -> dict[str, Any]:
    """The results row of a prompt that failed with ``error`` (``"Type: message"``)."""
    return {"id": spec.id, "status": "failed", "error": error}


def write_folder(
    graphs_dir: Path,
    prompt_id: str,
    graph: AttributionGraph,
    pruned: AttributionGraph,
    loadings: Any,
    write_json: bool,
) -> Path:
    """Write ``graphs_dir/{prompt_id}/`` all at once (module docstring); return it."""
    tag = uuid.uuid4().hex[:12]
    tmp = graphs_dir / f".tmp-{prompt_id}-{tag}"
    final = graphs_dir / prompt_id
    try:
        save_trace(tmp, graph, pruned, loadings, write_json=write_json)
        old = None
        if os.path.lexists(final):
            old = graphs_dir / f".old-{prompt_id}-{tag}"
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def worker_name() -> str:
    """``host:pid`` of this process (which worker traced a prompt)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class PeakMemory:
    """The peak memory of what runs between construction and :meth:`read` (module doc)."""

    def __init__(self, model: Any) -> None:
        self.reset = _reset_peak_rss()
        device = getattr(getattr(model, "cfg", None), "device", "cpu")
        self.cuda = torch.cuda.is_available() and str(device).startswith("cuda")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, int | None]:
        return {
            "peak_rss_bytes": _peak_rss_bytes(),
            "peak_cuda_bytes": int(torch.cuda.max_memory_allocated()) if self.cuda else None,
        }


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


class TraceWorker:
    """A batch worker (a Ray actor): loads the model and transcoders once, then traces the
    prompts it is sent, with the options and into the folder each call names (so a worker
    serves several batches of one model). Never raises from the constructor: a load
    failure is kept and handed to the runner by :meth:`ready`, which stops the batch."""

    def __init__(self, source: ModelSource | None, loader: Loader | None) -> None:
        self.source = source.to_json() if source is not None else None
        self.load_error: BaseException | None = None
        try:
            if loader is not None:
                self.model, self.transcoders = loader()
            else:
                assert source is not None
                self.model, self.transcoders = load_source(source)
        except Exception as exc:
            self.load_error = exc

    def ready(self) -> BaseException | None:
        """None once the model is loaded, else the exception loading raised."""
        return self.load_error

    def trace(self, spec: PromptSpec, options: TraceOptions, graphs_dir: str) -> dict[str, Any]:
        """The results row of ``spec`` (:func:`trace_one`)."""
        return trace_one(self.model, self.transcoders, spec, options, Path(graphs_dir), self.source)
