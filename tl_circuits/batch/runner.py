"""``trace_many``: many prompts' graphs on Ray, surviving faults, resumable.

Phases: read the prompts -> take the batch folder's lock and remove what killed writers
left -> skip the prompts already done (:func:`~tl_circuits.batch.results.done_row`) ->
start Ray (a local instance unless one is running or ``address`` names a cluster) -> start
the workers (Ray actors, :class:`~tl_circuits.batch.worker.TraceWorker`, each loading the
model and transcoders once) -> hand out prompts one at a time to idle workers -> record
each answer -> write ``results.parquet``.

Faults. A prompt that fails in its worker (an exception: bad prompt, out of memory) is
recorded failed with its error and the batch goes on. A worker that dies (its process
exits or is killed) is replaced by a new one; the prompt it was tracing is sent again
once, and recorded failed (``WorkerDied: ...``) if its worker dies a second time. A
worker that cannot load the model stops the batch with the loader's error. Each prompt is
recorded by the runner (one writer, under the lock), after its worker wrote its folder
atomically, so an interrupted run (Ctrl-C, a killed driver) loses only the prompts in
flight, and a rerun with the same folder traces what is not done and none twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tl_circuits.batch.prompts import PromptSpec, prompt_specs, read_prompts
from tl_circuits.batch.results import (
    INSTALL_HINT,
    RESULTS_FILE,
    done_row,
    import_pandas,
    results_table,
    write_parquet,
    write_record,
)
from tl_circuits.batch.sources import ModelSource, resolve_source
from tl_circuits.batch.worker import Loader, TraceOptions, TraceWorker, failed_row
from tl_circuits.errors import TLCircuitsError
from tl_circuits.storage import locked

#: times a worker may die while starting (loading the model) before the batch stops
MAX_START_DEATHS = 3


def import_ray() -> Any:
    """``ray``, or a TLCircuitsError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise TLCircuitsError(
            f"trace_many runs on Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


def trace_many(
    prompts: str | Path | Iterable[Any],
    model: str | None = None,
    transcoders: str | None = None,
    *,
    out_dir: str | Path,
    sae_id_template: str | None = None,
    fold_ln: bool = False,
    device: str | None = None,
    dtype: str = "float32",
    loader: Loader | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    memory_per_worker: int | None = None,
    address: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    head_edges: int = 100,
    write_json: bool = False,
    min_head_share: float = 0.25,
    show_progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    **build_options: Any,
) -> Any:
    """Trace every prompt on Ray workers into ``out_dir``; return the results DataFrame.

    ``prompts``: a JSON-lines file (:mod:`tl_circuits.batch.prompts`) or an iterable of
    prompts, dicts or :class:`~tl_circuits.batch.prompts.PromptSpec`. ``model``,
    ``transcoders``, ``sae_id_template``, ``fold_ln``, ``dtype``: the model source, as for
    ``tl-circuits trace`` (None, None: the embedded default); or ``loader``, a picklable
    function returning ``(model, transcoders)``, called once in each worker. ``device``:
    None is ``"cuda"`` when the Ray cluster has GPUs, else ``"cpu"``.

    Workers: ``workers`` (default: one per ``gpus_per_worker`` GPUs on CUDA, else one per
    ``cpus_per_worker`` CPUs of the cluster, at most one per prompt); ``gpus_per_worker``
    (default 1 on CUDA; 0.5 puts two workers on each GPU); ``memory_per_worker`` (bytes
    Ray reserves for each, none by default); ``address``: a Ray cluster (default: the
    running instance, else a local one started here and shut down at the end).

    Per prompt: ``AttributionGraph.build(..., **build_options)`` (``max_feature_nodes``,
    ``batch_size``, ...), ``graph.prune(node_threshold, edge_threshold)``, head loadings of
    the ``head_edges`` strongest pruned edges, written to ``out_dir/graphs/{id}/`` (with
    ``graph.json`` if ``write_json``). ``on_result(row)`` is called after each prompt is
    recorded. Faults, resumption and files: the module docstrings of this module and of
    :mod:`tl_circuits.batch.results`.
    """
    specs = read_prompts(prompts) if isinstance(prompts, str | Path) else prompt_specs(prompts)
    options = _options(build_options, node_threshold, edge_threshold, head_edges)
    options = dataclasses.replace(options, write_json=write_json, min_head_share=min_head_share)
    source = None
    if loader is None:  # resolved here, before any work, so a bad source fails at once
        source = resolve_source(
            model,
            transcoders,
            sae_id_template=sae_id_template,
            fold_ln=fold_ln,
            device=device or "cpu",
            dtype=dtype,
            check_here=False,
        )
    elif model is not None or transcoders is not None:
        raise TLCircuitsError("give a loader or model/transcoders, not both")
    import_pandas()
    ray = import_ray()
    out = _prepare(Path(out_dir))
    with locked(out / ".lock"):
        _remove_leftovers(out / "graphs")
        started = _start_ray(ray, address)
        keys: dict[str, str] = {}
        try:
            if source is not None and device is None:
                source = dataclasses.replace(source, device=_cluster_device(ray))
            context = {"source": _source_record(source, loader), "options": options.to_json()}
            keys = {spec.id: spec.key(context) for spec in specs}
            pending = [spec for spec in specs if done_row(out, spec, keys[spec.id]) is None]
            placement = _Placement.of(ray, source, workers, cpus_per_worker, gpus_per_worker)
            work = (source, loader, options, out)
            batch = _Batch(ray, placement, memory_per_worker, work, keep_workers=not started)
            with tqdm(
                total=len(specs),
                initial=len(specs) - len(pending),
                desc="prompts",
                unit="prompt",
                disable=not show_progress,
            ) as progress:
                batch.run(pending, keys, progress, on_result)
        finally:
            if keys:  # also when interrupted: the table of what is recorded so far
                table = results_table(out, specs, keys)
                write_parquet(table, out / RESULTS_FILE)
            if started:
                ray.shutdown()
    return table


def _options(
    build: dict[str, Any], node_threshold: float, edge_threshold: float, head_edges: int
) -> TraceOptions:
    if "targets" in build:
        raise TLCircuitsError(
            "targets are given per prompt (a prompts line's 'targets'), not to trace_many"
        )
    if head_edges < 0:
        raise TLCircuitsError(f"head_edges must be 0 or more, got {head_edges}")
    try:
        json.dumps(build, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TLCircuitsError(
            f"build options must be JSON values (numbers, strings): {exc}"
        ) from None
    return TraceOptions(
        build=dict(build),
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        head_edges=head_edges,
    )


def _source_record(source: ModelSource | None, loader: Loader | None) -> Any:
    """What the prompts' keys say about the model: the source record, or the loader's
    name (a rerun with a loader of the same name is taken to load the same model)."""
    if source is not None:
        return source.to_json()
    func = getattr(loader, "func", loader)  # a functools.partial: the function it wraps
    return {"loader": f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"}


def _prepare(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise TLCircuitsError(f"out_dir {out}: exists and is not a folder; choose another path")
    for sub in ("graphs", "records"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def _remove_leftovers(graphs: Path) -> None:
    """Remove the temporary and set-aside folders of writes that did not finish (the lock
    is held: no worker of this batch folder is writing)."""
    for entry in graphs.iterdir():
        if entry.name.startswith((".tmp-", ".old-")) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _start_ray(ray: Any, address: str | None) -> bool:
    """Connect to Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return True
    with _package_on_pythonpath():
        ray.init(include_dashboard=False, log_to_driver=False)
    return True


@contextlib.contextmanager
def _package_on_pythonpath() -> Iterator[None]:
    """While a local Ray instance starts, put the folder this process imported
    ``tl_circuits`` from first on ``PYTHONPATH``: its workers (started with that
    environment) then import the same package, also from a source checkout that is not
    installed."""
    import tl_circuits

    root = str(Path(tl_circuits.__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, old) if p)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _cluster_device(ray: Any) -> str:
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


@dataclasses.dataclass(frozen=True)
class _Placement:
    """How many workers, and what Ray reserves for each."""

    n_workers: int
    cpus: float
    gpus: float

    @classmethod
    def of(
        cls,
        ray: Any,
        source: ModelSource | None,
        workers: int | None,
        cpus: float,
        gpus: float | None,
    ) -> _Placement:
        on_cuda = source is not None and source.device.startswith("cuda")
        gpus = (1.0 if on_cuda else 0.0) if gpus is None else gpus
        if cpus < 0 or gpus < 0:
            raise TLCircuitsError("cpus_per_worker and gpus_per_worker must be 0 or more")
        resources = ray.cluster_resources()
        if on_cuda and gpus > 0 and resources.get("GPU", 0) <= 0:
            raise TLCircuitsError("device cuda: the Ray cluster has no GPUs")
        if workers is None:
            have = resources.get("GPU", 0) / gpus if gpus > 0 else resources.get("CPU", 1) / cpus
            workers = max(1, math.floor(have + 1e-9)) if math.isfinite(have) else 1
        if workers < 1:
            raise TLCircuitsError(f"workers must be 1 or more, got {workers}")
        return cls(n_workers=workers, cpus=cpus, gpus=gpus)


class _Batch:
    """The workers of one run and the loop that hands them prompts (module docstring)."""

    def __init__(
        self,
        ray: Any,
        placement: _Placement,
        memory: int | None,
        work: tuple[ModelSource | None, Loader | None, TraceOptions, Path],
        keep_workers: bool,
    ) -> None:
        source, loader, self.options, self.out = work
        self.ray = ray
        resources: dict[str, Any] = {"num_cpus": placement.cpus, "num_gpus": placement.gpus}
        if memory is not None:
            resources["memory"] = memory
        self.actor_class = ray.remote(TraceWorker).options(
            max_restarts=0, max_task_retries=0, **resources
        )
        self.actor_args = (source, loader)
        self.pool_key = _pool_key(ray, source, loader, resources) if keep_workers else None
        self.n_workers = placement.n_workers
        self.starting: dict[Any, Any] = {}  # ready() reference -> actor
        self.running: dict[Any, tuple[Any, PromptSpec]] = {}  # trace() reference -> ...
        self.idle: list[Any] = []
        self.start_deaths = 0

    def run(
        self,
        pending: list[PromptSpec],
        keys: dict[str, str],
        progress: Any,
        on_result: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        """Trace ``pending``, recording each prompt as it is answered."""
        by_id = {spec.id: spec for spec in pending}
        queue = deque(pending)
        attempts: Counter[str] = Counter()
        deaths: Counter[str] = Counter()
        counts = Counter(done=progress.n)
        graphs_dir = str(self.out / "graphs")
        try:
            self._start(min(self.n_workers, len(pending)))
            while queue or self.running:
                while self.idle and queue:
                    spec = queue.popleft()
                    attempts[spec.id] += 1
                    actor = self.idle.pop()
                    ref = actor.trace.remote(spec, self.options, graphs_dir)
                    self.running[ref] = (actor, spec)
                _show(progress, counts, len(self.running))
                (ref,), _ = self.ray.wait([*self.starting, *self.running], num_returns=1)
                if ref in self.starting:
                    self._started(ref)
                    continue
                row = self._answer(ref, deaths, queue)
                if row is None:
                    continue  # its worker died: sent again
                spec = by_id[row["id"]]
                row["attempts"] = attempts[spec.id]
                write_record(self.out, spec, keys[spec.id], row)
                counts["done" if row["status"] == "complete" else "failed"] += 1
                progress.update(1)
                _show(progress, counts, len(self.running))
                if on_result is not None:
                    on_result(row)
        finally:
            self._stop()

    def _start(self, n: int) -> None:
        """``n`` workers: idle ones of an earlier run of this model first, then new ones
        (each is ready once its ``ready()`` answers)."""
        kept = _POOL.take(self.ray, self.pool_key, n) if self.pool_key else []
        for actor in kept:
            self.starting[actor.ready.remote()] = actor
        for _ in range(n - len(kept)):
            self._spawn()

    def _spawn(self) -> None:
        actor = self.actor_class.remote(*self.actor_args)
        self.starting[actor.ready.remote()] = actor

    def _started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            error = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # died while loading (out of memory?)
            self.start_deaths += 1
            if self.start_deaths > MAX_START_DEATHS:
                raise TLCircuitsError(
                    f"workers died {self.start_deaths} times while loading the model "
                    f"(out of memory? see the Ray logs): {_first_line(exc)}"
                ) from None
            self._spawn()
            return
        if error is not None:
            self._kill(actor)
            if isinstance(error, TLCircuitsError):
                raise error
            raise TLCircuitsError(
                f"a worker could not load the model: {type(error).__name__}: {error}"
            ) from error
        self.idle.append(actor)

    def _answer(self, ref: Any, deaths: Counter[str], queue: deque[PromptSpec]) -> Any:
        """The row of a finished ``trace`` call; None when its worker died and the prompt
        was queued again (the worker is replaced either way)."""
        actor, spec = self.running.pop(ref)
        exceptions = self.ray.exceptions
        try:
            row = self.ray.get(ref)
        except (exceptions.RayActorError, exceptions.WorkerCrashedError) as exc:
            deaths[spec.id] += 1
            self._kill(actor)
            self._spawn()
            if deaths[spec.id] < 2:
                queue.appendleft(spec)
                return None
            return failed_row(
                spec,
                "WorkerDied: the worker tracing this prompt died, and again when it was "
                f"sent once more ({_first_line(exc)})",
            )
        except exceptions.RayTaskError as exc:  # raised past trace_one's own handling
            cause = getattr(exc, "cause", None) or exc
            self.idle.append(actor)
            return failed_row(spec, f"{type(cause).__name__}: {_first_line(cause)}")
        self.idle.append(actor)
        return row

    def _stop(self) -> None:
        """Kill the workers still tracing (none goes on writing after the run returns);
        keep the others for the next run of this model, or kill them too."""
        for actor, _ in self.running.values():
            self._kill(actor)
        others = [*self.idle, *self.starting.values()]
        if self.pool_key is not None:
            _POOL.give(self.ray, self.pool_key, others)
        else:
            for actor in others:
                self._kill(actor)
        self.idle, self.starting, self.running = [], {}, {}

    def _kill(self, actor: Any) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(actor, no_restart=True)


def _show(progress: Any, counts: Counter[str], running: int) -> None:
    progress.set_postfix(done=counts["done"], failed=counts["failed"], running=running)


class _WorkerPool:
    """Workers kept loaded between runs in this process while its Ray session lasts (a
    notebook or a test module tracing batch after batch on one model): those of the last
    run only, so idle workers of another model never hold the resources a run needs."""

    def __init__(self) -> None:
        self.session: str | None = None
        self.key: str | None = None
        self.idle: list[Any] = []

    def take(self, ray: Any, key: str, n: int) -> list[Any]:
        """Up to ``n`` kept workers of ``key``; kept workers of another key are killed."""
        self._check_session(ray)
        if key != self.key:
            for actor in self.idle:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            self.key, self.idle = key, []
        taken, self.idle = self.idle[:n], self.idle[n:]
        return taken

    def give(self, ray: Any, key: str, actors: list[Any]) -> None:
        self.take(ray, key, 0)
        self.idle.extend(actors)

    def _check_session(self, ray: Any) -> None:
        session = ray.get_runtime_context().get_job_id()
        if session != self.session:  # Ray was restarted: the old handles are gone
            self.session, self.key, self.idle = session, None, []


_POOL = _WorkerPool()


def _pool_key(
    ray: Any, source: ModelSource | None, loader: Loader | None, resources: dict[str, Any]
) -> str:
    blob = ray.cloudpickle.dumps((source, loader, sorted(resources.items())))
    return hashlib.sha256(blob).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def release_workers() -> None:
    """Kill the workers kept loaded for the next run (:class:`_WorkerPool`), freeing what
    they hold; ``ray.shutdown()`` does it too."""
    ray = import_ray()
    if ray.is_initialized():
        _POOL.take(ray, "", 0)
