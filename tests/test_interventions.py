"""Interventions agree with the graph, and steered generation reproduces the model."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens

from tl_circuits import AttributionGraph, FeatureIntervention, intervene, steered_generate
from tl_circuits.graph.targets import target_values
from tl_circuits.replacement.interventions import InterventionError
from tl_circuits.testing import FAMILIES

F64 = torch.float64


def _graph(family: str, kind: str) -> AttributionGraph:
    model = cached_model(family, False, F64)
    tcs = cached_transcoders(family, kind, False, F64)
    return AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)


@pytest.mark.parametrize("kind", ["jumprelu_skip", "clt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_constrained_zeroing_moves_targets_by_minus_the_edge(family: str, kind: str) -> None:
    """With attention frozen and every later feature held, zeroing a feature moves each
    target by exactly minus its direct edge, through the public intervention API."""
    graph = _graph(family, kind)
    ctx = graph.context
    assert ctx is not None
    base = target_values(graph.targets, ctx.final_normalized)
    targets = graph.indices("target")
    feats = graph.indices("feature")
    strongest = feats[graph.adjacency[targets][:, feats].abs().sum(0).argsort(descending=True)]
    for s in strongest[:5].tolist():
        la, p, f = (int(graph.nodes.layer[s]), int(graph.nodes.pos[s]), int(graph.nodes.feature[s]))
        result = intervene(
            ctx,
            [FeatureIntervention.zero(la, f, p)],
            freeze_attention=True,
            constrained=(la, ctx.n_layers - 1),
        )
        moved = target_values(graph.targets, result.final_normalized) - base
        expected = -graph.adjacency[targets, s]
        torch.testing.assert_close(moved, expected, rtol=1e-6, atol=1e-9)
        assert result.activations[la][p, f] == 0


def test_identity_intervention_reproduces_clean_logits() -> None:
    graph = _graph("llama", "jumprelu_skip")
    ctx = graph.context
    assert ctx is not None
    f = int(graph.nodes.feature[0])
    for frozen in (False, True):
        result = intervene(ctx, [FeatureIntervention(0, f, scale=1.0)], freeze_attention=frozen)
        assert torch.equal(result.logits, ctx.logits)


def test_live_intervention_changes_downstream_features() -> None:
    graph = _graph("gpt2", "jumprelu_skip")
    ctx = graph.context
    assert ctx is not None
    # set a layer-0 feature very high at every position: later layers' features react
    result = intervene(ctx, [FeatureIntervention(0, 0, value=50.0)])
    assert (result.activations[0][:, 0] == 50.0).all()
    changed = (result.activations[-1] - ctx.activations[-1]).abs().max()
    assert changed > 1e-3
    assert (result.logits - ctx.logits).abs().max() > 1e-3
    # constrained to layer 0 only: layer-0 features are held, the rest recomputed
    held = intervene(ctx, [FeatureIntervention(0, 0, value=50.0)], constrained=(0, 0))
    others = torch.ones_like(held.activations[0], dtype=torch.bool)
    others[:, 0] = False
    assert torch.equal(held.activations[0][others], ctx.activations[0][others])


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_steered_generation(family: str) -> None:
    model = cached_model(family)
    tcs = cached_transcoders(family, "jumprelu_skip")
    prompt = prompt_tokens(6)
    plain = steered_generate(model, tcs, prompt, max_new_tokens=6)
    # no interventions: exactly the model's own greedy continuation
    tokens = prompt.clone()
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens[None])[0, -1].argmax().view(1)])
    assert torch.equal(plain, tokens)
    # a strong intervention at every position changes what is generated
    steered = steered_generate(
        model, tcs, prompt, [FeatureIntervention(1, 3, value=200.0)], max_new_tokens=6
    )
    assert not torch.equal(steered, plain)
    assert torch.equal(steered[:6], prompt)


def test_bad_interventions() -> None:
    graph = _graph("gpt2", "relu")
    ctx = graph.context
    assert ctx is not None
    with pytest.raises(InterventionError, match="exactly one"):
        FeatureIntervention(0, 0)
    with pytest.raises(InterventionError, match="layer 9 out of range"):
        intervene(ctx, [FeatureIntervention.zero(9, 0)])
    with pytest.raises(InterventionError, match="feature 10000 out of range"):
        intervene(ctx, [FeatureIntervention.zero(0, 10_000)])
    with pytest.raises(InterventionError, match="position 40 outside"):
        intervene(ctx, [FeatureIntervention.zero(0, 0, 40)])
    with pytest.raises(InterventionError, match="outside the constrained range"):
        intervene(ctx, [FeatureIntervention.zero(0, 0)], constrained=(1, 2))
    with pytest.raises(InterventionError, match="constrained range"):
        intervene(ctx, [FeatureIntervention.zero(1, 0)], constrained=(2, 1))
