# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 1. Your first attribution graph
#
# This tutorial builds the attribution graph of one prompt, reads it, prunes it, checks a
# claim it makes with an intervention, and saves it. It runs on the **embedded default
# model** (a small trained transformer shipped with the package, with its transcoders), so
# it needs no download. With a real model you would use
# `tl_circuits.load_pretrained("gemma-2-2b", "gemma-scope-2b-pt-transcoders")` instead
# (tutorial 4).

# %%
import torch

from tl_circuits import AttributionGraph, FeatureIntervention, ReplacementContext, intervene
from tl_circuits.default import DEFAULT_PROMPTS, load_default_model, load_default_transcoders
from tl_circuits.graph.targets import target_values

model = load_default_model()
transcoders = load_default_transcoders("per_layer")
prompt = DEFAULT_PROMPTS["fact_plays"].text
print(prompt, "->", DEFAULT_PROMPTS["fact_plays"].answer)
print(transcoders)

# %% [markdown]
# ## The local replacement model
# `ReplacementContext` runs the model once, caches attention patterns and norm scales, and
# replaces each MLP by its transcoder plus an error term. Run with its hooks, the model
# reproduces its own logits exactly (invariant R1).

# %%
ctx = ReplacementContext(model, transcoders, prompt)
logits, _ = ctx.run()
assert torch.equal(logits, ctx.logits)
stats = ctx.reconstruction_stats()
print("per-layer FVU:", [round(x, 3) for x in stats.fvu.tolist()])
print("per-layer L0: ", [round(x, 1) for x in stats.l0.tolist()])

# %% [markdown]
# ## Build the graph
# Nodes are the active features, the error terms, the token embeddings and the targets
# (by default the most likely next tokens, up to 95% probability). `adjacency[t, s]` is the
# direct effect of node `s` on node `t`. Every feature's and target's input edges, plus the
# constant terms, add up to its value (invariant G1).

# %%
graph = AttributionGraph.build(model, transcoders, prompt, show_progress=False)
print({k: graph.nodes.count(k) for k in ("feature", "error", "token", "target")})
rows = torch.cat([graph.indices("feature"), graph.indices("target")])
g1 = graph.adjacency[rows].sum(1) + graph.constants[rows] - graph.row_values[rows]
assert g1.abs().max() < 1e-4

# %% [markdown]
# ## Read it: the strongest inputs to the top target

# %%
top = int(graph.indices("target")[0])
print("target:", graph.node_label(top))
strongest = graph.adjacency[top].abs().argsort(descending=True)[:5]
for s in strongest.tolist():
    print(f"  {float(graph.adjacency[top, s]):+.4f}  {graph.node_label(s)}")

# %% [markdown]
# ## Prune and score
# Pruning keeps the nodes carrying 80% and the edges carrying 98% of the influence on the
# targets. The replacement score is the share of influence that reaches the targets from
# tokens rather than error terms.

# %%
pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
scores = pruned.scores()
print(
    f"{pruned.n_nodes} nodes; replacement {scores.replacement:.3f}, "
    f"completeness {scores.completeness:.3f}"
)

# %% [markdown]
# ## Check a claim with an intervention
# The graph claims the strongest feature input to the top target has a direct effect of
# `A[t, s]`. Zero that feature, holding every later feature and the attention patterns
# fixed (a *constrained* intervention): the target must move by exactly `-A[t, s]`.

# %%
features = graph.indices("feature")
s = int(features[graph.adjacency[top, features].abs().argmax()])
layer, pos, feature = (
    int(graph.nodes.layer[s]),
    int(graph.nodes.pos[s]),
    int(graph.nodes.feature[s]),
)
result = intervene(
    ctx,
    [FeatureIntervention.zero(layer, feature, pos)],
    freeze_attention=True,
    constrained=(layer, ctx.n_layers - 1),
)
target = graph.targets[0]
moved = float(
    target_values([target], result.final_normalized)[0]
    - target_values([target], ctx.final_normalized)[0]
)
print(f"predicted {-float(graph.adjacency[top, s]):+.5f}, measured {moved:+.5f}")
assert abs(moved + float(graph.adjacency[top, s])) < 1e-4

# %% [markdown]
# Unconstrained (live) interventions let every downstream feature react, as in the real
# model; the change then includes indirect effects.

# %%
live = intervene(ctx, [FeatureIntervention.zero(layer, feature, pos)])
print(
    "top-token logit change (live):",
    float(live.logits[-1, target.token] - ctx.logits[-1, target.token]),
)

# %% [markdown]
# ## Which attention heads carried an edge
# An edge between positions is carried by attention. `HeadLoadings` splits every edge exactly
# over the heads of each attention layer its signal crosses, plus a bypass through the
# residual stream: `A[t, s] = bypass[m] + sum_h loading[m, h]` at every crossed layer `m`.

# %%
from tl_circuits import HeadLoadings  # noqa: E402

hl = HeadLoadings.compute(pruned)
print(f"{hl.n_edges} edges split over {hl.loadings.shape[1]} layers x {hl.loadings.shape[2]} heads")
i = int(hl.edge_values.abs().argmax())
t, s_ = (int(x) for x in hl.edges[i])
print(
    "strongest edge:",
    pruned.node_label(s_),
    "->",
    pruned.node_label(t),
    f"({float(hl.edge_values[i]):+.4f})",
)
for layer, head, loading in hl.top_heads(i, k=3):
    print(f"  L{layer}H{head}: {loading:+.4f}")
crossed = hl.crossed[i]
total = hl.bypass[i][crossed] + hl.loadings[i][crossed].sum(-1)
assert torch.allclose(total, hl.edge_values[i].expand_as(total), rtol=1e-4, atol=1e-6)
print("heads that matter most on this prompt (sum of |loading|):")
totals = hl.head_totals()
n_heads = totals.shape[1]
for flat in totals.flatten().argsort(descending=True)[:3].tolist():
    layer, head = divmod(flat, n_heads)
    print(f"  L{layer}H{head}: {float(totals[layer, head]):.4f}")

# %% [markdown]
# ## Why a head attended where it did
# `QKAttribution` splits one head's pre-softmax score into query-component x key-component
# terms; components are the graph's nodes (propagated to the head's layer) plus a bias. The
# terms add up to the score the model computed.

# %%
from tl_circuits import QKAttribution  # noqa: E402

last = ctx.n_pos - 1
qk = QKAttribution.compute(graph, layer=1, head=0, query_pos=last)
_, attn_cache = model.run_with_cache(ctx.tokens[None])
scores = attn_cache["blocks.1.attn.hook_attn_scores"][0, 0, last, : last + 1]
assert torch.allclose(qk.scores, scores, rtol=1e-4, atol=1e-5)
key = int(scores.argmax())
print(f"L1H0 attends most from position {last} to {key}; its largest terms there:")
special = {-1: "bias", -2: "features left out by a budget"}


def component_name(node: int) -> str:
    return special[node] if node < 0 else graph.node_label(node)


for q_node, k_node, value in qk.top_terms(key, k=3):
    print(f"  {value:+.4f}  query {component_name(q_node)}  x  key {component_name(k_node)}")

# %% [markdown]
# ## Save and export
# `save` is lossless (safetensors + JSON, no pickle). Head loadings are not part of the
# graph: save them beside it and load them back with it (the load checks they belong to
# that graph). `to_json` writes the graph alone in the format the Neuronpedia /
# circuit-tracer frontend reads; `export_json` adds the heads that carried each link.

# %%
from tl_circuits import export_json  # noqa: E402

graph.save("first_graph")
assert torch.equal(AttributionGraph.load("first_graph").adjacency, graph.adjacency)
pruned.save("first_pruned")
hl.save("first_pruned")  # first_pruned/head_loadings.safetensors
loaded = HeadLoadings.load("first_pruned", graph=AttributionGraph.load("first_pruned"))
assert torch.equal(loaded.loadings, hl.loadings)
pruned.to_json("first_graph.json")
export_json(pruned, "first_graph_heads.json", head_loadings=hl)

# %% [markdown]
# ## Long prompts: a feature budget and a spill directory
# A long prompt has far more active features than a graph can show. `max_feature_nodes`
# keeps the most influential ones, chosen as rows arrive; `spill_dir` keeps the rows the
# ranking reads (the bulk of a long prompt's memory) in a scratch folder instead of in
# memory, removed when the build ends. The graph is the same bit for bit
# (docs/long_prompts.md).

# %%
import os  # noqa: E402
import tempfile  # noqa: E402

budgeted = AttributionGraph.build(
    model, transcoders, prompt, max_feature_nodes=30, show_progress=False
)
with tempfile.TemporaryDirectory() as scratch:
    spilled = AttributionGraph.build(
        model, transcoders, prompt, max_feature_nodes=30, show_progress=False, spill_dir=scratch
    )
    assert os.listdir(scratch) == []  # nothing left behind
assert torch.equal(spilled.adjacency, budgeted.adjacency)
print(
    f"{budgeted.nodes.count('feature')} of {budgeted.info['n_active_features']} active "
    f"features kept; {budgeted.info['selection_ties']} chosen among exact ties"
)
