# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---
# tl_circuits-tutorial: not-executed (downloads gemma-2-2b and its transcoders)

# %% [markdown]
# # 4. Using real models
#
# Tutorials 1–3 run on the embedded default model. This one traces **gemma-2-2b** with the
# Gemma-Scope transcoders and **Qwen3** with the `mwhanna` transcoders from SAE-Lens's
# release directory. It downloads several GB from the Hugging Face hub, so the test suite
# does not run it; the code path it uses (`tl_circuits.transcoders.loading`: release resolution,
# SAE-Lens `SAE.from_pretrained`, TransformerLens loading, splice, graph) is tested on local
# stand-in files in `tests/test_real_model_paths.py`.
#
# What each release needs:
#
# - `gemma-scope-2b-pt-transcoders` for `gemma-2-2b`: load the model **unprocessed**
#   (`fold_ln=False`, i.e. `from_pretrained_no_processing`); the transcoders read
#   `blocks.{l}.ln2.hook_normalized`; JumpReLU, 16k features; one SAE id per layer (the
#   release lists one L0 per layer). Gemma-2's logits have a tanh soft-cap: logit targets
#   are pre-cap logits, and QK scores are decomposed before the attention soft-cap.
# - `mntss-gemma-2-2b-2.5m-clt-as-per-layer` for `gemma-2-2b`: unprocessed; reads
#   `blocks.{l}.mlp.hook_in` (a cross-layer transcoder's encoders, split per layer by
#   SAE-Lens).
# - `mwhanna-qwen3-0.6b-transcoders-lowl0` (and the 1.7b/4b/8b/14b releases) for
#   `qwen3-0.6b` ...: unprocessed; reads `blocks.{l}.mlp.hook_in`; ReLU transcoders.
#   Qwen3 has QK-norm and grouped-query attention, both handled exactly (frozen QK-norm
#   scales; key heads shared by query heads).
#
# `tl_circuits` checks the transcoders against the model before anything runs (hook names,
# `d_in`/`d_out`, layers, dtype/device, and the `fold_ln` recorded in SAE-Lens metadata),
# and refuses with a message naming the layer and hook if they do not fit.

# %%
import torch

from tl_circuits import (
    AttributionGraph,
    HeadLoadings,
    QKAttribution,
    ReplacementContext,
    load_pretrained,
)
from tl_circuits.graph.build import estimate_memory_bytes
from tl_circuits.transcoders.loading import release_sae_ids

# %% [markdown]
# ## Load gemma-2-2b and its transcoders
# `load_pretrained` loads the model unprocessed (the transcoders were trained on it that
# way) and one SAE-Lens transcoder per layer. The release has exactly one SAE per layer, so
# the ids are found in its directory entry; for releases with several per layer pass
# `sae_id_template="layer_{layer}/width_16k/average_l0_76"`-style templates.

# %%
print(release_sae_ids("gemma-scope-2b-pt-transcoders", 26)[:3])
model, transcoders = load_pretrained(
    "gemma-2-2b", "gemma-scope-2b-pt-transcoders", device="cpu", dtype="float32"
)

# %% [markdown]
# ## Memory and time to expect
# Weights: gemma-2-2b is 2.6 B parameters (10.5 GB in float32, 5.2 GB in bfloat16); the 26
# Gemma-Scope transcoders are 26 x 16,384 x 2,304 x 2 matrices (7.9 GB in float32). On a
# 24 GB machine use a GPU or bfloat16 for the model. The graph build needs, beyond the
# weights, what `estimate_memory_bytes` says (the build prints the same estimate and refuses
# if it does not fit). With ~40 active features per layer and position:
#
# | prompt | active features | full graph | 4,096-feature budget |
# |---|---:|---:|---:|
# | 16 tokens | ~16.6k | 1.3 GiB | 0.6 GiB |
# | 32 tokens | ~33k | 4.6 GiB | 1.1 GiB |
# | 64 tokens | ~67k | 17.7 GiB | 2.1 GiB |
#
# Time: on the benchmark's GPT-2-small-shaped model (12 layers, d_model 768) a full
# 16-token graph takes ~23 s on 2 CPU cores (`benchmarks/README.md`); gemma-2-2b has 2x the
# layers and 3x the width, so expect minutes per graph on CPU and seconds on a GPU.

# %%
n_pos, n_layers, d_model, l0 = 32, 26, 2304, 40
n_features = n_layers * n_pos * l0
n_cols = n_features + n_layers * n_pos + n_pos
estimate = estimate_memory_bytes(4096 + 10, n_cols, n_pos, d_model, 256, n_layers, 4, True)
print(f"32 tokens, 4,096 budget: ~{estimate / 2**30:.1f} GiB beyond the weights")

# %% [markdown]
# ## Trace a prompt
# Everything from tutorial 1 applies unchanged: the replacement context reproduces the
# model's logits (R1), the graph's edges are exact, and head loadings and QK attributions
# read the same cached activations.

# %%
prompt = "The National Digital Analytics Group (N"
ctx = ReplacementContext(model, transcoders, prompt)
print(ctx.reconstruction_stats())
graph = AttributionGraph.build(model, transcoders, prompt, max_feature_nodes=4096)
pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
print(pruned.scores())
pruned.to_json("gemma_ndag.json")  # open in the Neuronpedia / circuit-tracer frontend

# %% [markdown]
# Which heads carried the strongest cross-position edges, and why the top one attended
# where it did:

# %%
hl = HeadLoadings.compute(pruned)
totals = hl.head_totals()
layer, head = divmod(int(totals.flatten().argmax()), totals.shape[1])
qk = QKAttribution.compute(pruned, layer=layer, head=head, query_pos=len(graph.tokens) - 1)
best = int(torch.argmax(qk.pattern))
for term in qk.top_terms(best, k=5):
    print(f"{term.value:+.3f}  {qk.label(term.query)}  x  {qk.label(term.key)}")

# %% [markdown]
# ## Qwen3
# The same call loads Qwen3 and its transcoders (the release lists one SAE per layer).

# %%
model, transcoders = load_pretrained("qwen3-0.6b", "mwhanna-qwen3-0.6b-transcoders-lowl0")
graph = AttributionGraph.build(
    model, transcoders, "The capital of France is", max_feature_nodes=4096
)
print(graph.prune().scores())

# %% [markdown]
# ## From the command line
# ```bash
# tl-circuits trace "The capital of France is" --transcoders mwhanna-qwen3-0.6b-transcoders-lowl0 \
#     --max-features 4096 --out qwen_paris
# tl-circuits heads qwen_paris --edges 20
# tl-circuits qk qwen_paris --layer 12 --head 3 --query-pos -1
# ```
