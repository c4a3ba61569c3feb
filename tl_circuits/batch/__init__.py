"""Many prompts: batch tracing on Ray and what recurs across the graphs (docs/distributed.md).

- :mod:`~tl_circuits.batch.sources`: :class:`ModelSource`, the record of a model and its
  transcoders, and :func:`load_source` (the command line reads them too)
- :mod:`~tl_circuits.batch.prompts`: prompts files (JSON lines) and ids
- :mod:`~tl_circuits.batch.trace`: what one trace writes (shared with ``tl-circuits trace``)
- :mod:`~tl_circuits.batch.worker`: one prompt's work in a worker, and the worker itself
- :mod:`~tl_circuits.batch.results`: per-prompt records, verified graph folders, the
  ``results.parquet`` table
- :mod:`~tl_circuits.batch.runner`: :func:`trace_many` (Ray actors, scheduling, faults)
- :mod:`~tl_circuits.batch.recurrence`: :func:`recurrence` (features and heads that recur)

Ray, pandas and pyarrow (the ``distributed`` extra) are imported only when used.
"""

from tl_circuits.batch.recurrence import Recurrence, recurrence
from tl_circuits.batch.runner import trace_many

__all__ = ["Recurrence", "recurrence", "trace_many"]
