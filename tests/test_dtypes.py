"""16-bit models and dictionaries (DESIGN.md §1, dtypes): the clean run and the splice stay
in the model's dtype (R1 bit for bit), every analysis computes and accumulates in float32.

Stated tolerances (docs/dtypes_and_devices.md):
bfloat16 5e-2, float16 1e-2, relative, for what compares a float32 sum with a value the
16-bit clean run computed (G1 against the row's input mass, Q1 against the largest score)
and for a 16-bit build's edges against a float32 build of the same weights (Frobenius, on
the nodes both have); 1e-4 for what is float32 on both sides (H1).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import prompt_tokens

from tl_circuits import AttributionGraph, HeadLoadings, QKAttribution, ReplacementContext
from tl_circuits.testing import random_clt, random_model, random_transcoders

TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
CASES = [
    (family, dtype, kind)
    for family in ("gpt2", "llama")
    for dtype in (torch.bfloat16, torch.float16)
    for kind in ("jumprelu_skip", "clt")
]


@functools.cache
def _setup(family: str, dtype: torch.dtype, kind: str):
    model = random_model(family, dtype=dtype)  # type: ignore[arg-type]
    tcs = random_clt(model) if kind == "clt" else random_transcoders(model, kind)  # type: ignore[arg-type]
    graph = AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)
    return model, tcs, graph


@pytest.mark.parametrize(("family", "dtype", "kind"), CASES)
def test_r1_is_exact_and_analyses_are_float32(family, dtype, kind) -> None:
    model, tcs, graph = _setup(family, dtype, kind)
    assert next(model.parameters()).dtype == dtype and tcs.dtype == dtype
    ctx = ReplacementContext(model, tcs, prompt_tokens())
    assert torch.equal(ctx.run()[0], ctx.logits)  # R1: the splice reproduces 16-bit logits
    assert ctx.compute_dtype == torch.float32
    for tensor in (graph.adjacency, graph.row_values, graph.constants, graph.nodes.activation):
        assert tensor.dtype == torch.float32
    scores = graph.scores()
    assert 0 < scores.replacement <= 1 and 0 < scores.completeness <= 1


@pytest.mark.parametrize(("family", "dtype", "kind"), CASES)
def test_g1_within_the_stated_tolerance(family, dtype, kind) -> None:
    _, _, graph = _setup(family, dtype, kind)
    rows = torch.cat([graph.indices("feature"), graph.indices("target")])
    total = graph.adjacency[rows].sum(1) + graph.constants[rows]
    mass = graph.adjacency[rows].abs().sum(1) + graph.constants[rows].abs()
    assert bool(((total - graph.row_values[rows]).abs() <= TOLERANCE[dtype] * mass).all())


@pytest.mark.parametrize(("family", "dtype", "kind"), CASES)
def test_edges_against_a_float32_build_of_the_same_weights(family, dtype, kind) -> None:
    model, tcs, graph = _setup(family, dtype, kind)
    model32 = copy.deepcopy(model).to(torch.float32)
    graph32 = AttributionGraph.build(
        model32, tcs.to(dtype=torch.float32), prompt_tokens(), show_progress=False
    )

    def index(g: AttributionGraph) -> dict[tuple[int, ...], int]:
        n = g.nodes
        rows = zip(n.kind.tolist(), n.layer.tolist(), n.pos.tolist(), n.feature.tolist())
        return {key: i for i, key in enumerate(rows)}

    ours, theirs = index(graph), index(graph32)
    common = sorted(set(ours) & set(theirs))
    assert len(common) >= 0.95 * len(theirs)  # features near a threshold may flip
    a = torch.tensor([ours[k] for k in common])
    b = torch.tensor([theirs[k] for k in common])
    low, high = graph.adjacency[a][:, a], graph32.adjacency[b][:, b]
    assert float((low - high).norm() / high.norm()) <= TOLERANCE[dtype]


@pytest.mark.parametrize(("family", "dtype", "kind"), CASES[:4])
def test_h1_and_q1_in_16_bit(family, dtype, kind) -> None:
    model, _, graph = _setup(family, dtype, kind)
    pruned = graph.prune()
    hl = HeadLoadings.compute(pruned)
    assert hl.loadings.dtype == torch.float32
    split = hl.bypass + hl.loadings.sum(-1)
    edge = hl.edge_values[:, None].expand_as(split)
    assert bool(((split - edge).abs()[hl.crossed] <= 1e-4 * edge.abs()[hl.crossed]).all())  # H1
    layer, head, query = model.cfg.n_layers - 1, 1, len(prompt_tokens()) - 1
    qk = QKAttribution.compute(graph, layer=layer, head=head, query_pos=query)
    _, cache = model.run_with_cache(prompt_tokens()[None])
    real = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, query, : query + 1].float()
    assert qk.scores.dtype == torch.float32
    assert float((qk.scores - real).abs().max()) <= TOLERANCE[dtype] * float(real.abs().max())
