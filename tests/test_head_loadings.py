"""Head loadings (DESIGN.md §3): H1 (the split sums to the edge at every crossed layer) on
all families and transcoder kinds, H2 (zeroing a head on the source's path changes the edge
by its loading) through the hooked replacement model and through the frozen linear model, a
hand-built previous-token head, pruned / loaded graphs and bad inputs."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import cached_model, cached_transcoders, prompt_tokens
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_circuits import HeadLoadings, TLCircuitsError
from tl_circuits.errors import HeadLoadingError
from tl_circuits.graph import AttributionGraph
from tl_circuits.graph.nodes import ERROR, FEATURE, TARGET, TOKEN
from tl_circuits.graph.targets import target_values
from tl_circuits.model.hooks import install_mlp_input_hooks
from tl_circuits.replacement.frozen import FrozenLinearModel
from tl_circuits.testing import FAMILIES, random_transcoders

F64 = torch.float64
KINDS = ("relu", "jumprelu_skip", "clt")


@functools.cache
def _graph(family: str, kind: str) -> AttributionGraph:
    model = cached_model(family, False, F64)
    tcs = cached_transcoders(family, kind, False, F64)
    gen = torch.Generator().manual_seed(2)
    targets = [7, (3, 9), torch.randn(model.cfg.d_model, generator=gen, dtype=F64)]
    return AttributionGraph.build(
        model, tcs, prompt_tokens(), targets=targets, show_progress=False, batch_size=32
    )


def _sample_edges(graph: AttributionGraph, per_class: int = 6, seed: int = 0) -> torch.Tensor:
    """Nonzero edges of every (source kind, target kind) class, with feature -> feature
    edges across positions and across layers."""
    nodes, adj = graph.nodes, graph.adjacency
    t, s = (adj != 0).nonzero(as_tuple=True)
    kt, ks = nodes.kind[t], nodes.kind[s]
    classes = {
        "feature->feature, other pos": (kt == FEATURE)
        & (ks == FEATURE)
        & (nodes.pos[t] != nodes.pos[s]),
        "feature->feature, same pos": (kt == FEATURE)
        & (ks == FEATURE)
        & (nodes.pos[t] == nodes.pos[s]),
        "feature->target": (kt == TARGET) & (ks == FEATURE),
        "error->target": (kt == TARGET) & (ks == ERROR),
        "error->feature": (kt == FEATURE) & (ks == ERROR),
        "token->feature": (kt == FEATURE) & (ks == TOKEN),
        "token->target": (kt == TARGET) & (ks == TOKEN),
    }
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for name, mask in classes.items():
        idx = mask.nonzero(as_tuple=True)[0]
        assert len(idx) > 0, name
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    # feature -> feature edges spanning two or more layers
    far = ((kt == FEATURE) & (ks == FEATURE) & (nodes.layer[t] - nodes.layer[s] >= 2)).nonzero(
        as_tuple=True
    )[0]
    picks.append(far[torch.randperm(len(far), generator=gen)[:per_class]])
    sel = torch.cat(picks)
    return torch.stack([t[sel], s[sel]], 1)


def _expected_crossed(graph: AttributionGraph, edges: torch.Tensor, parallel: bool) -> torch.Tensor:
    """Independent statement of the crossed layers (see the module docstring)."""
    nodes, n_layers = graph.nodes, graph.info["n_layers"]
    out = torch.zeros(len(edges), n_layers, dtype=torch.bool)
    for i, (t, s) in enumerate(edges.tolist()):
        first = -1 if int(nodes.kind[s]) == TOKEN else int(nodes.layer[s])
        if int(nodes.kind[t]) == TARGET:
            last = n_layers - 1  # logits read after the last block
        elif parallel:
            last = int(nodes.layer[t]) - 1  # x_in(l) reads resid_pre(l), beside attention
        else:
            last = int(nodes.layer[t])  # x_in(l) reads resid_mid(l), after attention
        for m in range(first + 1, last + 1):
            out[i, m] = True
    return out


def _check_h1(hl: HeadLoadings, rtol: float = 1e-5) -> None:
    total = hl.bypass + hl.loadings.sum(-1)
    err = (total - hl.edge_values[:, None]).abs()
    tol = rtol * hl.edge_values.abs()[:, None]
    assert bool((err <= tol)[hl.crossed].all()), float((err / tol)[hl.crossed].max())
    assert not hl.loadings[~hl.crossed].any()
    assert not hl.bypass[~hl.crossed].any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_h1_split_sums_to_edge(family: str, kind: str) -> None:
    check_h1_graph(_graph(family, kind), multi_write=kind == "clt")


def check_h1_graph(graph: AttributionGraph, multi_write: bool) -> None:
    """H1 on sampled edges of ``graph`` and on all of its edges; ``multi_write``: feature
    sources write at several layers (a CLT)."""
    assert graph.context is not None
    parallel = bool(graph.context.model.cfg.parallel_attn_mlp)
    edges = _sample_edges(graph)
    hl = HeadLoadings.compute(graph, edges, split_write_layers=True)
    assert torch.equal(hl.edges, edges)
    torch.testing.assert_close(hl.edge_values, graph.adjacency[edges[:, 0], edges[:, 1]])
    assert torch.equal(hl.crossed, _expected_crossed(graph, edges, parallel))
    _check_h1(hl)
    # non-trivial: heads carry part of the cross-position edges
    other_pos = graph.nodes.pos[edges[:, 0]] != graph.nodes.pos[edges[:, 1]]
    assert hl.loadings[other_pos].abs().sum() > 1e-3 * hl.edge_values[other_pos].abs().sum()
    # the split by write layer sums to the edge, and each write splits exactly
    assert hl.loadings_by_write is not None and hl.values_by_write is not None
    assert hl.bypass_by_write is not None and hl.write_layers is not None
    torch.testing.assert_close(hl.values_by_write.sum(1), hl.edge_values, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hl.loadings_by_write.sum(1), hl.loadings, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hl.bypass_by_write.sum(1), hl.bypass, rtol=1e-10, atol=1e-12)
    per_write = hl.bypass_by_write + hl.loadings_by_write.sum(-1)
    want = hl.values_by_write[:, :, None].expand_as(per_write)
    mask = hl.crossed[:, None, :].expand_as(per_write)
    torch.testing.assert_close(per_write[mask], want[mask], rtol=1e-8, atol=1e-12)
    if multi_write:  # feature sources write at several layers
        feats = graph.nodes.kind[edges[:, 1]] == FEATURE
        assert ((hl.values_by_write[feats] != 0).sum(1) > 1).any()
    # all edges at once (dense contractions) agree with the sample (gathered ones)
    every = HeadLoadings.compute(graph, target_batch=64, source_batch=96)
    _check_h1(every)
    row = {tuple(e): i for i, e in enumerate(every.edges.tolist())}
    idx = torch.tensor([row[tuple(e)] for e in edges.tolist()])
    torch.testing.assert_close(every.loadings[idx], hl.loadings, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(every.bypass[idx], hl.bypass, rtol=1e-9, atol=1e-12)
    assert len(every.edges) == int((graph.adjacency != 0).sum())


def _row_output(graph: AttributionGraph, rec, t: int) -> float:
    nodes = graph.nodes
    if int(nodes.kind[t]) == TARGET:
        first = int(graph.indices("target")[0])
        return float(target_values([graph.targets[t - first]], rec.final_normalized[0])[0])
    la, p, f = int(nodes.layer[t]), int(nodes.pos[t]), int(nodes.feature[t])
    return float(rec.pre_activations[la][0, p, f])


def _hooked_edge(graph: AttributionGraph, t: int, s: int, zero: tuple[int, int] | None) -> float:
    """Edge s -> t measured on the hooked replacement model (node mode, frozen attention
    and norms), optionally with head ``zero = (layer, head)``'s output (``hook_z``) zeroed:
    the run with source ``s`` doubled minus the run without (both with the head zeroed)."""
    ctx = graph.context
    assert ctx is not None
    nodes = graph.nodes
    la, p, f, k = int(nodes.layer[s]), int(nodes.pos[s]), int(nodes.feature[s]), int(nodes.kind[s])
    hooks = []
    if zero is not None:

        def zero_head(z: torch.Tensor, hook) -> torch.Tensor:
            z = z.clone()
            z[:, :, zero[1]] = 0.0
            return z

        hooks.append((f"blocks.{zero[0]}.attn.hook_z", zero_head))
    outs = []
    for scale in (1.0, 2.0):
        acts = {i: a.clone() for i, a in enumerate(ctx.activations)}
        errors, embeddings = None, None
        if k == FEATURE:
            acts[la][p, f] *= scale
        elif k == ERROR:
            errors = {la: ctx.errors[la].clone()}
            errors[la][p] *= scale
        else:
            embeddings = ctx.embeddings.clone()
            embeddings[p] *= scale
        with torch.no_grad(), ctx.model.hooks(fwd_hooks=hooks):
            _, rec = ctx.run(feature_acts=acts, errors=errors, embeddings=embeddings)
        outs.append(_row_output(graph, rec, t))
    return outs[1] - outs[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_h2_zeroing_a_head_removes_its_loading(family: str, kind: str) -> None:
    check_h2_graph(_graph(family, kind))


def check_h2_graph(graph: AttributionGraph) -> None:
    """H2 through the hooked replacement model on sampled edges and heads of ``graph``."""
    edges = _sample_edges(graph, per_class=2, seed=1)
    hl = HeadLoadings.compute(graph, edges)
    gen = torch.Generator().manual_seed(3)
    n_heads = hl.loadings.shape[2]
    checked = 0
    for i in torch.randperm(len(edges), generator=gen).tolist():
        layers = hl.crossed[i].nonzero(as_tuple=True)[0]
        if len(layers) == 0:
            continue
        t, s = edges[i].tolist()
        a = float(hl.edge_values[i])
        # the hooked model reproduces the edge itself
        atol = 1e-11  # float64 noise of a full forward pass, for the tiniest edges
        assert abs(_hooked_edge(graph, t, s, None) - a) <= 1e-7 * abs(a) + atol
        # one random head and the head carrying most of the edge
        m = int(layers[torch.randint(len(layers), (1,), generator=gen)])
        h = int(torch.randint(n_heads, (1,), generator=gen))
        flat = hl.loadings[i].abs().flatten()
        big = int(flat.argmax())
        for layer, head in ((m, h), (big // n_heads, big % n_heads)):
            loading = float(hl.loadings[i, layer, head])
            measured = a - _hooked_edge(graph, t, s, (layer, head))
            scale = max(abs(a), abs(loading))
            assert abs(measured - loading) <= 1e-7 * scale + atol, (i, layer, head, measured)
            checked += 1
        if checked >= 16:
            break
    assert checked >= 12


def _masked_attention(block, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The frozen block's attention (linear part) on ``x`` ``[B, pos, d]`` with head ``h``'s
    output scaled by ``mask[:, h]`` (``[B, n_heads]``): a reference written here from the
    block's frozen pieces, independent of the library's forward propagation."""
    v = torch.einsum("bkm,hme->bhke", block.ln1.forward_linear(x), block.W_V)
    z = torch.einsum("hqk,bhke->bhqe", block.pattern, v)
    if mask is not None:
        z = z * mask[:, :, None, None]
    return block.post_attn.forward_linear(torch.einsum("bhqe,hed->bqd", z, block.W_O))


def _skip(block, x: torch.Tensor) -> torch.Tensor:
    if block.W_skip is None:
        return torch.zeros_like(x)
    return block.mlp_in.forward_linear(x) @ block.W_skip.T


def _masked_forward(lin: FrozenLinearModel, writes: dict, embed, mask: dict | None) -> list:
    """``resid_pre(m)`` for every layer and, last, the final residual of the frozen
    direct-effect model (features cut), with head masks ``mask[m]`` ``[B, n_heads]``."""
    like = embed if embed is not None else next(iter(writes.values()))
    x = embed if embed is not None else torch.zeros_like(like)
    out = []
    for layer, block in enumerate(lin.blocks):
        out.append(x)
        attn = _masked_attention(block, x, mask.get(layer) if mask else None)
        if block.parallel:
            x = x + attn + _skip(block, x)
        else:
            x = x + attn
            x = x + _skip(block, x)
        if layer in writes:
            x = x + writes[layer]
    out.append(x)
    return out


def _linear_edge(
    lin: FrozenLinearModel, graph: AttributionGraph, t: int, s: int, mask: dict | None
) -> torch.Tensor:
    """Edge s -> t recomputed forward through the frozen linear model (batched over the
    head masks ``mask[m]`` ``[B, n_heads]``)."""
    ctx, nodes = graph.context, graph.nodes
    assert ctx is not None
    batch = next(iter(mask.values())).shape[0] if mask else 1
    n_pos, d = ctx.n_pos, lin.d_model
    k, la, p = int(nodes.kind[s]), int(nodes.layer[s]), int(nodes.pos[s])
    writes, embed = {}, None
    if k == TOKEN:
        embed = torch.zeros(batch, n_pos, d, dtype=F64)
        embed[:, p] = ctx.embeddings[p]
    elif k == ERROR:
        writes[la] = torch.zeros(batch, n_pos, d, dtype=F64)
        writes[la][:, p] = ctx.errors[la][p]
    else:
        tcs, f, act = ctx.transcoders, int(nodes.feature[s]), float(nodes.activation[s])
        for w in tcs.target_layers(la):
            writes[w] = torch.zeros(batch, n_pos, d, dtype=F64)
            writes[w][:, p] = act * tcs.decoder(la, w)[f]
    resid = _masked_forward(lin, writes, embed, mask)
    pt = int(nodes.pos[t])
    if int(nodes.kind[t]) == TARGET:
        target = graph.targets[t - int(graph.indices("target")[0])]
        return lin.ln_final.forward_linear(resid[-1])[:, target.pos] @ target.vector
    lt, f = int(nodes.layer[t]), int(nodes.feature[t])
    block, pre = lin.blocks[lt], resid[lt]
    if block.parallel:  # x_in reads resid_pre beside the attention
        x_in = block.mlp_in.forward_linear(pre)
    else:  # x_in reads resid_mid, after this layer's (masked) attention
        x_in = block.mlp_in.forward_linear(
            pre + _masked_attention(block, pre, mask.get(lt) if mask else None)
        )
    return x_in[:, pt] @ ctx.transcoders.encoder(lt).W_enc[:, f]


@pytest.mark.parametrize("family", FAMILIES)
def test_h2_in_the_frozen_linear_model(family: str) -> None:
    """Every (crossed layer, head) of sampled edges at once: zeroing that head in the frozen
    linear model (a forward written in this test) changes the edge by exactly its loading."""
    graph = _graph(family, "clt")
    assert graph.context is not None
    lin = FrozenLinearModel(graph.context)
    edges = _sample_edges(graph, per_class=2, seed=4)
    hl = HeadLoadings.compute(graph, edges)
    n_layers, n_heads = hl.loadings.shape[1:]
    for i, (t, s) in enumerate(edges.tolist()):
        mask = {m: torch.ones(n_layers * n_heads, n_heads, dtype=F64) for m in range(n_layers)}
        for m in range(n_layers):
            for h in range(n_heads):
                mask[m][m * n_heads + h, h] = 0.0
        full = _linear_edge(lin, graph, t, s, None)
        ablated = _linear_edge(lin, graph, t, s, mask).view(n_layers, n_heads)
        a = float(hl.edge_values[i])
        assert abs(float(full[0]) - a) <= 1e-9 * abs(a)
        torch.testing.assert_close(full - ablated, hl.loadings[i], rtol=1e-8, atol=1e-10 * abs(a))


# ---- a hand-built previous-token head ----------------------------------------------------


def _previous_token_model() -> HookedTransformer:
    """2 layers, 4 heads: head (0, 0) attends to the previous position (positional
    embeddings ``4 e_p`` in dims 0..15, ``W_Q`` shifts them by one) and copies token
    dims 16..31 into dims 32..47; every other head attends to its own position."""
    n_ctx, d_model, n_heads, d_head = 16, 64, 4, 16
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=32,
        d_vocab=20,
        n_ctx=n_ctx,
        act_fn="relu",
        normalization_type="LN",
        positional_embedding_type="standard",
        dtype=F64,
        device="cpu",
        seed=0,
    )
    model = HookedTransformer(cfg, move_to_device=False)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    beta = 5.0
    eye = torch.eye(n_ctx, dtype=F64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w"):
                param.fill_(1.0)
            else:
                param.zero_()
        model.embed.W_E[:, n_ctx:] = randn(cfg.d_vocab, d_model - n_ctx)
        model.pos_embed.W_pos[:] = 0.0
        model.pos_embed.W_pos[:, :n_ctx] = 4.0 * eye
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            for h in range(n_heads):
                attn.W_K[h, :n_ctx] = eye
                if layer == 0 and h == 0:
                    attn.W_Q[h, 1:n_ctx, : n_ctx - 1] = beta * eye[1:, 1:]  # q -> q-1
                    attn.W_V[h, 16:32] = eye
                    attn.W_O[h, :, 32:48] = eye
                else:
                    attn.W_Q[h, :n_ctx] = beta * eye  # q -> q
                    attn.W_V[h] = randn(d_model, d_head) / d_model**0.5
                    attn.W_O[h, :, n_ctx:] = 0.5 * randn(d_head, d_model - n_ctx) / d_head**0.5
            block.mlp.W_in[:] = randn(d_model, cfg.d_mlp) / d_model**0.5
            block.mlp.W_out[:] = 0.1 * randn(cfg.d_mlp, d_model) / cfg.d_mlp**0.5
        model.unembed.W_U[:] = randn(d_model, cfg.d_vocab) / d_model**0.5
    model.eval()
    install_mlp_input_hooks(model)
    return model


def test_previous_token_head_carries_the_cross_position_edge() -> None:
    model = _previous_token_model()
    tcs = random_transcoders(
        model, "relu", d_sae=128, active_fraction=0.3, calibration_positions=12
    )
    tokens = torch.randint(0, 20, (12,), generator=torch.Generator().manual_seed(5))
    graph = AttributionGraph.build(model, tcs, tokens, show_progress=False)
    ctx = graph.context
    assert ctx is not None
    pattern = ctx.frozen["blocks.0.attn.hook_pattern"][0]
    q = torch.arange(1, 12)
    assert (pattern[0, q, q - 1] > 1 - 1e-6).all()  # head (0, 0): previous token
    assert (pattern[1:, q, q] > 1 - 1e-6).all()  # the others: own position
    nodes, adj = graph.nodes, graph.adjacency
    edges = []
    for p in (2, 5, 9):
        token = int(graph.indices("token")[p])
        feats = ((nodes.kind == FEATURE) & (nodes.layer == 1) & (nodes.pos == p + 1)).nonzero(
            as_tuple=True
        )[0]
        best = feats[adj[feats, token].abs().argmax()]
        edges.append((int(best), token))
    hl = HeadLoadings.compute(graph, edges)
    _check_h1(hl)
    a = hl.edge_values
    assert (a.abs() > 1e-3).all()  # a real edge
    assert hl.crossed[:, :2].all()  # token -> layer 1 feature crosses layers 0 and 1
    # head (0, 0) carries the whole edge at layer 0, to 1e-4 of it (what leaks: the
    # softmax tails of the hand-set patterns, through the other heads and the residual)
    torch.testing.assert_close(hl.loadings[:, 0, 0] / a, torch.ones_like(a), rtol=0, atol=1e-4)
    assert (hl.loadings[:, 0, 1:].abs() <= 1e-4 * a.abs()[:, None]).all()
    assert (hl.bypass[:, 0].abs() <= 1e-4 * a.abs()).all()
    assert [h[:2] for h in hl.top_heads(0, k=1)] == [(0, 0)]
    totals = hl.head_totals()
    assert totals.shape == (2, 4)
    assert int(totals[0].argmax()) == 0


# ---- pruned and loaded graphs, helpers, bad inputs ----------------------------------------


def test_pruned_graph_and_helpers() -> None:
    graph = _graph("gpt2", "jumprelu_skip")
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.9)
    assert pruned.context is graph.context
    hl = HeadLoadings.compute(pruned)
    assert len(hl.edges) == int((pruned.adjacency != 0).sum())
    _check_h1(hl)
    # the same edges, by their original node indices, give the same loadings
    kept = torch.tensor(pruned.info["pruned"]["kept_node_index"])
    full = HeadLoadings.compute(graph, kept[hl.edges])
    torch.testing.assert_close(full.loadings, hl.loadings, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full.bypass, hl.bypass, rtol=1e-10, atol=1e-12)
    # helpers
    top = hl.top_heads(0, k=3)
    assert len(top) <= 3
    mags = [abs(v) for _, _, v in top]
    assert mags == sorted(mags, reverse=True)
    for layer, head, value in top:
        assert value == float(hl.loadings[0, layer, head])
        assert bool(hl.crossed[0, layer])
    layer, head = divmod(int(hl.head_totals().flatten().argmax()), hl.loadings.shape[2])
    carried = hl.edges_for_head(layer, head, k=4)
    assert 1 <= len(carried) <= 4
    t, s, value = carried[0]
    assert value == float(hl.loadings[hl.edge_index(t, s), layer, head])
    assert abs(value) == float(hl.loadings[:, layer, head].abs().max())
    torch.testing.assert_close(hl.head_totals(), hl.loadings.abs().sum(0))


def test_loaded_graph_needs_the_model(tmp_path) -> None:
    graph = _graph("llama", "relu")
    path = graph.save(tmp_path / "g")
    loaded = AttributionGraph.load(path)
    assert loaded.context is None
    with pytest.raises(HeadLoadingError, match="rebuild"):
        HeadLoadings.compute(loaded)
    edges = _sample_edges(graph, per_class=2)
    model = cached_model("llama", False, F64)
    tcs = cached_transcoders("llama", "relu", False, F64)
    again = HeadLoadings.compute(loaded, edges, model=model, transcoders=tcs)
    ref = HeadLoadings.compute(graph, edges)
    torch.testing.assert_close(again.loadings, ref.loadings, rtol=1e-10, atol=1e-12)
    other = cached_model("gpt2", False, F64)
    with pytest.raises(HeadLoadingError, match="different model"):
        HeadLoadings.compute(loaded, edges, model=other, transcoders=tcs)
    with pytest.raises(HeadLoadingError, match="different model"):
        HeadLoadings.compute(graph, edges, model=other)


def test_bad_edges() -> None:
    graph = _graph("gpt2", "relu")
    n = graph.n_nodes
    good = _sample_edges(graph, per_class=1)
    t, s = good[0].tolist()
    assert issubclass(HeadLoadingError, TLCircuitsError)
    with pytest.raises(HeadLoadingError, match="out of range"):
        HeadLoadings.compute(graph, [(t, n)])
    with pytest.raises(HeadLoadingError, match="out of range"):
        HeadLoadings.compute(graph, [(-1, s)])
    zero = (graph.adjacency[t] == 0).nonzero(as_tuple=True)[0][0]
    with pytest.raises(HeadLoadingError, match="not an edge"):
        HeadLoadings.compute(graph, [(t, int(zero))])
    err_row = int(graph.indices("error")[0])
    with pytest.raises(HeadLoadingError, match="error node"):
        HeadLoadings.compute(graph, [(err_row, s)])
    tok_row = int(graph.indices("token")[0])
    with pytest.raises(HeadLoadingError, match="token node"):
        HeadLoadings.compute(graph, [(tok_row, s)])
    with pytest.raises(HeadLoadingError, match="shape"):
        HeadLoadings.compute(graph, torch.tensor([t, s]))
    with pytest.raises(HeadLoadingError, match="integers"):
        HeadLoadings.compute(graph, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(HeadLoadingError, match="target_batch"):
        HeadLoadings.compute(graph, good, target_batch=0)
    empty = HeadLoadings.compute(graph, [])
    assert empty.loadings.shape == (0, 3, 4)
    hl = HeadLoadings.compute(graph, good)
    with pytest.raises(HeadLoadingError, match="out of range"):
        hl.top_heads(len(good))
    with pytest.raises(HeadLoadingError, match="out of range"):
        hl.edges_for_head(3, 0)
    with pytest.raises(HeadLoadingError, match="not among"):
        hl.edge_index(t, int(zero))
