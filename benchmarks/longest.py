"""The longest budgeted prompt that fits a memory limit: ours and circuit-tracer, each probe
a separate process (``bench_graph.py --longest`` drives it; see benchmarks/README.md).

One probe builds one budgeted graph (``--budget`` features, default 4,096) over a random
prompt of N tokens on the benchmark model (``bench_graph.gpt2_small_random`` with
``n_ctx`` raised to fit N; transcoders calibrated at N), either with
``AttributionGraph.build`` (ours; ``--spill-dir`` keeps the visited rows on disk) or with
``circuit_tracer.attribute`` at a batch size. The probe process prints one JSON line: wall
seconds, build memory (peak RSS minus RSS before the build, as ``bench_graph.measure``),
and for ours the build's own estimate plus the replacement context's tensors. The driver
watches the probe's RSS and kills it when its build memory passes the limit (or the machine
runs low), which counts as "does not fit".

Usage::

    python benchmarks/longest.py probe --system ours --tokens 1024 --spill-dir /tmp
    python benchmarks/longest.py probe --system ct --tokens 192 --batch-size 256
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
GiB = 2**30


class _Stop(Exception):
    """Ends a partial probe after ``--max-batches`` feature batches."""


def probe(argv: list[str]) -> int:
    """Run one build in this process and print its measurements as one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=("ours", "ct"), required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--spill-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-file", default=None, help="written with RSS just before the build")
    ap.add_argument(
        "--max-batches", type=int, default=0,
        help="ours: stop after this many feature batches (a partial run: time per batch, "
        "memory so far, where the time goes)",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the build")
    args = ap.parse_args(argv)
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    import bench_graph as bg
    import torch

    from tl_circuits.graph import AttributionGraph
    from tl_circuits.graph import build as build_mod
    from tl_circuits.replacement.context import ReplacementContext

    n_ctx = max(1024, args.tokens)
    model = bg.gpt2_small_random(args.seed, n_ctx=n_ctx)
    tcs = bg.bench_transcoders(model, args.tokens, args.seed)
    prompt = bg.random_prompt(args.tokens, args.seed)
    out: dict[str, Any] = {"system": args.system, "tokens": args.tokens, "budget": args.budget,
                           "batch_size": args.batch_size, "n_ctx": n_ctx,
                           "threads": torch.get_num_threads()}
    ctx = ReplacementContext(model, tcs, prompt)
    out["active_features"] = len(ctx.active_features())
    if args.system == "ours":
        estimates: list[int] = []
        real_check = build_mod._check_memory

        def check(plan, batch_size, limit, max_feature_nodes, spill_dir=None):
            need, lim = real_check(plan, batch_size, limit, max_feature_nodes, spill_dir)
            estimates.append(need + bg.context_bytes(plan.ctx))
            return need, lim

        build_mod._check_memory = check
        batch_ends: list[float] = []
        real_rows = build_mod._RowPasses.feature_rows

        def feature_rows(self, rows):
            if args.max_batches and len(batch_ends) >= args.max_batches:
                raise _Stop
            out = real_rows(self, rows)
            batch_ends.append(time.perf_counter())
            return out

        build_mod._RowPasses.feature_rows = feature_rows

        def run():
            try:
                return AttributionGraph.build(
                    model, tcs, prompt, max_feature_nodes=args.budget,
                    batch_size=args.batch_size, show_progress=False, spill_dir=args.spill_dir,
                    memory_limit_bytes=2**50,
                )
            except _Stop:
                return None
    else:
        ct, why = bg.import_circuit_tracer()
        if ct is None:
            raise SystemExit(f"circuit-tracer not importable: {why}")
        ct_model = bg.circuit_tracer_model(ct, model, list(tcs.saes))
        run = lambda: ct["attribute"](  # noqa: E731
            prompt, ct_model, batch_size=args.batch_size, max_feature_nodes=args.budget,
            verbose=False,
        )
    del ctx
    bg.release_freed_memory()
    if args.ready_file:
        Path(args.ready_file).write_text(str(bg.rss_bytes()))
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    t_start = time.perf_counter()
    graph, m = bg.measure(run)
    if profiler is not None:
        profiler.disable()
        out["profile_top"] = bg.top_functions(profiler, 25)
    out.update(m)
    if args.system == "ours" and batch_ends:
        gaps = [b - a for a, b in zip([t_start, *batch_ends], batch_ends)]
        out["batches_done"] = len(batch_ends)
        out["first_batch_s"] = batch_ends[0] - t_start  # incl. the target rows and setup
        out["batch_s"] = gaps[1:]
    out["partial"] = graph is None
    if args.system == "ours":
        out["estimate_bytes"] = estimates[-1]
        out["estimate_over_measured"] = estimates[-1] / max(m["build_memory_bytes"], 1)
    if graph is not None and args.system == "ours":
        out["selection_ties"] = graph.info.get("selection_ties")
        out["feature_nodes"] = int(graph.indices("feature").numel())
    print("PROBE " + json.dumps(out), flush=True)
    return 0


def run_probe(
    system: str, tokens: int, *, budget: int, batch_size: int, limit_bytes: int,
    spill_dir: str | None = None, seed: int = 0, timeout_s: float = 4 * 3600,
) -> dict[str, Any]:
    """Run :func:`probe` in a child process; kill it when its build memory passes
    ``limit_bytes`` (or less than 0.5 GiB of the machine is left). Returns the probe's
    measurements with ``fits`` (True: finished within the limit)."""
    ready = Path(tempfile.mkstemp(prefix="probe-ready-")[1])
    ready.write_text("")
    cmd = [sys.executable, str(Path(__file__).resolve()), "probe", "--system", system,
           "--tokens", str(tokens), "--budget", str(budget), "--batch-size", str(batch_size),
           "--seed", str(seed), "--ready-file", str(ready)]
    if spill_dir:
        cmd += ["--spill-dir", spill_dir]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    before, worst, killed = None, 0, None
    while child.poll() is None:
        time.sleep(0.25)
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            break
        if before is None and ready.read_text():
            before = int(ready.read_text())
        if before is not None:
            worst = max(worst, rss - before)
            if rss - before > limit_bytes:
                killed = f"build memory passed {limit_bytes / GiB:.1f} GiB"
        if psutil.virtual_memory().available < GiB // 2:
            killed = "the machine ran low on memory"
        if time.perf_counter() - t0 > timeout_s:
            killed = f"ran past {timeout_s:.0f} s"
        if killed:
            child.kill()
            break
    stdout = child.communicate()[0] or ""
    ready.unlink(missing_ok=True)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("PROBE ")]
    result: dict[str, Any] = {"system": system, "tokens": tokens, "batch_size": batch_size,
                              "wall_s": time.perf_counter() - t0}
    if lines and not killed:
        result.update(json.loads(lines[-1][6:]))
        result["fits"] = result["build_memory_bytes"] <= limit_bytes
    else:
        result.update(fits=False, killed=killed or f"exited {child.returncode}",
                      build_memory_at_kill_bytes=worst)
    return result


def search(
    system: str, lengths: list[int], *, budget: int, batch_size: int, limit_bytes: int,
    spill_dir: str | None, log,
) -> tuple[int, list[dict[str, Any]]]:
    """Probe ``lengths`` in ascending order until one does not fit; the longest that fit
    (0 if none) and every probe."""
    probes, longest = [], 0
    for n in sorted(lengths):
        r = run_probe(system, n, budget=budget, batch_size=batch_size, limit_bytes=limit_bytes,
                      spill_dir=spill_dir)
        probes.append(r)
        log(r)
        if not r["fits"]:
            break
        longest = n
    return longest, probes


def main(argv: list[str]) -> int:
    if argv and argv[0] == "probe":
        return probe(argv[1:])
    ap = argparse.ArgumentParser(description="probe lengths for ours and circuit-tracer")
    ap.add_argument("--ours", default="1024,1600", help="lengths to probe for ours")
    ap.add_argument("--ct", default="", help="lengths to probe for circuit-tracer")
    ap.add_argument(
        "--ct-batch", default="256,32",
        help="circuit-tracer's batch sizes, each searched over --ct (its default is 256)",
    )
    ap.add_argument("--batch-size", type=int, default=64, help="ours")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--limit-gib", type=float, default=20.0)
    ap.add_argument("--spill-dir", default=tempfile.gettempdir())
    ap.add_argument("--out", type=Path, default=HERE / "results" / "longest.json")
    args = ap.parse_args(argv)
    limit = int(args.limit_gib * GiB)
    results: dict[str, Any] = {"limit_gib": args.limit_gib, "budget": args.budget,
                               "cpus": os.cpu_count(), "probes": []}

    def log(r: dict[str, Any]) -> None:
        results["probes"].append(r)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        mem = r.get("build_memory_bytes", r.get("build_memory_at_kill_bytes", 0)) / GiB
        est = r.get("estimate_bytes")
        print(f"{r['system']:>5} batch {r['batch_size']:>3} {r['tokens']:>5} tokens: "
              f"{'fits' if r['fits'] else 'does not fit'}; {r.get('seconds', r['wall_s']):.0f} s, "
              f"{mem:.2f} GiB" + ("" if est is None else f" (estimate {est / GiB:.2f} GiB)")
              + (f"; killed: {r['killed']}" if r.get("killed") else ""), flush=True)

    ours_lengths = [int(x) for x in args.ours.split(",") if x]
    ct_lengths = [int(x) for x in args.ct.split(",") if x]
    if ours_lengths:
        results["ours_longest"], _ = search(
            "ours", ours_lengths, budget=args.budget, batch_size=args.batch_size,
            limit_bytes=limit, spill_dir=args.spill_dir, log=log)
    ct_batches = [int(x) for x in args.ct_batch.split(",") if x] if ct_lengths else []
    results["ct_longest"], results["length_ratio"] = {}, {}
    for batch in ct_batches:
        longest, _ = search("ct", ct_lengths, budget=args.budget, batch_size=batch,
                            limit_bytes=limit, spill_dir=None, log=log)
        results["ct_longest"][str(batch)] = longest
        if results.get("ours_longest") and longest:
            ratio = results["ours_longest"] / longest
            results["length_ratio"][str(batch)] = ratio
            print(f"length ratio ours / circuit-tracer at batch {batch}: {ratio:.1f}x "
                  f"({results['ours_longest']} / {longest} tokens; each the longest probed "
                  "length that fit)")
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
