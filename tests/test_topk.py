"""TopK activations (DESIGN.md §1): the kept set is frozen state, a kept feature's activation
is its pre-activation (either sign), and the graph's invariants hold with negative kept
values too. R1, R2, G1 and G2 run on TopK sets in test_replacement / test_graph_build."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model, prompt_tokens

from tl_circuits import AttributionGraph, CrossLayerTranscoder, TranscoderSet
from tl_circuits.errors import TranscoderConfigError
from tl_circuits.testing import random_clt, random_transcoders
from tl_circuits.transcoders.base import Encoder

F64 = torch.float64


def test_encoder_keeps_the_top_k_as_they_are() -> None:
    gen = torch.Generator().manual_seed(0)
    enc = Encoder(torch.randn(8, 20, generator=gen), torch.zeros(20), None, top_k=5)
    pre = torch.randn(3, 7, 20, generator=gen) - 1.0  # mostly negative: kept values too
    acts = enc.activations(pre)
    kept = acts != 0
    assert torch.equal(kept.sum(-1), torch.full((3, 7), 5))
    assert torch.equal(acts[kept], pre[kept])  # not rectified
    assert (acts[kept] < 0).any()
    # the kept ones are the 5 largest at each position
    assert torch.equal(kept, pre >= pre.topk(5, dim=-1).values[..., -1:])
    # with a threshold rule as well, kept values must also exceed it
    thresholded = Encoder(enc.W_enc, enc.b_enc, torch.zeros(20), top_k=5)
    assert torch.equal(thresholded.activations(pre) != 0, kept & (pre > 0))
    with pytest.raises(TranscoderConfigError, match="top_k"):
        Encoder(enc.W_enc, enc.b_enc, None, top_k=21)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("clt", [False, True])
def test_g1_with_negative_kept_activations(family: str, clt: bool) -> None:
    """A large k keeps negative pre-activations: they are nodes, and each feature's and
    target's inputs plus constants still sum to its value."""
    model = cached_model(family, False, F64)
    if clt:
        tcs = random_clt(model, activation="topk", active_fraction=0.5, skip=False)
    else:
        tcs = random_transcoders(model, "topk", active_fraction=0.5)
    graph = AttributionGraph.build(model, tcs, prompt_tokens(), show_progress=False)
    features = graph.indices("feature")
    assert (graph.nodes.activation[features] < 0).any()
    rows = torch.cat([features, graph.indices("target")])
    total = graph.adjacency[rows].sum(1) + graph.constants[rows]
    torch.testing.assert_close(total, graph.row_values[rows], rtol=1e-10, atol=1e-10)
    ctx = graph.context
    assert ctx is not None
    torch.testing.assert_close(ctx.run()[0], ctx.logits, rtol=0, atol=1e-12)  # R1


def test_top_k_survives_save_and_load(tmp_path) -> None:
    model = cached_model("gpt2", False, F64)
    plt = random_transcoders(model, "topk")
    again = TranscoderSet.load(plt.save(tmp_path / "plt"))
    assert again.top_k == plt.top_k is not None
    clt = random_clt(model, activation="topk")
    back = CrossLayerTranscoder.load(clt.save(tmp_path / "clt"))
    assert back.top_k == clt.top_k is not None
    x = torch.randn(5, model.cfg.d_model, dtype=F64)
    for a, b in ((plt, again), (clt, back)):
        for layer in range(model.cfg.n_layers):
            ea, eb = a.encoder(layer), b.encoder(layer)
            assert torch.equal(
                ea.activations(ea.pre_activations(x)), eb.activations(eb.pre_activations(x))
            )
    with pytest.raises(TranscoderConfigError, match="top_k"):
        CrossLayerTranscoder(None, n_layers=2, d_model=4, d_sae=3, activation="topk")
