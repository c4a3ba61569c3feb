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
# 2. **head loadings** name the attention head that carried it there: the induction head;
# 3. **QK attribution** shows why that head attended to `B`: its query is the current
#    token `A`, its key is the "previous token was `A`" signal that the layer-0
#    previous-token head wrote at `B`'s position;
# 4. a **QK intervention** removing that key-side signal from the induction head only
#    removes the induction attention and the prediction.
#
# Every claim is checked with an `assert`. The heads come from the model's card (the
# training script measured them on held-out data), not from this text.

# %%
import torch

from tl_circuits import AttributionGraph, HeadLoadings, QKAttribution, QKBasis, intervene_qk
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
prev_layer, prev_head, prev_score = card["previous_token_head"]
ind_layer, ind_head, ind_score = card["induction_head"]
print(prompt.text, "->", prompt.answer)
print(f"previous-token head L{prev_layer}H{prev_head} (score {prev_score:.2f}), "
      f"induction head L{ind_layer}H{ind_head} (score {ind_score:.2f})")  # fmt: skip

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
# residual stream). The head that moved `B` from its first position to the query is the
# induction head.

# %%
loadings = HeadLoadings.compute(graph, [(target, source)])
edge = float(loadings.edge_values[0])
for layer, head, value in loadings.top_heads(0, k=3):
    print(f"  L{layer}H{head}: {value:+.3f} of the edge's {edge:+.3f}")
crossed = loadings.crossed[0]
split = loadings.bypass[0][crossed] + loadings.loadings[0][crossed].sum(-1)
assert torch.allclose(split, torch.full_like(split, edge), rtol=1e-4, atol=1e-5)  # exact
top_layer, top_head, _ = loadings.top_heads(0, k=1)[0]
assert (top_layer, top_head) == (ind_layer, ind_head)  # the card's induction head
share = float(loadings.loadings[0, ind_layer, ind_head]) / edge
print(f"the induction head carries {share:.0%} of the edge")
assert share > 0.5

# %% [markdown]
# ## 3. QK attribution: why the induction head attended to `B`
# Split the induction head's score at the query (the last `A`) into query-side x key-side
# terms, in the dictionary-free basis: the components are the token embedding and each
# earlier head's and MLP's output, at the position that reads them. The head attends to
# the first `B`, and the top terms pair the query's current-token signal (layer 0's
# self-attending heads and MLP0 re-write the token `A` at its own position) with the
# previous-token head's output at `B` ("the token before me was `A`").

# %%
basis = QKBasis.from_components(model, prompt.text, layer=ind_layer)
qk = QKAttribution.from_basis(basis, head=ind_head, query_pos=query_pos)
key_index = int(qk.pattern.argmax())  # keys are 0..query_pos: the index is the position
print(f"attends to @{key_index} {tokens[key_index]!r} ({float(qk.pattern[key_index]):.3f})")
assert key_index == first_pos
for term in qk.top_terms(key_index, k=4):
    print(f"  {term.value:+7.3f}  query {qk.label(term.query)}  x  key {qk.label(term.key)}")
best = qk.top_terms(key_index, k=1)[0]
assert qk.label(best.key).startswith(f"L{prev_layer}H{prev_head}")  # previous-token head
key_marginal = qk.key_marginals()[key_index]  # [n_k]: each key component's total
top_key = int(qk.k_components[key_marginal.argmax()])
print("largest key-side component:", qk.label(top_key))
assert top_key == best.key
_, cache = model.run_with_cache(prompt.text)
score = cache[f"blocks.{ind_layer}.attn.hook_attn_scores"][0, ind_head, query_pos, key_index]
assert abs(float(qk.scores[key_index]) - float(score)) < 1e-3 * max(1.0, abs(float(score)))

# %% [markdown]
# The same question in the graph's own basis (features, errors and token nodes propagated
# to the head's layer): the terms sum to the same score. The top terms pair the word `A`
# on both sides. Key side: the token `A` *one position before* `B`, which reached `B`
# through the previous-token head. Query side: `A` itself, and also its first occurrence,
# which layer-0 heads attending from the second `A` to the first (duplicate-token heads)
# carried to the query.

# %%
graph_qk = QKAttribution.compute(graph, layer=ind_layer, head=ind_head, query_pos=query_pos)
for term in graph_qk.top_terms(key_index, k=3):
    q_label, k_label = graph_qk.label(term.query), graph_qk.label(term.key)
    print(f"  {term.value:+7.3f}  query {q_label}  x  key {k_label}")
assert torch.allclose(graph_qk.scores, qk.scores, rtol=1e-4, atol=1e-4)  # two bases, one score


def position(component: int) -> int:
    return int(graph_qk.table.pos[graph_qk.table.row(component)])


top = graph_qk.top_terms(key_index, k=1)[0]
assert position(top.key) == first_pos - 1  # the first A
assert tokens[position(top.query)] == tokens[query_pos]  # the word A on the query side

# %% [markdown]
# ### Two exact ways to get the graph basis
# Each node's query (key) vector is its write, carried through the frozen model to the
# head's layer and read through ln1, `W_Q` (`W_K`), QK-norm and rotary. `QKBasis.from_graph`
# can get it *forward* (propagate every node once; shared by every head and position) or
# *in reverse* (one reverse pass per query/key dimension and position asked about, which
# reads every node at once). `method="auto"` (the default) runs reverse passes while they are
# cheaper than one forward propagation and switches to it after. One question about one head
# and one key is `2 x d_head` reverse passes; both ways give the same vectors.

# %%
by_seeds = QKBasis.from_graph(graph, ind_layer, method="reverse")
by_rows = QKBasis.from_graph(graph, ind_layer, method="forward")
one_key = dict(head=ind_head, query_pos=query_pos, key_pos=[first_pos])
qk_reverse = QKAttribution.from_basis(by_seeds, **one_key)
qk_forward = QKAttribution.from_basis(by_rows, **one_key)
n_rows = len(by_rows.live_rows([query_pos]))
print(f"reverse: {by_seeds.reverse.seeds_run} seeds; forward: {n_rows} rows")
assert torch.allclose(qk_reverse.k_vectors, qk_forward.k_vectors, atol=1e-4)
assert torch.allclose(qk_reverse.scores, qk_forward.scores, atol=1e-4)
assert by_seeds.reverse.seeds_run == 2 * model.cfg.d_head

# %% [markdown]
# ## 4. The QK intervention: remove "previous token was `A`" from the induction head
# Scale the previous-token head's component to 0 on the *key side of the induction head
# only* (other heads frozen at their clean patterns). The change in the head's score is
# exactly what the QK terms predict; the induction attention collapses and the model no
# longer predicts `B`.

# %%
component = best.key
result = intervene_qk(basis, {component: 0.0}, side="k", heads=[ind_head])
before = float(result.clean_patterns[0, query_pos, key_index])
after = float(result.patterns[0, query_pos, key_index])
answer_id = int(model.to_tokens(prompt.answer, prepend_bos=False)[0, 0])
p_before = float(result.clean_logits[-1].softmax(-1)[answer_id])
p_after = float(result.logits[-1].softmax(-1)[answer_id])
print(f"removed key component {qk.label(component)}")
print(f"attention to @{key_index}: {before:.3f} -> {after:.3f}")
print(f"P({prompt.answer!r}): {p_before:.3f} -> {p_after:.3f}")
removed = qk.key_terms(key_index)[:, (qk.k_components == component).nonzero()[0, 0]].sum()
new_score = float(result.scores[0, query_pos, key_index])
assert abs(new_score - (float(qk.scores[key_index]) - float(removed))) < 1e-3  # predicted
assert after < 0.2 * before and p_after < 0.1 < p_before

# %% [markdown]
# ## 5. Look at it: the interactive viewer
# `viewer_document` bundles the pruned graph with its head loadings, the QK terms of the
# heads each link names, the heads' attention patterns and the default model's feature
# cards; `self_contained_html` makes one file that opens offline in any browser. Click the
# edge from the first `B` to the output: its bars show the induction head, and clicking
# the head shows its attention pattern and the QK terms above, summing to its score.
# (`tl-circuits trace` writes the same file as `OUT/viewer.html`, and
# `tl-circuits serve OUT` serves one or many traces, saving pins and supernodes.)

# %%
from pathlib import Path  # noqa: E402

from tl_circuits.viewer import self_contained_html, viewer_document  # noqa: E402

pruned = graph.prune()
document = viewer_document(pruned, head_loadings=HeadLoadings.compute(pruned))
viewer_links = document["extra"]["tl_circuits"]["viewer"]["link_heads"]
Path("induction_viewer.html").write_text(self_contained_html(document), encoding="utf-8")
print(f"wrote induction_viewer.html: {pruned.n_nodes} nodes, {len(viewer_links)} links with heads")
page = Path("induction_viewer.html").read_text(encoding="utf-8")
assert not any(f'{attr}="http' in page for attr in ("src", "href"))  # nothing to fetch
