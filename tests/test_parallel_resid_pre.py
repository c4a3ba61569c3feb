"""Transcoders reading ``blocks.{l}.hook_resid_pre`` (issue 13 item 5).

In a parallel block (Pythia, ``parallel_attn_mlp=True``) the MLP reads ``resid_pre`` through
ln2, so ``hook_resid_pre`` is its residual input (the analogue of ``hook_resid_mid`` in a
sequential block) and the frozen model's ``mlp_in`` is the identity on ``resid_pre``. R1,
R2, G1, G2, H1, H2 and Q1 hold there, through the shared invariant checks; a sequential
block refuses the hook (its MLP reads the residual after the attention)."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens
from test_graph_build import _custom_targets, check_g1, check_g2
from test_head_loadings import check_h1_graph, check_h2_graph
from test_qk import QUERY, attn_cache, check_q1
from test_replacement import _node_function

from tl_circuits import ReplacementContext
from tl_circuits.attention.qk.attribution import QKAttribution
from tl_circuits.attention.qk.basis import QKBasis
from tl_circuits.errors import HookError
from tl_circuits.graph import AttributionGraph
from tl_circuits.replacement.norms import Identity
from tl_circuits.testing import FAMILIES, random_clt, random_model, random_transcoders
from tl_circuits.training import TrainingConfig, train_transcoders

F64 = torch.float64
HOOK = "hook_resid_pre"
PARALLEL = "pythia"
KINDS = ("relu", "jumprelu_skip", "topk", "clt")
SEQUENTIAL = tuple(f for f in FAMILIES if not cached_model(f).cfg.parallel_attn_mlp)


def _graph(kind: str, targets=None) -> AttributionGraph:
    model = cached_model(PARALLEL, False, F64)
    tcs = cached_transcoders(PARALLEL, kind, False, F64, HOOK)
    return AttributionGraph.build(
        model, tcs, prompt_tokens(), targets=targets, show_progress=False, batch_size=32
    )


def test_the_family_is_parallel() -> None:
    assert cached_model(PARALLEL).cfg.parallel_attn_mlp
    assert SEQUENTIAL and PARALLEL not in SEQUENTIAL


@pytest.mark.parametrize("fold_ln", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_r1(kind: str, fold_ln: bool) -> None:
    model = cached_model(PARALLEL, fold_ln)
    tcs = cached_transcoders(PARALLEL, kind, fold_ln, torch.float32, HOOK)
    assert tcs.input_hook(1) == f"blocks.1.{HOOK}"
    ctx = ReplacementContext(model, tcs, prompt_tokens())
    # the transcoder input is the residual stream entering the block (layer 0: embeddings)
    torch.testing.assert_close(ctx.x_in[0], ctx.embeddings, rtol=0, atol=0)
    assert all(isinstance(block.mlp_in, Identity) for block in ctx.linear.blocks)
    logits, _ = ctx.run()
    assert torch.equal(logits, ctx.logits)
    assert len(ctx.active_features()) > 0
    zeros = {layer: torch.zeros_like(a) for layer, a in enumerate(ctx.activations)}
    changed, _ = ctx.run(feature_acts=zeros)
    assert (changed - ctx.logits).abs().max() > 1e-3  # the splice really replaces the MLPs


@pytest.mark.parametrize("kind", ("relu", "jumprelu_skip", "clt"))
def test_r2(kind: str) -> None:
    model = cached_model(PARALLEL, False, F64)
    ctx = ReplacementContext(
        model, cached_transcoders(PARALLEL, kind, False, F64, HOOK), prompt_tokens()
    )
    f, nodes = _node_function(ctx)
    gen = torch.Generator().manual_seed(11)
    direction = tuple(torch.randn(n.shape, generator=gen, dtype=F64) for n in nodes)
    base = f(*nodes)
    _, jvp = torch.autograd.functional.jvp(f, nodes, direction)
    step = f(*(n + d for n, d in zip(nodes, direction, strict=True))) - base
    torch.testing.assert_close(step, jvp, rtol=1e-9, atol=1e-9)
    assert jvp.abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_g1_g2(kind: str) -> None:
    check_g1(_graph(kind))
    graph = _graph(kind, _custom_targets(PARALLEL))
    check_g1(graph)
    check_g2(graph, (PARALLEL, kind, HOOK))


@pytest.mark.parametrize("kind", ("relu", "jumprelu_skip", "clt"))
def test_h1_h2(kind: str) -> None:
    graph = _graph(kind, _custom_targets(PARALLEL))
    check_h1_graph(graph, multi_write=kind == "clt")
    check_h2_graph(graph)


@pytest.mark.parametrize("kind", ("relu", "clt"))
def test_q1(kind: str) -> None:
    graph = _graph(kind)
    model = graph.context.model
    cache = attn_cache(model, graph.tokens)
    for layer in range(model.cfg.n_layers):
        for method in ("forward", "reverse"):
            basis = QKBasis.from_graph(graph, layer, method=method)
            for head in range(model.cfg.n_heads):
                check_q1(QKAttribution.from_basis(basis, head=head, query_pos=QUERY), model, cache)


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_sequential_blocks_refuse_resid_pre(family: str) -> None:
    model = cached_model(family)
    for tcs in (
        random_transcoders(model, "relu", input_hook=HOOK),
        random_clt(model, input_hook=HOOK),
    ):
        with pytest.raises(
            HookError,
            match=r"layer 0: input hook 'blocks\.0\.hook_resid_pre' .*"
            r"sequential block.*parallel_attn_mlp=True",
        ):
            ReplacementContext(model, tcs, prompt_tokens())


def test_training_refuses_resid_pre_on_sequential_blocks_and_trains_on_parallel() -> None:
    tokens = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = TrainingConfig(
        d_sae=32,
        batch_tokens=128,
        n_tokens=128 * 4,
        chunk_tokens=1024,
        device="cpu",
        checkpoint_every_tokens=0,
        input_hook=HOOK,
    )
    with pytest.raises(HookError, match=r"layer 0: .*hook_resid_pre.*sequential block"):
        train_transcoders(random_model("gpt2", n_layers=2), tokens, cfg, progress=False)
    result = train_transcoders(random_model(PARALLEL, n_layers=2), tokens, cfg, progress=False)
    assert result.transcoders is not None
    assert result.transcoders.input_hook(1) == f"blocks.1.{HOOK}"
