# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 5. Many prompts: a batch on Ray, and what recurs across the graphs
#
# One graph explains one prompt. A study asks which features and heads come back prompt
# after prompt. This tutorial traces a dozen prompts of the default model on Ray workers
# (`trace_many`: each worker loads the model once; a failed prompt is recorded, a dead
# worker replaced, a rerun resumes), then counts what recurs (`recurrence`). It needs the
# extra: `pip install "tl_circuits[distributed]"`; see docs/distributed.md.
#
# The prompts: six *induction* prompts (a block of filler words, other words, the block
# again without its last word: the model should copy that word) with different blocks, and
# six *fact* prompts with different entities and relations.

# %%
import random

from tl_circuits import recurrence, trace_many
from tl_circuits.default import default_card
from tl_circuits.default.synthetic import ENTITIES, RELATIONS, filler_words

rng = random.Random(0)
words = list(filler_words())
prompts = []
for i in range(6):
    block = rng.sample(words, 6)
    others = " ".join(rng.sample(words, 4))
    text = f"kana {' '.join(block)} {others} {' '.join(block[:-1])}"
    prompts.append({"id": f"induction-{i}", "prompt": text, "targets": [block[-1]]})
for i in range(6):
    entity, relation = ENTITIES[i], RELATIONS[i % len(RELATIONS)]
    text = f"{' '.join(rng.sample(words, 2))} {entity} {relation}"
    prompts.append({"id": f"fact-{i}", "prompt": text})

# %% [markdown]
# Trace them on two workers of a local Ray instance (started here and shut down at the
# end; pass `address=` for a cluster). Each prompt's graphs go to `many_out/graphs/{id}/`,
# one row per prompt to `many_out/results.parquet`.

# %%
table = trace_many(prompts, out_dir="many_out", workers=2, show_progress=False)
print(table[["id", "status", "n_tokens", "pruned_n_nodes", "top_target", "top_heads"]])
assert (table["status"] == "complete").all()

# %% [markdown]
# What recurs: for each feature and head, the graphs it appears in (a head appears when it
# carries at least a quarter of some cross-position edge of the pruned graph).

# %%
rec = recurrence("many_out")
print(rec.features.head(8))
print(rec.heads.head(8))
rec.save("many_out")  # recurrence_*.parquet and recurrence.png

# %% [markdown]
# The induction head of the model's card carries a cross-position edge in every induction
# prompt's graph: the circuit of tutorial 2 is not peculiar to its one prompt. This is a
# count, not a proof of one shared circuit: docs/distributed.md says what it leaves open.

# %%
layer, head, _ = default_card()["induction_head"]
row = rec.heads[(rec.heads["layer"] == layer) & (rec.heads["head"] == head)].iloc[0]
induction_ids = {p["id"] for p in prompts if p["id"].startswith("induction")}
print(f"L{layer}H{head} appears in", sorted(row["prompts"]))
assert induction_ids <= set(row["prompts"])
