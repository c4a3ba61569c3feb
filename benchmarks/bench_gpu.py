"""GPU benchmark: attribution graphs of a Gemma-2-2B-shaped model, ours vs circuit-tracer.

    python benchmarks/bench_gpu.py [--tokens 64,256] [--budget 4096] [--batch-size 256]
                                   [--dtype float32] [--no-circuit-tracer] [--small]

- Model: random weights in Gemma-2-2B's shape (26 layers, d_model 2304, 8 query heads of
  256 with 4 KV heads (GQA), d_mlp 9216, d_vocab 256000, sandwich norms, attention soft-cap
  50 and logit soft-cap 30, alternating local (window 4096) and global attention, rotary),
  built from ``HookedTransformerConfig`` and randomised as ``bench_graph.randomise_``.
- Transcoders: ``random_transcoders(model, "jumprelu", d_sae=16384,
  active_fraction=64/16384, calibration_positions=N)`` (SAE-Lens ``JumpReLUTranscoder``s,
  calibrated on the CPU for each prompt length N, then moved to the GPU).
- Per length: ``AttributionGraph.build`` with a feature budget (``--budget``) on the GPU,
  wall time (``torch.cuda.synchronize`` around it) and peak CUDA memory allocated during the
  build (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what
  was allocated before); then circuit-tracer 0.5.0's ``attribute`` on the same weights and
  GPU (``pip install --no-deps circuit-tracer==0.5.0``), measured the same way.
- ``--small``: a 2-layer stand-in on whatever device is there (a smoke test of the script).

Output: a table on stdout and JSON in ``benchmarks/results/gpu.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_graph import (
    circuit_tracer_model,
    import_circuit_tracer,
    random_prompt,
    randomise_,
)

from tl_circuits import AttributionGraph
from tl_circuits.model.hooks import install_mlp_input_hooks
from tl_circuits.testing import random_transcoders

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gemma2_2b_random(seed: int, dtype: torch.dtype, small: bool) -> HookedTransformer:
    """A random-weight model in Gemma-2-2B's shape (``small``: 2 layers, d_model 64), on
    the CPU."""
    shape = (
        dict(n_layers=2, d_model=64, n_heads=4, d_head=16, n_key_value_heads=2, d_mlp=128,
             d_vocab=50257, window_size=8)
        if small
        else dict(n_layers=26, d_model=2304, n_heads=8, d_head=256, n_key_value_heads=4,
                  d_mlp=9216, d_vocab=256000, window_size=4096)
    )  # fmt: skip
    cfg = HookedTransformerConfig(
        **shape,
        n_ctx=1024,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0,
        attn_types=["local", "global"] * (shape["n_layers"] // 2),
        final_rms=True,
        seed=seed,
        dtype=dtype,
        device="cpu",
    )
    model = HookedTransformer(cfg, move_to_device=False)
    randomise_(model, seed)
    model.eval()
    install_mlp_input_hooks(model)
    return model


def measure_cuda(fn, *args, **kwargs) -> tuple[Any, dict[str, float]]:
    """``fn(*args, **kwargs)``, its wall time and the peak CUDA memory it added."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before
    return out, {"seconds": seconds, "peak_cuda_bytes": float(peak)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="64,256")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--no-circuit-tracer", action="store_true")
    ap.add_argument("--small", action="store_true", help="a 2-layer smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.small:
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--small runs a 2-layer smoke version on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        measure = _measure_cpu
    else:
        measure = measure_cuda
    dtype = DTYPES[args.dtype]
    ct, ct_error = (None, "disabled") if args.no_circuit_tracer else import_circuit_tracer()
    if ct_error:
        print(f"circuit-tracer: not run ({ct_error})", flush=True)
    base = gemma2_2b_random(args.seed, dtype, args.small)
    d_sae = 128 if args.small else 16384
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        },
        "dtype": args.dtype,
        "d_sae": d_sae,
        "budget": args.budget,
        "circuit_tracer": None if ct is None else ct["version"],
        "cases": [],
    }
    for n_tok in (int(t) for t in args.tokens.split(",") if t):
        tcs = random_transcoders(
            base,
            "jumprelu",
            d_sae=d_sae,
            active_fraction=min(1.0, 64 / d_sae),
            seed=args.seed,
            calibration_positions=n_tok,
        )
        model, tcs_dev = base.to(device), tcs.to(device=device)
        prompt = random_prompt(n_tok).clamp_max(model.cfg.d_vocab - 1).to(device)
        graph, ours = measure(
            AttributionGraph.build,
            model,
            tcs_dev,
            prompt,
            max_feature_nodes=args.budget,
            batch_size=args.batch_size,
            show_progress=False,
        )
        case: dict[str, Any] = {"tokens": n_tok, "nodes": graph.n_nodes, "ours": ours}
        del graph
        if ct is not None:
            try:
                ct_model = circuit_tracer_model(ct, model, tcs_dev.saes, device)
                _, theirs = measure(
                    ct["attribute"],
                    prompt,
                    ct_model,
                    batch_size=args.batch_size,
                    max_feature_nodes=args.budget,
                    verbose=False,
                )
                case["circuit_tracer"] = theirs
                del ct_model
            except Exception as exc:  # recorded, the run goes on
                case["circuit_tracer"] = {"error": f"{type(exc).__name__}: {exc}"}
        results["cases"].append(case)
        theirs_text = case.get("circuit_tracer", "-")
        print(f"{n_tok:>5} tokens: ours {ours}; circuit-tracer {theirs_text}", flush=True)
        base = model.to("cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


def _measure_cpu(fn, *args, **kwargs) -> tuple[Any, dict[str, float]]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, {"seconds": time.perf_counter() - start, "peak_cuda_bytes": float("nan")}


if __name__ == "__main__":
    raise SystemExit(main())
