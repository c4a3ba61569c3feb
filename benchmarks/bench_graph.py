"""Benchmark: building attribution graphs on a random GPT-2-small-shaped model.

Model: a random-weight ``HookedTransformer`` with GPT-2 small's shape (12 layers, d_model
768, 12 heads of 64, d_mlp 3072, d_vocab 50257, n_ctx 1024, LayerNorm, gelu_new, learned
positions). Transcoders: random SAE-Lens JumpReLU transcoders, d_sae 8192, thresholds
calibrated so about 64 features per layer and position are active.

For each case it measures the wall time of ``AttributionGraph.build`` and the memory the
build itself uses: peak RSS during the build minus RSS just before it (Linux: the peak is
reset by writing "5" to /proc/self/clear_refs and read as VmHWM from /proc/self/status).

If ``circuit_tracer`` is importable, the same model, transcoders and prompt are run
through ``circuit_tracer.attribute`` (TransformerLens backend) and the adjacency matrices
are compared on the nodes both graphs share.

Usage::

    python benchmarks/bench_graph.py                     # cases 8,16,32:4096,128:4096
    python benchmarks/bench_graph.py --cases 8,16 --batch-size 256
    python benchmarks/bench_graph.py --longest --spill-dir /tmp   # longest prompts in 20 GiB
    python benchmarks/bench_graph.py --no-circuit-tracer

A case is ``N`` (full graph over N tokens) or ``N:B`` (N tokens, a budget of B feature
nodes); a bare 32 or 128 gets the 4096-feature budget.

Results go to ``benchmarks/results/graph.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import datetime
import gc
import io
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_circuits.graph import AttributionGraph
from tl_circuits.model.hooks import install_mlp_input_hooks
from tl_circuits.replacement.context import ReplacementContext
from tl_circuits.testing import random_transcoders

GiB = 2**30
DEFAULT_BUDGET = 4096
BUDGETED_BY_DEFAULT = {32, 128}
RESULTS = Path(__file__).resolve().parent / "results" / "graph.json"
BOS = 50256  # GPT-2's <|endoftext|>; circuit-tracer keeps a prompt that starts with it


# ---- memory ---------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so RSS before a case does
    not include memory the previous case freed; otherwise the build reuses those pages and
    "peak minus before" under-counts it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def measure(fn, *args, **kwargs) -> tuple[Any, dict[str, float]]:
    """Run ``fn``; return its result, wall seconds, peak RSS and peak minus RSS before."""
    release_freed_memory()
    resettable = reset_peak_rss()
    before = rss_bytes()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return out, {
        "seconds": seconds,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "build_memory_bytes": peak - before,
        "peak_reset": resettable,
    }


# ---- model and transcoders -------------------------------------------------------------


def gpt2_small_random(seed: int = 0, n_ctx: int = 1024) -> HookedTransformer:
    """A random-weight model with GPT-2 small's shape (d_mlp = 4 d_model, as GPT-2);
    ``n_ctx`` above GPT-2's 1,024 for the long-prompt probes (more random positions).

    Randomised as :func:`tl_circuits.testing.random_model` does (which fixes d_mlp at
    2 d_model): norm weights near 1, small non-zero biases, weights ~ N(0, 1/fan_in).
    """
    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        d_head=64,
        n_heads=12,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=n_ctx,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=seed,
        dtype=torch.float32,
        device="cpu",
    )
    model = HookedTransformer(cfg, move_to_device=False)
    randomise_(model, seed)
    model.eval()
    install_mlp_input_hooks(model)
    return model


def randomise_(model: HookedTransformer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith((".w", "ln_final.w")) and param.dim() == 1:
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() <= 1 or name.split(".")[-1].startswith("b"):
                param.copy_(0.1 * noise)
            else:
                fan_in = param.shape[-2] if param.dim() >= 2 else param.shape[-1]
                param.copy_(noise / fan_in**0.5)


def bench_transcoders(model: HookedTransformer, n_tokens: int | None, seed: int = 0):
    """The benchmark's transcoders: random SAE-Lens JumpReLU, d_sae 8192, calibrated on
    random prompts of ``n_tokens`` (None: the default length) to about 64 active features
    per layer and position at that length (early positions activate more than late ones)."""
    return random_transcoders(
        model,
        "jumprelu",
        d_sae=8192,
        active_fraction=64 / 8192,
        seed=seed,
        calibration_positions=n_tokens,
    )


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: platform, CPUs, torch threads, Python and torch versions."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def random_prompt(n_tokens: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + n_tokens)
    tokens = torch.randint(0, BOS, (n_tokens,), generator=gen)
    tokens[0] = BOS
    return tokens


# ---- circuit-tracer -----------------------------------------------------------------------


def import_circuit_tracer() -> tuple[Any, str | None]:
    try:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False
        import circuit_tracer  # noqa: F401
        from circuit_tracer import attribute
        from circuit_tracer.replacement_model.replacement_model_transformerlens import (
            TransformerLensReplacementModel,
        )
        from circuit_tracer.transcoder.activation_functions import JumpReLU
        from circuit_tracer.transcoder.single_layer_transcoder import (
            SingleLayerTranscoder,
        )
        from circuit_tracer.transcoder.single_layer_transcoder import (
            TranscoderSet as CTTranscoderSet,
        )
    except Exception as exc:  # any import failure means "skip"
        return None, f"{type(exc).__name__}: {exc}"
    return {
        "attribute": attribute,
        "Model": TransformerLensReplacementModel,
        "JumpReLU": JumpReLU,
        "SLT": SingleLayerTranscoder,
        "Set": CTTranscoderSet,
        "version": getattr(sys.modules["circuit_tracer"], "__version__", "0.5.0?"),
    }, None


class _FakeTokenizer:
    """Just what circuit-tracer asks of a tokenizer for a token-id prompt."""

    vocab_size = 50257
    bos_token_id = BOS
    eos_token_id = BOS
    pad_token_id = None
    all_special_ids: ClassVar[list[int]] = [BOS]
    padding_side = "right"

    def decode(self, ids: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return " ".join(f"<{i}>" for i in (ids if isinstance(ids, list) else [ids]))


def circuit_tracer_model(
    ct: dict, model: HookedTransformer, saes: list, device: str | torch.device = "cpu"
) -> Any:
    """circuit-tracer's TransformerLens replacement model with our weights and transcoders.

    Each SAE-Lens JumpReLU transcoder maps to a ``SingleLayerTranscoder``: W_enc is stored
    transposed ([d_sae, d_model]), W_dec, b_enc, b_dec as they are, the threshold goes into
    a ``JumpReLU`` activation. Input hook ``mlp.hook_in`` (the ln2 output, as ours),
    output hook ``mlp.hook_out``.
    """
    layers = {}
    for layer, sae in enumerate(saes):
        tc = ct["SLT"](
            d_model=sae.cfg.d_in,
            d_transcoder=sae.cfg.d_sae,
            activation_function=ct["JumpReLU"](sae.threshold.detach().clone(), 0.1),
            layer_idx=layer,
            device=torch.device(device),
            dtype=sae.W_enc.dtype,
        )
        with torch.no_grad():
            tc.W_enc.copy_(sae.W_enc.T)
            tc.W_dec.copy_(sae.W_dec)
            tc.b_enc.copy_(sae.b_enc)
            tc.b_dec.copy_(sae.b_dec)
        layers[layer] = tc
    tcs = ct["Set"](layers, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out")
    ct_model = ct["Model"].from_config(model.cfg, tcs, move_to_device=False)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in ct_model.named_parameters():
            if name.startswith("transcoders."):
                continue
            key = name.replace(".old_mlp.", ".").replace(".old_unembed.", ".")
            param.copy_(ours[key])
    ct_model.tokenizer = _FakeTokenizer()
    ct_model.eval()
    return ct_model


def compare_adjacency(graph: AttributionGraph, ct_graph: Any) -> dict[str, Any]:
    """Relative max difference of the two adjacency matrices on shared nodes.

    circuit-tracer zeroes features and errors at position 0 and gives token nodes W_E only
    (tl_circuits: token + positional embedding), so rows/columns compared are: features at
    positions > 0, errors at positions > 0, and targets; token columns are reported apart.
    """
    n_layers, n_pos = graph.info["n_layers"], len(graph.tokens)
    nodes = graph.nodes
    ours_key: dict[tuple, int] = {}
    kinds = nodes.kind.tolist()
    from tl_circuits.graph.nodes import KINDS

    target_tokens = [t.token for t in graph.targets]
    t_i = 0
    for i, (k, la, p, f) in enumerate(
        zip(kinds, nodes.layer.tolist(), nodes.pos.tolist(), nodes.feature.tolist(), strict=True)
    ):
        kind = KINDS[k]
        if kind == "feature":
            ours_key[("f", la, p, f)] = i
        elif kind == "error":
            ours_key[("e", la, p)] = i
        elif kind == "token":
            ours_key[("t", p)] = i
        else:
            ours_key[("y", target_tokens[t_i])] = i
            t_i += 1
    ct_key: dict[tuple, int] = {}
    sel = ct_graph.selected_features
    feats = ct_graph.active_features[sel]
    for i, (la, p, f) in enumerate(feats.tolist()):
        ct_key[("f", la, p, f)] = i
    off = len(sel)
    for la in range(n_layers):
        for p in range(n_pos):
            ct_key[("e", la, p)] = off + la * n_pos + p
    off += n_layers * n_pos
    for p in range(n_pos):
        ct_key[("t", p)] = off + p
    off += n_pos
    for j, tgt in enumerate(ct_graph.logit_targets):
        ct_key[("y", int(tgt.vocab_idx))] = off + j

    def shared(pred) -> list[tuple]:
        return [k for k in ours_key if k in ct_key and pred(k)]

    rows = shared(lambda k: (k[0] == "f" and k[2] > 0) or k[0] == "y")
    cols = shared(lambda k: k[0] in ("f", "e") and k[2] > 0)
    tok_cols = shared(lambda k: k[0] == "t" and k[1] > 0)
    A = graph.adjacency.double()
    B = ct_graph.adjacency_matrix.double()

    def block(cs: list[tuple]) -> tuple[float, float]:
        ri = torch.tensor([ours_key[k] for k in rows])
        rj = torch.tensor([ct_key[k] for k in rows])
        ci = torch.tensor([ours_key[k] for k in cs])
        cj = torch.tensor([ct_key[k] for k in cs])
        a, b = A[ri][:, ci], B[rj][:, cj]
        scale = float(a.abs().max().clamp_min(1e-30))
        return float((a - b).abs().max()) / scale, scale

    rel, scale = block(cols)
    rel_tok, _ = block(tok_cols)
    n_ours_feat = sum(1 for k in ours_key if k[0] == "f")
    return {
        "rows_compared": len(rows),
        "cols_compared": len(cols),
        "rel_max_diff": rel,
        "max_abs_edge": scale,
        "rel_max_diff_token_cols": rel_tok,
        "features_ours": n_ours_feat,
        "features_circuit_tracer": len(sel),
        "targets_shared": sum(1 for k in rows if k[0] == "y"),
    }


# ---- cases -------------------------------------------------------------------------------


def parse_cases(text: str, budget: int) -> list[tuple[int, int | None]]:
    cases = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            n, b = part.split(":")
            cases.append((int(n), None if b in ("", "full", "none") else int(b)))
        else:
            n = int(part)
            cases.append((n, budget if n in BUDGETED_BY_DEFAULT else None))
    return cases


def context_bytes(ctx: ReplacementContext) -> int:
    """Bytes of the tensors a replacement context holds (each storage counted once).

    The build's own estimate leaves these out (the context exists, and is already counted
    in the available memory, when the build checks), but a whole-build measurement
    includes them: at long prompts the logits and the dense per-layer activations are
    gigabytes.
    """
    seen: dict[int, int] = {}

    def visit(v: Any) -> None:
        if torch.is_tensor(v):
            st = v.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(v, (list, tuple)):
            for t in v:
                visit(t)
        elif isinstance(v, dict):
            for t in v.values():
                visit(t)
        elif hasattr(v, "__dict__") and type(v).__module__.startswith("tl_circuits"):
            for t in vars(v).values():
                visit(t)

    for k, v in vars(ctx).items():
        if k not in ("model", "transcoders"):
            visit(v)
    return sum(seen.values())


def top_functions(profiler: cProfile.Profile, n: int = 5) -> list[dict[str, Any]]:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({fn})",
                "calls": nc,
                "tottime": tt,
                "cumtime": ct,
            }
        )
    rows.sort(key=lambda r: r["cumtime"], reverse=True)
    # skip the wrapper frames (the lambda / build entry points) by keeping tl_circuits and torch
    return rows[: n + 8]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cases",
        default="8,16,32,128",
        help="comma list of N (full; 32 and 128 get --budget) or N:B (budget B)",
    )
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--longest",
        action="store_true",
        help="instead: probe budgeted builds of growing length, ours and circuit-tracer, each "
        "in its own process, until one passes --limit-gib of build memory (longest.py)",
    )
    ap.add_argument("--longest-ours", default="1024,1600", help="lengths probed for ours")
    ap.add_argument(
        "--longest-ct", default="128,144,256,384", help="lengths for circuit-tracer"
    )
    ap.add_argument(
        "--longest-ct-batch", default="256,32",
        help="circuit-tracer's batch sizes in --longest (each searched over --longest-ct)",
    )
    ap.add_argument("--ours-batch", type=int, default=64, help="ours' batch in --longest")
    ap.add_argument("--spill-dir", default=None, help="ours' spill_dir in --longest")
    ap.add_argument("--limit-gib", type=float, default=20.0)
    ap.add_argument("--no-circuit-tracer", action="store_true")
    ap.add_argument(
        "--ct-max-tokens",
        type=int,
        default=16,
        help="run circuit-tracer only on cases up to this many tokens",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="case (as in --cases) to profile with cProfile; prints top functions",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = gpt2_small_random(args.seed)

    def make_transcoders(n_tokens: int | None):
        return bench_transcoders(model, n_tokens, args.seed)

    tcs = make_transcoders(None)
    saes = list(tcs.saes)
    print(
        f"model + transcoders ready in {time.perf_counter() - t0:.1f}s "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)",
        flush=True,
    )

    ct, ct_why = (None, "disabled with --no-circuit-tracer")
    if not args.no_circuit_tracer:
        ct, ct_why = import_circuit_tracer()
        if ct is None:
            print(f"circuit-tracer not run: {ct_why}")
    ct_model = None

    cases = parse_cases(args.cases, args.budget)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "model": "random GPT-2 small shape (12x768, d_mlp 3072, vocab 50257)",
        "transcoders": "random SAE-Lens JumpReLU, d_sae 8192, ~64 active per layer/pos",
        "batch_size": args.batch_size,
        "cases": [],
        "circuit_tracer": None if ct is None else ct["version"],
        "circuit_tracer_skipped_because": ct_why if ct is None else None,
    }

    if args.longest:  # each probe its own process: see longest.py
        import longest

        longest_argv = ["--ours", args.longest_ours, "--ct", args.longest_ct]
        longest_argv += ["--ct-batch", args.longest_ct_batch, "--budget", str(args.budget)]
        longest_argv += ["--limit-gib", str(args.limit_gib), "--batch-size", str(args.ours_batch)]
        if args.spill_dir:
            longest_argv += ["--spill-dir", args.spill_dir]
        return longest.main(longest_argv)

    header = (
        f"{'case':>14} {'features':>9} {'nodes':>7} {'L0':>6} {'time s':>8} "
        f"{'build MiB':>10} {'peak MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for n_tok, budget in cases:
        tcs = make_transcoders(n_tok)
        saes = list(tcs.saes)
        ct_model = None  # rebuilt from this case's transcoders when needed
        prompt = random_prompt(n_tok, args.seed)
        ctx = ReplacementContext(model, tcs, prompt)
        l0_layers = ctx.reconstruction_stats().l0
        n_active = len(ctx.active_features())
        del ctx
        kwargs = dict(max_feature_nodes=budget, batch_size=args.batch_size, show_progress=False)
        label = f"{n_tok} tok" + ("" if budget is None else f" b{budget}")
        profile_this = args.profile and args.profile in (str(n_tok), f"{n_tok}:{budget}")
        profiler = cProfile.Profile() if profile_this else None
        try:
            if profiler is not None:
                profiler.enable()
            graph, m = measure(AttributionGraph.build, model, tcs, prompt, **kwargs)
        except Exception as exc:  # report and continue with the next case
            print(f"{label:>14} failed: {type(exc).__name__}: {exc}", flush=True)
            results["cases"].append(
                {"tokens": n_tok, "budget": budget, "error": f"{type(exc).__name__}: {exc}"}
            )
            continue
        finally:
            if profiler is not None:
                profiler.disable()
        case: dict[str, Any] = {
            "tokens": n_tok,
            "budget": budget,
            "active_features": n_active,
            "feature_nodes": int(graph.indices("feature").numel()),
            "nodes": graph.n_nodes,
            "targets": len(graph.targets),
            "l0_mean": float(l0_layers.mean()),
            "l0_per_layer": [round(float(x), 2) for x in l0_layers],
            **m,
        }
        if profiler is not None:
            case["profile_top"] = top_functions(profiler)
        print(
            f"{label:>14} {case['feature_nodes']:>9} {case['nodes']:>7} "
            f"{case['l0_mean']:>6.1f} {m['seconds']:>8.2f} "
            f"{m['build_memory_bytes'] / 2**20:>10.0f} {m['peak_rss_bytes'] / 2**20:>9.0f}",
            flush=True,
        )
        ct_text = "-"
        if ct is not None and n_tok <= args.ct_max_tokens:
            try:
                if ct_model is None:
                    ct_model = circuit_tracer_model(ct, model, saes)
                ct_graph, cm = measure(
                    ct["attribute"],
                    prompt,
                    ct_model,
                    batch_size=args.batch_size,
                    max_feature_nodes=budget,
                    verbose=False,
                )
                cmp = compare_adjacency(graph, ct_graph) if budget is None else {}
                case["circuit_tracer"] = {
                    **cm,
                    **cmp,
                    "time_ratio": m["seconds"] / cm["seconds"],
                    "memory_ratio": m["build_memory_bytes"] / max(cm["build_memory_bytes"], 1),
                }
                ct_text = (
                    f"{cm['seconds']:.1f}s {cm['build_memory_bytes'] / 2**20:.0f}MiB; "
                    f"ratio t {case['circuit_tracer']['time_ratio']:.3f} "
                    f"mem {case['circuit_tracer']['memory_ratio']:.3f}"
                )
                if cmp:
                    ct_text += f"; rel max diff {cmp['rel_max_diff']:.2e}"
                del ct_graph
            except Exception as exc:
                case["circuit_tracer"] = {"error": f"{type(exc).__name__}: {exc}"}
                ct_text = f"failed: {type(exc).__name__}: {exc}"
        results["cases"].append(case)
        if ct_text != "-":
            print(f"{'':>14} circuit-tracer: {ct_text}", flush=True)
        if "profile_top" in case:
            print(f"  cProfile, {label}, top by cumulative time:")
            for r in case["profile_top"]:
                print(
                    f"    {r['cumtime']:8.2f}s cum {r['tottime']:8.2f}s self "
                    f"{r['calls']:>7}x  {r['function']}"
                )
        del graph
        gc.collect()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
