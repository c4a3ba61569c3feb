# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 2. The induction circuit, end to end
#
# The embedded default model copies: after `... A B ... A` it predicts `B`. This tutorial
# traces that prediction the way the QK-attribution paper traces its "Aunt Sally" example:
#
# 1. the **attribution graph** says the answer came from the *earlier* `B` token;
# 2. **head loadings** name the attention head that carried it there (the induction head);
# 3. **QK attribution** shows why that head attended to `B`: its query is the current
#    token `A`, its key is the "previous token was `A`" signal a layer-0 previous-token head
#    wrote at `B`'s position (in a clean circuit; the card says what the shipped model has);
# 4. a **QK intervention** removing that key-side signal from the induction head only
#    removes the induction attention and the prediction.
#
# Every claim is checked with an `assert`, and the heads come from the model's card (the
# training script measured them), not from this text.

# %%
import torch

from tl_circuits import AttributionGraph, QKAttribution, QKBasis, intervene_qk
from tl_circuits.default import (
    DEFAULT_PROMPTS,
    default_card,
    load_default_model,
    load_default_transcoders,
)

model = load_default_model()
transcoders = load_default_transcoders("per_layer")
card = default_card()
prompt = DEFAULT_PROMPTS["induction"]
prev_layer, prev_head, _ = card["previous_token_head"]
ind_layer, ind_head, _ = card["induction_head"]
print(prompt.text, "->", prompt.answer)
print(f"previous-token head L{prev_layer}H{prev_head}, induction head L{ind_layer}H{ind_head}")

# %% [markdown]
# ## 1. The graph: the answer came from the earlier token
# The target is the answer's logit. Among the token nodes, the largest direct effect on it
# comes from the answer's *first* occurrence: the model copied it from there.

# %%
tokens = model.to_str_tokens(prompt.text)
query_pos = len(tokens) - 1
first_pos = tokens.index(prompt.answer)  # where B first appeared
graph = AttributionGraph.build(model, transcoders, prompt.text, targets=[prompt.answer])
target = int(graph.indices("target")[0])
token_nodes = graph.indices("token")
from_tokens = graph.adjacency[target, token_nodes]
source = int(token_nodes[from_tokens.argmax()])
print(f"strongest token input: {graph.node_label(source)} ({float(from_tokens.max()):+.3f})")
assert int(graph.nodes.pos[source]) == first_pos
print("replacement score:", round(graph.scores().replacement, 3))

# %% [markdown]
# ## 2. Head loadings: which head carried it
# That edge crosses every attention layer between the token and the output. Its head
# loadings split it exactly over the heads of each crossed layer (plus a bypass through the
# residual stream). In a clean induction circuit the induction head carries most of it;
# the card records the heads the training script measured and whether the shipped model's
# heads reach the clean-circuit targets (`circuit_targets_met`).

# %%
loadings = graph.compute_head_loadings([[target, source]])
edge = float(loadings.edge_values[0])
for layer, head, value in loadings.top_heads(0, k=3):
    print(f"  L{layer}H{head}: {value:+.3f} of the edge's {edge:+.3f}")
crossed = loadings.crossed[0]
split = loadings.bypass[0][crossed] + loadings.loadings[0][crossed].sum(-1)
assert torch.allclose(split, torch.full_like(split, edge), rtol=1e-4, atol=1e-5)  # exact
# the head that brings the signal to the query position sits in the last layer it crosses
top_layer = int(crossed.nonzero().max())
top_head = int(loadings.loadings[0, top_layer].abs().argmax())
print(f"card: induction head L{ind_layer}H{ind_head}; top head of layer {top_layer}:")
print(f"  L{top_layer}H{top_head} {float(loadings.loadings[0, top_layer, top_head]):+.3f}")
print("clean-circuit targets met:", card.get("circuit_targets_met", "not recorded"))

# %% [markdown]
# ## 3. QK attribution: why that head attended where it did
# Split that head's score at the query (the last `A`) and the key it attends to most (`B`
# in a clean induction circuit) into query-side x key-side terms. In the dictionary-free
# basis the components are the token embedding and each earlier head's and MLP's
# output at the position that reads them. In a clean induction
# circuit the top term pairs the query's token embedding with the previous-token head's
# output at `B` ("the token before me was `A`").

# %%
basis = QKBasis.from_components(model, prompt.text, layer=top_layer)
qk = QKAttribution.from_basis(basis, head=top_head, query_pos=query_pos)
key_index = int(qk.pattern.argmax())  # keys are 0..query_pos: the index is the position
key_pos = key_index
print(
    f"attends most to @{key_pos} {tokens[key_pos]!r} ({float(qk.pattern[key_index]):.3f});"
    " top terms of that score:"
)
for term in qk.top_terms(key_index, k=4):
    print(f"  {term.value:+7.3f}  query {qk.label(term.query)}  x  key {qk.label(term.key)}")
best = qk.top_terms(key_index, k=1)[0]
_, cache = model.run_with_cache(prompt.text)
score = cache[f"blocks.{top_layer}.attn.hook_attn_scores"][0, top_head, query_pos, key_pos]
assert abs(float(qk.scores[key_index]) - float(score)) < 1e-3 * max(1.0, abs(float(score)))

# %% [markdown]
# The same question in the graph's own basis (features, errors, token nodes propagated to
# the head's layer): the terms sum to the same score.

# %%
graph_qk = QKAttribution.compute(graph, layer=top_layer, head=top_head, query_pos=query_pos)
top = graph_qk.top_terms(key_index, k=1)[0]
print(f"{top.value:+.3f}  query {graph_qk.label(top.query)}  x  key {graph_qk.label(top.key)}")
assert torch.allclose(graph_qk.scores, qk.scores, rtol=1e-4, atol=1e-4)  # two bases, one score

# %% [markdown]
# ## 4. The QK intervention: remove the top key-side component from that head
# Scale the top term's key-side component to 0 on the *key side of that head only* (other
# heads frozen at their clean patterns). The change in the head's score is exactly what the
# QK terms predict, and the attention moves with it (in a clean induction circuit, removing
# "previous token was `A`" removes the induction attention and the prediction).

# %%
component = best.key
result = intervene_qk(basis, {component: 0.0}, side="k", heads=[top_head])
before = float(result.clean_patterns[0, query_pos, key_pos])
after = float(result.patterns[0, query_pos, key_pos])
answer_id = int(model.to_tokens(prompt.answer, prepend_bos=False)[0, 0])
p_before = float(result.clean_logits[-1].softmax(-1)[answer_id])
p_after = float(result.logits[-1].softmax(-1)[answer_id])
print(f"removed key component {qk.label(component)}")
print(f"attention to @{key_pos}: {before:.3f} -> {after:.3f}")
print(f"P({prompt.answer!r}): {p_before:.3f} -> {p_after:.3f}")
removed = qk.key_terms(key_index)[:, (qk.k_components == component).nonzero()[0, 0]].sum()
new_score = float(result.scores[0, query_pos, key_pos])
assert abs(new_score - (float(qk.scores[key_index]) - float(removed))) < 1e-3
assert (after < before) == (float(removed) > 0)
