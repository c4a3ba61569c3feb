"""Invariants R1 and R2 of DESIGN.md §1 on all six architecture families."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_KINDS, cached_model, cached_transcoders, prompt_tokens

from tl_circuits import ReplacementContext
from tl_circuits.testing import FAMILIES


@pytest.mark.parametrize("fold_ln", [False, True])
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_r1_replacement_reproduces_logits(family: str, kind: str, fold_ln: bool) -> None:
    model = cached_model(family, fold_ln)
    ctx = ReplacementContext(model, cached_transcoders(family, kind, fold_ln), prompt_tokens())
    logits, _ = ctx.run()
    assert (logits - ctx.logits).abs().max().item() <= 1e-5
    # bit-exact in this implementation: the splice adds an exact zero in the clean run
    assert torch.equal(logits, ctx.logits)
    # the splice is not a no-op: the reconstruction actually feeds the forward pass
    assert len(ctx.active_features()) > 0
    stats = ctx.reconstruction_stats()
    assert (stats.fvu > 0).all() and (stats.l0 > 0).all()
    for layer in range(ctx.n_layers):
        torch.testing.assert_close(
            ctx.reconstruction[layer] + ctx.errors[layer], ctx.mlp_out[layer], rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_r1_splice_changes_output_when_features_change(family: str) -> None:
    """Zeroing the features changes the logits: the MLP output really is replaced."""
    model = cached_model(family)
    ctx = ReplacementContext(model, cached_transcoders(family, "jumprelu_skip"), prompt_tokens())
    zeros = {layer: torch.zeros_like(a) for layer, a in enumerate(ctx.activations)}
    logits, _ = ctx.run(feature_acts=zeros)
    assert (logits - ctx.logits).abs().max() > 1e-3


def _node_function(ctx: ReplacementContext):
    """f(acts, errors, embeddings) -> (pre-activations of all layers, pre-cap logits), flat."""
    n_layers = ctx.n_layers

    def f(*nodes: torch.Tensor) -> torch.Tensor:
        acts = dict(enumerate(nodes[:n_layers]))
        errors = dict(enumerate(nodes[n_layers : 2 * n_layers]))
        _, rec = ctx.run(feature_acts=acts, errors=errors, embeddings=nodes[-1])
        pres = [rec.pre_activations[layer].reshape(-1) for layer in range(n_layers)]
        return torch.cat([*pres, rec.logits_pre_cap.reshape(-1)])

    nodes = (*ctx.activations, *ctx.errors, ctx.embeddings)
    return f, nodes


@pytest.mark.parametrize("kind", ["relu", "jumprelu_skip", "clt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_r2_frozen_model_is_affine_in_nodes(family: str, kind: str) -> None:
    dtype = torch.float64
    model = cached_model(family, False, dtype)
    ctx = ReplacementContext(model, cached_transcoders(family, kind, False, dtype), prompt_tokens())
    f, nodes = _node_function(ctx)
    gen = torch.Generator().manual_seed(11)
    direction = tuple(torch.randn(n.shape, generator=gen, dtype=dtype) for n in nodes)
    base = f(*nodes)
    # the clean node values reproduce the clean pre-activations
    clean_pres = torch.cat([p.reshape(-1) for p in ctx.pre_activations])
    torch.testing.assert_close(base[: clean_pres.numel()], clean_pres, rtol=0, atol=1e-12)
    _, jvp = torch.autograd.functional.jvp(f, nodes, direction)
    # a large finite step: an affine map has no curvature, so it matches the jvp exactly
    step = f(*(n + d for n, d in zip(nodes, direction))) - base
    torch.testing.assert_close(step, jvp, rtol=1e-9, atol=1e-9)
    step2 = f(*(n + 2 * d for n, d in zip(nodes, direction))) - base
    torch.testing.assert_close(step2, 2 * step, rtol=1e-9, atol=1e-9)
    assert jvp.abs().max() > 1e-3  # the direction actually moves the outputs


def test_r2_fails_without_freezing() -> None:
    """The check can fail: with live attention and norms the same map is not affine."""
    dtype = torch.float64
    model = cached_model("gpt2", False, dtype)
    ctx = ReplacementContext(
        model, cached_transcoders("gpt2", "relu", False, dtype), prompt_tokens()
    )
    nodes = (*ctx.activations, *ctx.errors, ctx.embeddings)
    n_layers = ctx.n_layers

    def f(*xs: torch.Tensor) -> torch.Tensor:
        _, rec = ctx.run(
            feature_acts=dict(enumerate(xs[:n_layers])),
            embeddings=xs[-1],
            freeze_attention=False,
            freeze_norms=False,
        )
        return rec.logits_pre_cap.reshape(-1)

    gen = torch.Generator().manual_seed(5)
    direction = tuple(torch.randn(n.shape, generator=gen, dtype=dtype) for n in nodes)
    base = f(*nodes)
    step = f(*(n + d for n, d in zip(nodes, direction))) - base
    step2 = f(*(n + 2 * d for n, d in zip(nodes, direction))) - base
    assert (step2 - 2 * step).abs().max() > 1e-3
