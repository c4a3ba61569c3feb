"""A hand-set 2-layer attention-only induction model (DESIGN.md §4, Q1/Q2 on a known circuit).

Residual stream: ``[token one-hot (V) | position one-hot (N) | "previous token was t" (V) |
output (V)]``. Layer 0's head is a previous-token head (query reads position ``p``, key reads
position ``j`` as ``j + 1``; its value copies the key's token into the previous-token
subspace). Layer 1's head is an induction head (query reads the current token, key reads the
previous-token subspace; its value copies the key's token into the output subspace, which
the unembedding reads). On ``A B ... A`` the last position attends to ``B`` and predicts
``B``.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_circuits.attention.qk.attribution import QKAttribution
from tl_circuits.attention.qk.basis import QKBasis
from tl_circuits.attention.qk.interventions import intervene_qk

V, N, D_HEAD = 8, 12, 12
TOKEN, POSITION, PREVIOUS, OUTPUT = 0, V, V + N, 2 * V + N
STRENGTH = 40.0  # score scale: attention is nearly one-hot


def induction_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=3 * V + N,
        d_head=D_HEAD,
        n_heads=1,
        d_vocab=V,
        n_ctx=N,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type="standard",
        dtype=torch.float64,
        device="cpu",
    )
    model = HookedTransformer(cfg, move_to_device=False)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.embed.W_E[:, TOKEN:POSITION] = torch.eye(V)
        model.pos_embed.W_pos[:, POSITION:PREVIOUS] = torch.eye(N)
        prev, ind = model.blocks[0].attn, model.blocks[1].attn
        for p in range(N):
            prev.W_Q[0, POSITION + p, p] = STRENGTH
            if p + 1 < N:
                prev.W_K[0, POSITION + p, p + 1] = 1.0
        for t in range(V):
            prev.W_V[0, TOKEN + t, t] = 1.0
            prev.W_O[0, t, PREVIOUS + t] = 1.0
            ind.W_Q[0, TOKEN + t, t] = STRENGTH
            ind.W_K[0, PREVIOUS + t, t] = 1.0
            ind.W_V[0, TOKEN + t, t] = 1.0
            ind.W_O[0, t, OUTPUT + t] = 1.0
        model.unembed.W_U[OUTPUT : OUTPUT + V] = 10.0 * torch.eye(V)
    model.eval()
    return model


A, B = 3, 6
PROMPT = torch.tensor([0, A, B, 1, 5, 2, 7, A])
QUERY, KEY_B = len(PROMPT) - 1, 2


def test_induction_top_term_and_removal() -> None:
    model = induction_model()
    pattern = model.run_with_cache(PROMPT[None])[1]["blocks.1.attn.hook_pattern"][0, 0, QUERY]
    assert int(pattern.argmax()) == KEY_B and float(pattern[KEY_B]) > 0.9  # induction works
    logits = model(PROMPT[None])[0, QUERY]
    assert int(logits.argmax()) == B

    basis = QKBasis.from_components(model, PROMPT, layer=1)
    qk = QKAttribution.from_basis(basis, head=0, query_pos=QUERY)
    key = qk.key_pos.tolist().index(KEY_B)
    top = qk.top_terms(key, k=2)
    table = basis.table
    embed, head0 = table.kind.index("embed"), table.kind.index("head")
    # the top term pairs the query token's embedding with the layer-0 head's output at B
    assert (top[0].query, top[0].key) == (embed, head0)
    assert top[0].value > 10 * abs(top[1].value)
    # and it is the term that makes B win the softmax competition
    comp = qk.top_terms(key, 1, competition=True)[0]
    assert (comp.query, comp.key) == (embed, head0) and comp.value > 0

    # Q2: remove the layer-0 head's output from the induction head's keys
    result = intervene_qk(basis, {head0: 0.0}, side="k", heads=[0])
    new = result.patterns[0, QUERY, : QUERY + 1]
    baseline = 1.0 / (QUERY + 1)  # no key stands out: uniform attention
    assert float(new[KEY_B]) < 1.5 * baseline
    torch.testing.assert_close(new, torch.full_like(new, baseline), atol=0.05, rtol=0)
    probs = result.logits[QUERY].softmax(-1)
    clean_probs = result.clean_logits[QUERY].softmax(-1)
    assert float(clean_probs[B]) > 0.9 and float(probs[B]) < 0.5
    assert B not in [t for t, _ in result.top_predictions(1, QUERY)]
    # the score moved by exactly the removed key-side terms
    expected = qk.scores - qk.key_marginals()[:, qk.k_components.tolist().index(head0)]
    torch.testing.assert_close(result.scores[0, QUERY, : QUERY + 1], expected)
    # control: removing an unrelated component (the positional embedding) changes nothing
    control = intervene_qk(basis, {table.kind.index("pos_embed"): 0.0}, side="k", heads=[0])
    torch.testing.assert_close(control.patterns, result.clean_patterns)
