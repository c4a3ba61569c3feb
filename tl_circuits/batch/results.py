"""A batch's results: one record per prompt, verified graph folders, ``results.parquet``.

Layout of a batch folder ``DIR``:

- ``DIR/graphs/{id}/``: the prompt's trace folder (:mod:`tl_circuits.batch.trace`),
  written atomically by a worker (:mod:`tl_circuits.batch.worker`)
- ``DIR/records/{id}.json``: the prompt's record, written atomically by the runner once the
  worker has answered: ``{"key": ..., "spec": {...}, "row": {...}}`` (``key``: the prompt,
  targets, model source and options it was traced with; ``row``: its results row)
- ``DIR/results.parquet``: the results table, one row per prompt of the last run, in its
  order (:data:`COLUMNS`), written at the end of a run and when it is interrupted

A prompt is **done** (skipped by a rerun) when its record says complete under the same
key and its folder verifies: both graphs load (every check of ``AttributionGraph.load``:
sealed header, tensor checksum, content id) and their ids are the ones recorded. A folder
without a record (the worker died before answering), a half-written one (a missing
header or tensor file) or one of other options is traced again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tl_circuits.batch.prompts import PromptSpec
from tl_circuits.errors import TLCircuitsError
from tl_circuits.graph.files import saved_graph_id
from tl_circuits.graph.graph import AttributionGraph
from tl_circuits.storage import write_atomically, write_text

RESULTS_FILE = "results.parquet"
INSTALL_HINT = "pip install 'tl_circuits[distributed]'"

#: the results table's columns, in order
COLUMNS = (
    "id",  # the prompt's id (its folder: graphs/{id}/)
    "status",  # "complete", "failed" or "pending" (not run: interrupted)
    "error",  # "Type: message" of a failed prompt
    "attempts",  # times the prompt was sent to a worker in the run that traced it
    "n_tokens",
    "n_features",  # feature nodes of the full graph
    "n_nodes",  # nodes of the full graph (features, errors, tokens, targets)
    "n_edges",  # nonzero edges of the full graph
    "pruned_n_nodes",
    "pruned_n_edges",
    "replacement",  # scores of the full graph (graph.scores())
    "completeness",
    "pruned_replacement",  # scores of the pruned graph
    "pruned_completeness",
    "top_target",  # the first target (the top logit by default)
    "top_features",  # up to 5 "L{layer} F{feature}" by influence in the pruned graph
    "top_heads",  # up to 5 "L{layer}H{head}" by |loading| on cross-position edges
    "seconds",  # wall time of the prompt in its worker (build, prune, loadings, write)
    "peak_rss_bytes",  # the worker's peak resident memory while it ran (model included)
    "peak_cuda_bytes",  # CUDA: peak allocated tensor memory while it ran
    "worker",  # host:pid
    "graph_id",  # content ids of graphs/{id}/graph and graphs/{id}/pruned
    "pruned_graph_id",
)

#: columns of whole numbers (nullable: empty for a failed or pending prompt)
INT_COLUMNS = (
    "attempts",
    "n_tokens",
    "n_features",
    "n_nodes",
    "n_edges",
    "pruned_n_nodes",
    "pruned_n_edges",
    "peak_rss_bytes",
    "peak_cuda_bytes",
)


def import_pandas() -> Any:
    """pandas (and pyarrow for parquet), or a TLCircuitsError saying how to install them."""
    try:
        import pandas
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise TLCircuitsError(
            f"batch results need pandas and pyarrow ({exc.name} is missing): {INSTALL_HINT}"
        ) from None
    return pandas


def record_path(out: Path, prompt_id: str) -> Path:
    return out / "records" / f"{prompt_id}.json"


def write_record(out: Path, spec: PromptSpec, key: str, row: dict[str, Any]) -> None:
    """Write the record of ``spec`` (module docstring) atomically."""
    record = {"key": key, "spec": spec.to_json(), "row": row}
    write_text(record_path(out, spec.id), json.dumps(record, allow_nan=True) + "\n")


def read_record(out: Path, prompt_id: str) -> dict[str, Any] | None:
    """The record of ``prompt_id``, or None when there is none or it cannot be read."""
    try:
        record = json.loads(record_path(out, prompt_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("row"), dict)
    return record if ok else None


def done_row(out: Path, spec: PromptSpec, key: str) -> dict[str, Any] | None:
    """The recorded row of ``spec`` if the prompt is done (module docstring), else None."""
    record = read_record(out, spec.id)
    if record is None or record.get("key") != key:
        return None
    row = record["row"]
    if row.get("status") != "complete":
        return None
    folder = out / "graphs" / spec.id
    for name, field in (("graph", "graph_id"), ("pruned", "pruned_graph_id")):
        if saved_graph_id(folder / name) != row.get(field) or not _loads(folder / name):
            return None
    return row


def _loads(folder: Path) -> bool:
    try:
        AttributionGraph.load(folder)
    except Exception:  # any failed check: the folder is not a finished trace
        return False
    return True


def results_table(out: Path, specs: list[PromptSpec], keys: dict[str, str]) -> Any:
    """The results DataFrame of ``specs`` from their records (``pending`` where a prompt
    has no record under its key)."""
    pd = import_pandas()
    rows = []
    for spec in specs:
        record = read_record(out, spec.id)
        if record is not None and record.get("key") == keys[spec.id]:
            rows.append({c: record["row"].get(c) for c in COLUMNS})
        else:
            rows.append({**dict.fromkeys(COLUMNS), "id": spec.id, "status": "pending"})
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.astype({c: "Int64" for c in INT_COLUMNS})


def write_parquet(table: Any, path: Path) -> None:
    """Write the DataFrame ``table`` to the parquet file ``path`` atomically (pyarrow)."""
    import_pandas()
    write_atomically(path, lambda tmp: table.to_parquet(tmp, engine="pyarrow", index=False))


def read_results(out: str | Path) -> Any:
    """The results table ``DIR/results.parquet`` of a batch folder."""
    pd = import_pandas()
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results table (write one with trace_many)")
    return pd.read_parquet(path, engine="pyarrow")
