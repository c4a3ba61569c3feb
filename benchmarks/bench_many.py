"""Benchmark: graphs per minute, a serial loop vs ``trace_many`` with 1 and 2 Ray workers.

Cases:

- ``default``: the embedded default model (2 layers, d_model 64; per-layer transcoders) on
  its three named prompts plus random token-id prompts of 4 to 14 tokens;
- ``gpt2_16``: bench_graph.py's random GPT-2-small-shaped model with random JumpReLU
  transcoders (d_sae 8192, about 64 active features per layer and position), full graphs
  of 16-token random prompts.

Each prompt gets the same work everywhere: build, prune, head loadings of the 100
strongest pruned edges, the trace folder written atomically (``tl_circuits.batch.worker``'s
``trace_one``). *Serial*: ``trace_one`` in a loop in this process (model loaded once,
before the clock starts). *Ray*: ``trace_many`` on a local Ray instance; the first call
starts the workers (timed as ``start``: importing the package and loading the model in
each), a second call on fresh prompts reuses them (kept by the runner while Ray runs) and
gives the steady-state rate. The Ray overhead per prompt is the steady-state wall time
minus the prompts' own worker-side seconds, divided by the prompts (with 1 worker, where
the two are comparable). Torch threads: every worker has 1 CPU and 1 thread; the serial loop
runs with 1 thread too (``--serial-threads``), so the 1-worker and serial rates compare
like with like.

Usage::

    python benchmarks/bench_many.py                      # both cases
    python benchmarks/bench_many.py --cases default --prompts 40

Results go to ``benchmarks/results/many.json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "many.json"


def default_loader():
    from tl_circuits.batch.sources import ModelSource, load_source

    return load_source(ModelSource())


def gpt2_loader(seed: int = 0):
    from bench_graph import bench_transcoders, gpt2_small_random


    model = gpt2_small_random(seed)
    tcs = bench_transcoders(model, 16, seed)
    return model, tcs


def prompts_for(case: str, n: int, seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    if case == "gpt2_16":
        bos = 50256
        return [
            {
                "id": f"s{seed}-{i}",
                "prompt": [bos, *torch.randint(0, bos, (15,), generator=gen).tolist()],
            }
            for i in range(n)
        ]
    from tl_circuits.default import DEFAULT_PROMPTS

    out = [{"id": f"s{seed}-{k}", "prompt": p.text} for k, p in DEFAULT_PROMPTS.items()]
    while len(out) < n:
        k = int(torch.randint(3, 14, (1,), generator=gen))
        out.append(
            {
                "id": f"s{seed}-{len(out)}",
                "prompt": [1, *torch.randint(5, 512, (k,), generator=gen).tolist()],
            }
        )
    return out[:n]


def serial(loader, prompts: list[dict[str, Any]], threads: int) -> dict[str, float]:
    from tl_circuits.batch.prompts import prompt_specs
    from tl_circuits.batch.worker import TraceOptions, trace_one

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    model, tcs = loader()
    specs = prompt_specs(prompts)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rows = [trace_one(model, tcs, s, TraceOptions(), Path(tmp)) for s in specs]
        wall = time.perf_counter() - t0
    torch.set_num_threads(old)
    assert all(r["status"] == "complete" for r in rows), rows
    peak = max(r["peak_rss_bytes"] or 0 for r in rows)
    return {"wall_s": wall, "per_min": 60 * len(rows) / wall, "peak_rss_mib": peak / 2**20}


def on_ray(loader, case: str, n: int, workers: int) -> dict[str, float]:
    from tl_circuits.batch.runner import release_workers, trace_many

    release_workers()  # a cold start for each worker count
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        warm = trace_many(
            prompts_for(case, workers, 99),
            loader=loader,
            out_dir=Path(tmp) / "w",
            workers=workers,
            show_progress=False,
        )
        start = time.perf_counter() - t0 - warm["seconds"].max()
        t0 = time.perf_counter()
        table = trace_many(
            prompts_for(case, n, 0),
            loader=loader,
            out_dir=Path(tmp) / "b",
            workers=workers,
            show_progress=False,
        )
        wall = time.perf_counter() - t0
    assert (table["status"] == "complete").all(), table[["id", "error"]]
    inside = float(table["seconds"].sum())
    return {
        "start_s": start,
        "wall_s": wall,
        "per_min": 60 * n / wall,
        "worker_seconds": inside,
        "overhead_per_prompt_s": (wall - inside / workers) / n,
        "peak_rss_mib": float(table["peak_rss_bytes"].max()) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="default,gpt2_16")
    ap.add_argument("--prompts", type=int, default=0, help="per case (default: 24 / 4)")
    ap.add_argument("--serial-threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    loaders = {"default": default_loader, "gpt2_16": functools.partial(gpt2_loader, 0)}
    results: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_start": os.getloadavg(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cases": {},
    }
    for case in args.cases.split(","):
        n = args.prompts or (24 if case == "default" else 4)
        loader = loaders[case]
        entry = {
            "prompts": n,
            "serial": serial(loader, prompts_for(case, n, 0), args.serial_threads),
        }
        print(case, "serial", entry["serial"], flush=True)
        for workers in (1, 2):
            entry[f"ray_{workers}"] = on_ray(loader, case, n, workers)
            print(case, f"ray_{workers}", entry[f"ray_{workers}"], flush=True)
        results["cases"][case] = entry
    results["load_average_end"] = os.getloadavg()
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
