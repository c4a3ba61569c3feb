# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 3. A fact lookup: entity + relation -> attribute
#
# The default model memorised a 16 x 4 table of facts: after `Alice lives_in` it predicts
# Alice's city. This tutorial asks which MLP features carry the entity and the relation to
# the attribute: where in the graph the answer's support sits, what those features read,
# which head brought the entity to them, and what happens when they are removed. Claims are
# checked with `assert`s; layers and heads come from the model's card.

# %%

import torch

from tl_circuits import AttributionGraph, FeatureIntervention, HeadLoadings, intervene
from tl_circuits.default import (
    DEFAULT_PROMPTS,
    default_card,
    load_default_model,
    load_default_transcoders,
)

model = load_default_model()
transcoders = load_default_transcoders("per_layer")
card = default_card()
prompt = DEFAULT_PROMPTS["fact"]
tokens = model.to_str_tokens(prompt.text)
relation_pos = len(tokens) - 1
entity_pos = relation_pos - 1
print(
    f"{prompt.text!r} -> {prompt.answer!r}; MLP layers doing the lookup (ablation, card):",
    card["fact_lookup_mlp_layers"],
)

# %% [markdown]
# ## Where the answer's support sits
# Group the features' direct effects on the answer's logit by (layer, position). The
# largest group is at the relation token, in the lookup layer: the attribute is written
# there, where both the entity and the relation are available.

# %%
graph = AttributionGraph.build(model, transcoders, prompt.text, targets=[prompt.answer])
target = int(graph.indices("target")[0])
features = graph.indices("feature")
groups: dict[tuple[int, int], float] = {}
for f in features.tolist():
    key = (int(graph.nodes.layer[f]), int(graph.nodes.pos[f]))
    groups[key] = groups.get(key, 0.0) + float(graph.adjacency[target, f])
for (layer, pos), total in sorted(groups.items(), key=lambda kv: -abs(kv[1]))[:4]:
    print(f"  layer {layer} @{pos} {tokens[pos]!r}: {total:+.3f}")
best_layer, best_pos = max(groups, key=lambda k: groups[k])
assert best_pos == relation_pos and best_layer in card["fact_lookup_mlp_layers"]

# %% [markdown]
# ## What the lookup features read
# Take the ten features of that group with the largest effect on the answer and sum their
# input edges from each token: they read the relation token and the entity token.

# %%
here = features[
    (graph.nodes.layer[features] == best_layer) & (graph.nodes.pos[features] == relation_pos)
]
lookup = here[graph.adjacency[target, here].argsort(descending=True)[:10]]
token_nodes = graph.indices("token")
reads = graph.adjacency[lookup][:, token_nodes].sum(0)
for pos, value in enumerate(reads.tolist()):
    print(f"  from {tokens[pos]!r}: {value:+.3f}")
assert int(reads.argmax()) == relation_pos  # the relation, read in place
assert reads[entity_pos] > 0  # and the entity, brought over by attention

# %% [markdown]
# ## Which head brought the entity
# The entity's edge into the strongest lookup feature crosses the attention layers below
# it; its head loadings say which head carried it from the entity's position. It is not
# necessarily the card's previous-token head: in the shipped model a layer-0 head that
# attends to its own position on filler words attends from a relation word to the entity
# before it, and carries most of this edge (the previous-token head adds a smaller share).

# %%
top_feature = int(lookup[0])
entity_node = int(token_nodes[entity_pos])
loadings = HeadLoadings.compute(graph, [(top_feature, entity_node)])
print(
    f"{graph.node_label(entity_node)} -> {graph.node_label(top_feature)}:"
    f" {float(loadings.edge_values[0]):+.3f}"
)
for layer, head, value in loadings.top_heads(0, k=3):
    print(f"  L{layer}H{head}: {value:+.3f}")
crossed = loadings.crossed[0]
split = loadings.bypass[0][crossed] + loadings.loadings[0][crossed].sum(-1)
assert torch.allclose(split, loadings.edge_values[0].expand_as(split), rtol=1e-4, atol=1e-5)
prev_layer, prev_head, _ = card["previous_token_head"]
print(f"(the card's previous-token head: L{prev_layer}H{prev_head})")
carrier_layer, carrier_head, carried = loadings.top_heads(0, k=1)[0]
assert carried > 0.5 * float(loadings.edge_values[0])  # one head carries most of it
pattern = graph.context.frozen[f"blocks.{carrier_layer}.attn.hook_pattern"][0, carrier_head]
assert int(pattern[entity_pos + 1].argmax()) == entity_pos  # it attends to the entity

# %% [markdown]
# ## Remove the lookup features
# Zero every feature of the lookup layer at the relation position (later layers and
# attention live, as in the real model): the answer's probability collapses. The features
# (not the transcoder's error term) carry the fact.

# %%
result = intervene(
    graph.context,
    [FeatureIntervention.zero(best_layer, int(graph.nodes.feature[f]), relation_pos) for f in here],
)
answer = graph.targets[0].token
p_before = float(graph.context.logits[-1].softmax(-1)[answer])
p_after = float(result.logits[-1].softmax(-1)[answer])
print(f"P({prompt.answer!r}): {p_before:.3f} -> {p_after:.3f}")
assert p_after < 0.5 * p_before

# %% [markdown]
# The graph's own prediction of one feature's removal is exact when everything downstream is
# held fixed (a constrained intervention, tutorial 1): the answer moves by minus that
# feature's edge.

# %%
from tl_circuits.graph.targets import target_values  # noqa: E402

f = top_feature
single = intervene(
    graph.context,
    [FeatureIntervention.zero(best_layer, int(graph.nodes.feature[f]), relation_pos)],
    freeze_attention=True,
    constrained=(best_layer, model.cfg.n_layers - 1),
)
moved = float(
    target_values(graph.targets, single.final_normalized)[0]
    - target_values(graph.targets, graph.context.final_normalized)[0]
)
print(f"predicted {-float(graph.adjacency[target, f]):+.4f}, measured {moved:+.4f}")
assert abs(moved + float(graph.adjacency[target, f])) < 1e-4
